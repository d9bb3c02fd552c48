// Package identity resolves the OS users that envd acts as, and runs file
// operations with their credentials.
//
// envd runs as root, but every process it starts and every file it touches must
// be subject to the target user's permissions and owned by that user. Processes
// get the user's credentials through exec; file operations run on a dedicated OS
// thread whose filesystem uid/gid and supplementary groups are the user's (see Do).
package identity

import (
	"encoding/base64"
	"net/http"

	"connectrpc.com/connect"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// User is an OS account envd acts as.
type User struct {
	Name   string
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary group ids, including GID
	Home   string
}

// ErrUnknownUser is returned (wrapped) when no account has the requested name.
var ErrUnknownUser = errors.New("unknown user")

// UnknownUserError names the account that does not exist; it matches ErrUnknownUser.
type UnknownUserError struct {
	Name   string
	Reason string
}

func (e *UnknownUserError) Error() string { return fmt.Sprintf("%s: %s", ErrUnknownUser, e.Reason) }

// Is makes errors.Is(err, ErrUnknownUser) hold.
func (e *UnknownUserError) Is(target error) bool { return target == ErrUnknownUser }

// Lookup finds the account called name in the system's user database.
func Lookup(name string) (*User, error) {
	if name == "" {
		return nil, &UnknownUserError{Name: name, Reason: "empty user name"}
	}
	u, err := user.Lookup(name)
	if err != nil {
		var unknown user.UnknownUserError
		if errors.As(err, &unknown) {
			return nil, &UnknownUserError{Name: name, Reason: fmt.Sprintf("no account named %q", name)}
		}
		return nil, fmt.Errorf("look up user %q: %w", name, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q has a non-numeric uid %q", name, u.Uid)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q has a non-numeric gid %q", name, u.Gid)
	}
	res := &User{Name: u.Username, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir}
	if res.Home == "" {
		res.Home = "/"
	}
	res.Groups = []uint32{res.GID}
	if ids, err := u.GroupIds(); err == nil {
		for _, s := range ids {
			g, err := strconv.ParseUint(s, 10, 32)
			if err == nil && uint32(g) != res.GID {
				res.Groups = append(res.Groups, uint32(g))
			}
		}
	}
	return res, nil
}

// Env returns the variables every process of this user starts with.
func (u *User) Env() map[string]string {
	return map[string]string{
		"PATH":    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME":    u.Home,
		"USER":    u.Name,
		"LOGNAME": u.Name,
	}
}

// ErrBadPath is returned (wrapped) for paths that cannot be resolved, such as "~other".
var ErrBadPath = errors.New("invalid path")

// Resolve turns a path as clients send it into an absolute, clean path:
// empty means workdir (or home when workdir is empty), "~" and "~/x" are under
// the user's home, relative paths are joined to the user's home.
func (u *User) Resolve(path, workdir string) (string, error) {
	switch {
	case path == "":
		if workdir != "" {
			return u.Resolve(workdir, "")
		}
		return filepath.Clean(u.Home), nil
	case path == "~":
		return filepath.Clean(u.Home), nil
	case strings.HasPrefix(path, "~/"):
		return filepath.Join(u.Home, path[2:]), nil
	case strings.HasPrefix(path, "~"):
		return "", fmt.Errorf("%w: %q: only the user's own home (~) can be named", ErrBadPath, path)
	case filepath.IsAbs(path):
		return filepath.Clean(path), nil
	default:
		return filepath.Join(u.Home, path), nil
	}
}

// IsCurrent reports whether the user is the one envd itself runs as; Do then
// needs no credential switch.
func (u *User) IsCurrent() bool {
	return u.UID == uint32(os.Geteuid()) && u.GID == uint32(os.Getegid())
}

// Do runs fn with the user's filesystem credentials: permission checks and the
// owner of created files are the user's. fn must do its filesystem syscalls on
// the calling goroutine and must not start goroutines that touch the filesystem.
//
// The credentials are per-thread (setfsuid, setfsgid and setgroups through raw
// syscalls, not Go's all-threads variants), so fn runs on a fresh goroutine
// locked to its OS thread, which is never unlocked: Go discards the thread when
// the goroutine ends, so the changed credentials never leak to other goroutines.
func (u *User) Do(fn func() error) error {
	if u.IsCurrent() {
		return fn()
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("envd runs as uid %d and cannot act as user %q (uid %d): run envd as root", os.Geteuid(), u.Name, u.UID)
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread dies with this goroutine.
		gids := make([]int, len(u.Groups))
		for i, g := range u.Groups {
			gids[i] = int(g)
		}
		if err := unix.Setgroups(gids); err != nil {
			done <- fmt.Errorf("set groups of user %q: %w", u.Name, err)
			return
		}
		// Group first: once fsuid is not 0 the thread may lose the right to change it.
		if err := unix.Setfsgid(int(u.GID)); err != nil {
			done <- fmt.Errorf("set fsgid of user %q: %w", u.Name, err)
			return
		}
		if err := unix.Setfsuid(int(u.UID)); err != nil {
			done <- fmt.Errorf("set fsuid of user %q: %w", u.Name, err)
			return
		}
		done <- fn()
	}()
	return <-done
}

// FromBasicAuth picks the user a request acts as: the user name of an HTTP Basic
// Authorization header (the password is ignored, as in E2B's envd), or
// defaultUser when the header is absent.
func FromBasicAuth(authorization, defaultUser string) (*User, error) {
	name := defaultUser
	if authorization != "" {
		n, err := basicUser(authorization)
		if err != nil {
			return nil, err
		}
		name = n
	}
	return Lookup(name)
}

func basicUser(authorization string) (string, error) {
	const prefix = "Basic "
	if len(authorization) < len(prefix) || !strings.EqualFold(authorization[:len(prefix)], prefix) {
		return "", &UnknownUserError{Name: authorization, Reason: "Authorization header is not HTTP Basic"}
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(authorization[len(prefix):]))
	if err != nil {
		return "", &UnknownUserError{Name: authorization, Reason: "Authorization header is not valid base64"}
	}
	name, _, _ := strings.Cut(string(raw), ":")
	return name, nil
}

// ForRPC is FromBasicAuth for Connect handlers: an unknown user is
// unauthenticated with E2B's exact message (ENVD.md §4), anything else internal.
func ForRPC(h http.Header, defaultUser string) (*User, error) {
	u, err := FromBasicAuth(h.Get("Authorization"), defaultUser)
	var unknown *UnknownUserError
	switch {
	case err == nil:
		return u, nil
	case errors.As(err, &unknown):
		return nil, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("invalid username: '%s'", unknown.Name))
	default:
		return nil, connect.NewError(connect.CodeInternal, err)
	}
}
