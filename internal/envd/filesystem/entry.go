package filesystem

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/timestamppb"

	rpc "github.com/warren-sh/warren/gen/filesystem"
)

// metadataPrefix marks the extended attributes that hold a file's SDK
// metadata (X-Metadata-* on upload); EntryInfo.metadata strips it.
const metadataPrefix = "user.e2b."

// inspector builds EntryInfos. It caches uid and gid names for one request,
// since a listing looks up the same few owners many times. Its methods do
// filesystem syscalls and so run inside identity.User.Do.
type inspector struct {
	owners map[uint32]string
	groups map[uint32]string
}

func newInspector() *inspector {
	return &inspector{owners: map[uint32]string{}, groups: map[uint32]string{}}
}

// entry describes path itself (a symlink is not followed, but its target
// decides type and mode), as ENVD.md §7 specifies.
func (in *inspector) entry(path string) (*rpc.EntryInfo, error) {
	info, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	mode := info.Mode()
	e := &rpc.EntryInfo{
		Name:         filepath.Base(path),
		Type:         fileType(mode),
		Path:         path,
		Size:         info.Size(),
		Mode:         uint32(mode.Perm()),
		Permissions:  mode.String(),
		ModifiedTime: timestamppb.New(info.ModTime()),
		Metadata:     readMetadata(path),
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		e.Owner = in.owner(st.Uid)
		e.Group = in.group(st.Gid)
	}
	if mode&fs.ModeSymlink != 0 {
		// Like E2B: the link reports its target's kind and permission bits; a
		// dangling (or looping) link has no kind, and the SDK drops such entries.
		target, err := filepath.EvalSymlinks(path)
		if err != nil {
			target = danglingTarget(path)
			e.Type, e.Mode = rpc.FileType_FILE_TYPE_UNSPECIFIED, 0
		} else if ti, err := os.Stat(target); err == nil {
			e.Type, e.Mode = fileType(ti.Mode()), uint32(ti.Mode().Perm())
		} else {
			e.Type, e.Mode = rpc.FileType_FILE_TYPE_UNSPECIFIED, 0
		}
		e.SymlinkTarget = &target
	}
	return e, nil
}

// danglingTarget is the absolute path a link that cannot be resolved points
// at, as far as it can be known.
func danglingTarget(link string) string {
	target, err := os.Readlink(link)
	if err != nil {
		return link
	}
	if !filepath.IsAbs(target) {
		target = filepath.Join(filepath.Dir(link), target)
	}
	return filepath.Clean(target)
}

// isRealDir reports whether e is a directory and not a link to one: listings
// and recursive watches never descend through links.
func isRealDir(e *rpc.EntryInfo) bool {
	return e.Type == rpc.FileType_FILE_TYPE_DIRECTORY && e.SymlinkTarget == nil
}

func fileType(mode fs.FileMode) rpc.FileType {
	switch {
	case mode.IsRegular():
		return rpc.FileType_FILE_TYPE_FILE
	case mode.IsDir():
		return rpc.FileType_FILE_TYPE_DIRECTORY
	case mode&fs.ModeSymlink != 0:
		return rpc.FileType_FILE_TYPE_SYMLINK
	default:
		return rpc.FileType_FILE_TYPE_UNSPECIFIED
	}
}

// owner is the name of uid, or the number when no account has it.
func (in *inspector) owner(uid uint32) string {
	if name, ok := in.owners[uid]; ok {
		return name
	}
	name := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(name); err == nil {
		name = u.Username
	}
	in.owners[uid] = name
	return name
}

// group is the name of gid, or the number when no group has it.
func (in *inspector) group(gid uint32) string {
	if name, ok := in.groups[gid]; ok {
		return name
	}
	name := strconv.FormatUint(uint64(gid), 10)
	if g, err := user.LookupGroupId(name); err == nil {
		name = g.Name
	}
	in.groups[gid] = name
	return name
}

// readMetadata returns the user.e2b.* extended attributes of path without
// their prefix, or nil when there are none. Metadata is an annotation: a
// filesystem without xattrs or an unreadable attribute leaves it out rather
// than failing the whole stat.
func readMetadata(path string) map[string]string {
	names, err := listXattrs(path)
	if err != nil {
		return nil
	}
	var meta map[string]string
	for _, name := range names {
		key, ok := strings.CutPrefix(name, metadataPrefix)
		if !ok || key == "" {
			continue
		}
		value, err := getXattr(path, name)
		if err != nil {
			continue
		}
		if meta == nil {
			meta = map[string]string{}
		}
		meta[key] = value
	}
	return meta
}

func listXattrs(path string) ([]string, error) {
	// The list can grow between the size query and the read; retry a little.
	for range 3 {
		size, err := unix.Llistxattr(path, nil)
		if err != nil || size == 0 {
			return nil, err
		}
		buf := make([]byte, size)
		n, err := unix.Llistxattr(path, buf)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00"), nil
	}
	return nil, fmt.Errorf("list xattrs of %s: changing too fast", path)
}

func getXattr(path, name string) (string, error) {
	for range 3 {
		size, err := unix.Lgetxattr(path, name, nil)
		if err != nil || size == 0 {
			return "", err
		}
		buf := make([]byte, size)
		n, err := unix.Lgetxattr(path, name, buf)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("get xattr %s of %s: changing too fast", name, path)
}
