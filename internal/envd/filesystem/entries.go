package filesystem

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"connectrpc.com/connect"

	rpc "github.com/warren-sh/warren/gen/filesystem"
)

// Stat describes the path itself; a symlink is not followed (ENVD.md §7).
func (s *Service) Stat(ctx context.Context, req *connect.Request[rpc.StatRequest]) (*connect.Response[rpc.StatResponse], error) {
	u, err := s.caller(req.Header())
	if err != nil {
		return nil, err
	}
	path, err := s.resolve(u, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	var entry *rpc.EntryInfo
	err = u.Do(func() error {
		entry, err = newInspector().entry(path)
		return err
	})
	if err != nil {
		return nil, pathError("stat", path, err)
	}
	return connect.NewResponse(&rpc.StatResponse{Entry: entry}), nil
}

// MakeDir creates a directory and its missing parents, owned by the caller.
// An existing directory is already_exists, which the SDK turns into false.
func (s *Service) MakeDir(ctx context.Context, req *connect.Request[rpc.MakeDirRequest]) (*connect.Response[rpc.MakeDirResponse], error) {
	u, err := s.caller(req.Header())
	if err != nil {
		return nil, err
	}
	path, err := s.resolve(u, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	var entry *rpc.EntryInfo
	err = u.Do(func() error {
		if info, err := os.Stat(path); err == nil {
			if info.IsDir() {
				return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("directory '%s' already exists", path))
			}
			return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path '%s' already exists and is not a directory", path))
		} else if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
			return err
		}
		if err := makeDirs(path); err != nil {
			if errors.Is(err, syscall.ENOTDIR) {
				return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("make directory '%s': a parent is not a directory", path))
			}
			return err
		}
		entry, err = newInspector().entry(path)
		return err
	})
	if err != nil {
		return nil, pathError("make directory", path, err)
	}
	return connect.NewResponse(&rpc.MakeDirResponse{Entry: entry}), nil
}

// makeDirs creates dir and its missing parents with mode 0755 whatever the
// umask. Run inside User.Do, so the new directories belong to the user.
func makeDirs(dir string) error {
	info, err := os.Stat(dir)
	if err == nil {
		if info.IsDir() {
			return nil
		}
		return &fs.PathError{Op: "mkdir", Path: dir, Err: syscall.ENOTDIR}
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := makeDirs(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		// Someone else made it meanwhile: fine if it is a directory.
		if info, statErr := os.Stat(dir); errors.Is(err, fs.ErrExist) && statErr == nil && info.IsDir() {
			return nil
		}
		return err
	}
	return os.Chmod(dir, 0o755)
}

// Move renames source to destination, creating the destination's parents,
// and describes the destination (the SDK requires the entry).
func (s *Service) Move(ctx context.Context, req *connect.Request[rpc.MoveRequest]) (*connect.Response[rpc.MoveResponse], error) {
	u, err := s.caller(req.Header())
	if err != nil {
		return nil, err
	}
	source, err := s.resolve(u, req.Msg.GetSource())
	if err != nil {
		return nil, err
	}
	destination, err := s.resolve(u, req.Msg.GetDestination())
	if err != nil {
		return nil, err
	}
	var entry *rpc.EntryInfo
	err = u.Do(func() error {
		if _, err := os.Lstat(source); err != nil {
			return pathError("move", source, err)
		}
		if err := makeDirs(filepath.Dir(destination)); err != nil {
			return pathError("make directory", filepath.Dir(destination), err)
		}
		if err := os.Rename(source, destination); err != nil {
			return pathError("move '"+source+"' to", destination, err)
		}
		entry, err = newInspector().entry(destination)
		return err
	})
	if err != nil {
		return nil, pathError("stat", destination, err)
	}
	return connect.NewResponse(&rpc.MoveResponse{Entry: entry}), nil
}

// ListDir lists a directory (through a symlink at the root) down to depth
// levels, never following links below the root.
func (s *Service) ListDir(ctx context.Context, req *connect.Request[rpc.ListDirRequest]) (*connect.Response[rpc.ListDirResponse], error) {
	u, err := s.caller(req.Header())
	if err != nil {
		return nil, err
	}
	path, err := s.resolve(u, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	depth := int(req.Msg.GetDepth())
	if depth == 0 {
		depth = 1
	}
	var entries []*rpc.EntryInfo
	err = u.Do(func() error {
		info, err := os.Stat(path)
		if err != nil {
			if errors.Is(err, syscall.ELOOP) {
				return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("list '%s': symlink loop", path))
			}
			return err
		}
		if !info.IsDir() {
			return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path '%s' is not a directory", path))
		}
		entries, err = list(ctx, newInspector(), path, depth)
		return err
	})
	if err != nil {
		return nil, pathError("list", path, err)
	}
	return connect.NewResponse(&rpc.ListDirResponse{Entries: entries}), nil
}

// list walks dir depth-first in name order down to depth levels. Entries that
// vanish while it walks are left out; so are the contents of subdirectories
// the user may not read (the subdirectory itself is listed).
func list(ctx context.Context, in *inspector, dir string, depth int) ([]*rpc.EntryInfo, error) {
	var entries []*rpc.EntryInfo
	var visit func(dir string, level int, top bool) error
	visit = func(dir string, level int, top bool) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		names, err := readNames(dir)
		if err != nil {
			if top || !(errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission)) {
				return err
			}
			return nil
		}
		for _, name := range names {
			p := filepath.Join(dir, name)
			e, err := in.entry(p)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return err
			}
			entries = append(entries, e)
			if level < depth && isRealDir(e) {
				if err := visit(p, level+1, false); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return entries, visit(dir, 1, true)
}

// readNames returns the names in dir, sorted.
func readNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	slices.Sort(names)
	return names, nil
}

// Remove deletes a path and everything under it; a missing path is no error.
func (s *Service) Remove(ctx context.Context, req *connect.Request[rpc.RemoveRequest]) (*connect.Response[rpc.RemoveResponse], error) {
	u, err := s.caller(req.Header())
	if err != nil {
		return nil, err
	}
	path, err := s.resolve(u, req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	if err := u.Do(func() error { return os.RemoveAll(path) }); err != nil {
		return nil, pathError("remove", path, err)
	}
	return connect.NewResponse(&rpc.RemoveResponse{}), nil
}
