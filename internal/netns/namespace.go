package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where iproute2 keeps named namespaces; bind mounts here make `ip netns` list and enter our slots.
const netnsDir = "/run/netns"

// createNamedNetns makes a new network namespace pinned by a bind mount at netnsDir/name and returns a handle to it.
func createNamedNetns(name string) (vnetns.NsHandle, error) {
	path := filepath.Join(netnsDir, name)
	if err := ensureNetnsDir(); err != nil {
		return vnetns.None(), err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return vnetns.None(), fmt.Errorf("create mount point for netns %s: %w", name, err)
	}
	f.Close()

	// unshare moves only the calling thread into the new namespace; onThread brings it back once the bind mount
	// pins the namespace.
	err = onThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare netns %s: %w", name, err)
		}
		if err := unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount netns %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		deleteNamedNetns(name) // unmounts a bind mount made before the failure, removes the mount point
		return vnetns.None(), err
	}
	h, err := vnetns.GetFromPath(path)
	if err != nil {
		deleteNamedNetns(name)
		return vnetns.None(), fmt.Errorf("open netns %s: %w", name, err)
	}
	return h, nil
}

// ensureNetnsDir makes netnsDir a shared mount point, as `ip netns add` does, so namespaces pinned after another
// mount namespace was made (for example by `ip netns exec`) still show up there.
func ensureNetnsDir() error {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", netnsDir, err)
	}
	err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) { // not a mount point yet
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s on itself: %w", netnsDir, err)
		}
		err = unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("make %s a shared mount: %w", netnsDir, err)
	}
	return nil
}

// deleteNamedNetns removes the bind mount that pins the namespace; the kernel frees it once no process or open
// handle refers to it any more. A missing namespace is not an error.
func deleteNamedNetns(name string) error {
	path := filepath.Join(netnsDir, name)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("unmount netns %s: %w", name, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", name, err)
	}
	return nil
}

// inNetns runs fn on a locked OS thread that has joined ns, then moves the thread back (onThread).
func inNetns(ns vnetns.NsHandle, fn func() error) error {
	return onThread(func() error {
		if err := vnetns.Set(ns); err != nil {
			return fmt.Errorf("enter netns: %w", err)
		}
		return fn()
	})
}

// onThread runs fn on a locked OS thread, then puts the thread back into the network namespace it started in (fn
// may have moved it) and hands it back to the scheduler. A thread that cannot go back ends locked with its
// goroutine, so the runtime does not run other code in the wrong namespace. Threads are not simply discarded after
// each use: a locked goroutine that ends on the main thread does not end that thread, the runtime parks it for
// good, and a namespace it sat in would stay alive (with its devices) after deleteNamedNetns.
func onThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := vnetns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer home.Close()
		fnErr := fn()
		if err := vnetns.Set(home); err != nil {
			errc <- errors.Join(fnErr, fmt.Errorf("return to host netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// writeSysctl sets a sysctl of the calling thread's network namespace (/proc/sys/net is per namespace).
func writeSysctl(key, value string) error {
	path := filepath.Join("/proc/sys", filepath.FromSlash(key))
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", key, value, err)
	}
	return nil
}
