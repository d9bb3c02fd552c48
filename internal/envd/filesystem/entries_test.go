package filesystem_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	rpc "github.com/warren-sh/warren/gen/filesystem"
)

func TestStat(t *testing.T) {
	e := newEnv(t)
	file := e.path("f.txt")
	e.writeFile(t, file, "hello")
	if err := unix.Setxattr(file, "user.e2b.foo", []byte("bar"), 0); err != nil {
		t.Fatalf("set xattr: %v", err)
	}
	e.mkdir(t, e.path("dir"))
	e.symlink(t, "f.txt", e.path("link-file"))
	e.symlink(t, e.path("dir"), e.path("link-dir"))
	e.symlink(t, "missing", e.path("dangling"))
	fileInfo, err := os.Lstat(file)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		path    string
		want    *rpc.EntryInfo // compared field by field, ModifiedTime aside
		wantMod bool           // check modified_time against the file's
	}{
		{"regular file", file, &rpc.EntryInfo{
			Name: "f.txt", Type: rpc.FileType_FILE_TYPE_FILE, Path: file, Size: 5, Mode: 0o644,
			Permissions: "-rw-r--r--", Owner: "user", Group: "user", Metadata: map[string]string{"foo": "bar"},
		}, true},
		{"directory", e.path("dir"), &rpc.EntryInfo{
			Name: "dir", Type: rpc.FileType_FILE_TYPE_DIRECTORY, Path: e.path("dir"), Size: 4096, Mode: 0o755,
			Permissions: "drwxr-xr-x", Owner: "user", Group: "user",
		}, false},
		{"symlink to a file has the file's type and mode", e.path("link-file"), &rpc.EntryInfo{
			Name: "link-file", Type: rpc.FileType_FILE_TYPE_FILE, Path: e.path("link-file"), Size: int64(len("f.txt")),
			Mode: 0o644, Permissions: "Lrwxrwxrwx", Owner: "user", Group: "user", SymlinkTarget: &file,
		}, false},
		{"symlink to a directory", e.path("link-dir"), &rpc.EntryInfo{
			Name: "link-dir", Type: rpc.FileType_FILE_TYPE_DIRECTORY, Path: e.path("link-dir"), Size: int64(len(e.path("dir"))),
			Mode: 0o755, Permissions: "Lrwxrwxrwx", Owner: "user", Group: "user", SymlinkTarget: ptr(e.path("dir")),
		}, false},
		{"dangling symlink has no type", e.path("dangling"), &rpc.EntryInfo{
			Name: "dangling", Type: rpc.FileType_FILE_TYPE_UNSPECIFIED, Path: e.path("dangling"), Size: int64(len("missing")),
			Mode: 0, Permissions: "Lrwxrwxrwx", Owner: "user", Group: "user", SymlinkTarget: ptr(e.path("missing")),
		}, false},
	}
	for _, c := range codecs {
		for _, tc := range tests {
			t.Run(c.name+"/"+tc.name, func(t *testing.T) {
				resp, err := e.client("user", c.opts...).Stat(ctx(t), connect.NewRequest(&rpc.StatRequest{Path: tc.path}))
				if err != nil {
					t.Fatal(err)
				}
				got := resp.Msg.GetEntry()
				checkEntry(t, got, tc.want)
				if tc.wantMod && !got.GetModifiedTime().AsTime().Equal(fileInfo.ModTime()) {
					t.Errorf("modified_time %v, want %v", got.GetModifiedTime().AsTime(), fileInfo.ModTime())
				}
			})
		}
		t.Run(c.name+"/missing path is not_found", func(t *testing.T) {
			_, err := e.client("user", c.opts...).Stat(ctx(t), connect.NewRequest(&rpc.StatRequest{Path: e.path("nope")}))
			wantCode(t, err, connect.CodeNotFound)
		})
	}
	t.Run("root sees root's files", func(t *testing.T) {
		resp, err := e.client("root").Stat(ctx(t), connect.NewRequest(&rpc.StatRequest{Path: "/root"}))
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.Msg.GetEntry(); got.GetOwner() != "root" || got.GetGroup() != "root" || got.GetType() != rpc.FileType_FILE_TYPE_DIRECTORY {
			t.Errorf("stat /root = %v, want a directory owned by root:root", got)
		}
	})
}

// checkEntry compares every EntryInfo field except modified_time.
func checkEntry(t *testing.T, got, want *rpc.EntryInfo) {
	t.Helper()
	if got.GetName() != want.GetName() || got.GetType() != want.GetType() || got.GetPath() != want.GetPath() ||
		got.GetSize() != want.GetSize() || got.GetMode() != want.GetMode() || got.GetPermissions() != want.GetPermissions() ||
		got.GetOwner() != want.GetOwner() || got.GetGroup() != want.GetGroup() {
		t.Errorf("entry\n got  name=%q type=%v path=%q size=%d mode=%o perms=%q owner=%q group=%q\n want name=%q type=%v path=%q size=%d mode=%o perms=%q owner=%q group=%q",
			got.GetName(), got.GetType(), got.GetPath(), got.GetSize(), got.GetMode(), got.GetPermissions(), got.GetOwner(), got.GetGroup(),
			want.GetName(), want.GetType(), want.GetPath(), want.GetSize(), want.GetMode(), want.GetPermissions(), want.GetOwner(), want.GetGroup())
	}
	switch {
	case want.SymlinkTarget == nil && got.SymlinkTarget != nil:
		t.Errorf("symlink_target = %q, want none on a non-link", got.GetSymlinkTarget())
	case want.SymlinkTarget != nil && got.GetSymlinkTarget() != want.GetSymlinkTarget():
		t.Errorf("symlink_target = %q, want %q", got.GetSymlinkTarget(), want.GetSymlinkTarget())
	}
	if len(got.GetMetadata()) != len(want.GetMetadata()) {
		t.Errorf("metadata = %v, want %v", got.GetMetadata(), want.GetMetadata())
	}
	for k, v := range want.GetMetadata() {
		if got.GetMetadata()[k] != v {
			t.Errorf("metadata = %v, want %v", got.GetMetadata(), want.GetMetadata())
		}
	}
	if got.GetModifiedTime() == nil {
		t.Errorf("modified_time missing")
	}
}

func ptr[T any](v T) *T { return &v }

func TestPathResolution(t *testing.T) {
	e := newEnv(t)
	e.writeFile(t, e.path("f.txt"), "x")
	rel := filepath.Base(e.dir) + "/f.txt"
	rootFile, err := os.CreateTemp("/root", "fstest-")
	if err != nil {
		t.Fatal(err)
	}
	rootFile.Close()
	t.Cleanup(func() { os.Remove(rootFile.Name()) })

	tests := []struct {
		name     string
		user     string
		path     string
		wantPath string
		wantCode connect.Code // 0: success
		wantMsg  string
	}{
		{"relative path is under the user's home", "user", rel, e.path("f.txt"), 0, ""},
		{"default user is user", "", rel, e.path("f.txt"), 0, ""},
		{"tilde is the user's home", "user", "~/" + rel, e.path("f.txt"), 0, ""},
		{"dot-dot is allowed", "user", filepath.Base(e.dir) + "/../" + rel, e.path("f.txt"), 0, ""},
		{"root's relative path is under /root", "root", filepath.Base(rootFile.Name()), rootFile.Name(), 0, ""},
		{"another user's home is invalid", "user", "~other/x", "", connect.CodeInvalidArgument, ""},
		{"unknown user", "nosuchuser", rel, "", connect.CodeUnauthenticated, "invalid username: 'nosuchuser'"},
	}
	for _, c := range codecs {
		for _, tc := range tests {
			t.Run(c.name+"/"+tc.name, func(t *testing.T) {
				resp, err := e.client(tc.user, c.opts...).Stat(ctx(t), connect.NewRequest(&rpc.StatRequest{Path: tc.path}))
				if tc.wantCode != 0 {
					wantCode(t, err, tc.wantCode)
					if tc.wantMsg != "" && connect.CodeOf(err) == tc.wantCode {
						var ce *connect.Error
						if errors.As(err, &ce) && ce.Message() != tc.wantMsg {
							t.Errorf("message %q, want %q", ce.Message(), tc.wantMsg)
						}
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if got := resp.Msg.GetEntry().GetPath(); got != tc.wantPath {
					t.Errorf("path %q, want %q", got, tc.wantPath)
				}
			})
		}
	}
}

func TestMakeDir(t *testing.T) {
	e := newEnv(t)
	e.writeFile(t, e.path("file"), "x")
	for _, c := range codecs {
		t.Run(c.name, func(t *testing.T) {
			fs := e.client("user", c.opts...)
			base := e.path(c.name)
			t.Run("new directory belongs to the user, mode 0755", func(t *testing.T) {
				resp, err := fs.MakeDir(ctx(t), connect.NewRequest(&rpc.MakeDirRequest{Path: base}))
				if err != nil {
					t.Fatal(err)
				}
				checkEntry(t, resp.Msg.GetEntry(), &rpc.EntryInfo{
					Name: c.name, Type: rpc.FileType_FILE_TYPE_DIRECTORY, Path: base, Size: 4096, Mode: 0o755,
					Permissions: "drwxr-xr-x", Owner: "user", Group: "user",
				})
				checkOwner(t, e, base, 0o755)
			})
			t.Run("missing parents are created, owned by the user", func(t *testing.T) {
				nested := filepath.Join(base, "a", "b", "c")
				if _, err := fs.MakeDir(ctx(t), connect.NewRequest(&rpc.MakeDirRequest{Path: nested})); err != nil {
					t.Fatal(err)
				}
				for _, p := range []string{filepath.Join(base, "a"), filepath.Join(base, "a", "b"), nested} {
					checkOwner(t, e, p, 0o755)
				}
			})
			t.Run("existing directory is already_exists", func(t *testing.T) {
				_, err := fs.MakeDir(ctx(t), connect.NewRequest(&rpc.MakeDirRequest{Path: base}))
				wantCode(t, err, connect.CodeAlreadyExists)
			})
			t.Run("existing file is invalid_argument", func(t *testing.T) {
				_, err := fs.MakeDir(ctx(t), connect.NewRequest(&rpc.MakeDirRequest{Path: e.path("file")}))
				wantCode(t, err, connect.CodeInvalidArgument)
			})
			t.Run("under a file is invalid_argument", func(t *testing.T) {
				_, err := fs.MakeDir(ctx(t), connect.NewRequest(&rpc.MakeDirRequest{Path: e.path("file", "sub")}))
				wantCode(t, err, connect.CodeInvalidArgument)
			})
			t.Run("user may not create in /root", func(t *testing.T) {
				p := "/root/fstest-denied-" + c.name
				_, err := fs.MakeDir(ctx(t), connect.NewRequest(&rpc.MakeDirRequest{Path: p}))
				wantCode(t, err, connect.CodePermissionDenied)
				if _, err := os.Lstat(p); !os.IsNotExist(err) {
					os.RemoveAll(p)
					t.Errorf("%s exists after a denied MakeDir", p)
				}
			})
		})
	}
	t.Run("root may create in /root", func(t *testing.T) {
		p := "/root/fstest-makedir"
		t.Cleanup(func() { os.RemoveAll(p) })
		resp, err := e.client("root").MakeDir(ctx(t), connect.NewRequest(&rpc.MakeDirRequest{Path: p}))
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.Msg.GetEntry(); got.GetOwner() != "root" || got.GetGroup() != "root" {
			t.Errorf("owner %s:%s, want root:root", got.GetOwner(), got.GetGroup())
		}
	})
}

// checkOwner checks on disk that p belongs to the test user with mode perm.
func checkOwner(t *testing.T, e *env, p string, perm os.FileMode) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	if int(st.Uid) != e.uid || int(st.Gid) != e.gid {
		t.Errorf("%s owned by %d:%d, want %d:%d", p, st.Uid, st.Gid, e.uid, e.gid)
	}
	if got := os.FileMode(st.Mode & 0o7777); got != perm {
		t.Errorf("%s has mode %o, want %o", p, got, perm)
	}
}

func TestMove(t *testing.T) {
	e := newEnv(t)
	for _, c := range codecs {
		t.Run(c.name, func(t *testing.T) {
			fs := e.client("user", c.opts...)
			src := e.path(c.name + "-src.txt")
			e.writeFile(t, src, "moved")
			t.Run("renames and returns the destination", func(t *testing.T) {
				dst := e.path(c.name + "-dst.txt")
				resp, err := fs.Move(ctx(t), connect.NewRequest(&rpc.MoveRequest{Source: src, Destination: dst}))
				if err != nil {
					t.Fatal(err)
				}
				checkEntry(t, resp.Msg.GetEntry(), &rpc.EntryInfo{
					Name: filepath.Base(dst), Type: rpc.FileType_FILE_TYPE_FILE, Path: dst, Size: 5, Mode: 0o644,
					Permissions: "-rw-r--r--", Owner: "user", Group: "user",
				})
				if _, err := os.Lstat(src); !os.IsNotExist(err) {
					t.Errorf("source still exists: %v", err)
				}
				if b, err := os.ReadFile(dst); err != nil || string(b) != "moved" {
					t.Errorf("destination holds %q, %v", b, err)
				}
				src = dst
			})
			t.Run("creates the destination's parents as the user", func(t *testing.T) {
				dst := e.path(c.name+"-new", "deeper", "f.txt")
				if _, err := fs.Move(ctx(t), connect.NewRequest(&rpc.MoveRequest{Source: src, Destination: dst})); err != nil {
					t.Fatal(err)
				}
				checkOwner(t, e, e.path(c.name+"-new"), 0o755)
				checkOwner(t, e, e.path(c.name+"-new", "deeper"), 0o755)
				if _, err := os.Lstat(dst); err != nil {
					t.Errorf("destination missing: %v", err)
				}
			})
			t.Run("missing source is not_found", func(t *testing.T) {
				_, err := fs.Move(ctx(t), connect.NewRequest(&rpc.MoveRequest{Source: e.path("nope"), Destination: e.path("nope2", "x")}))
				wantCode(t, err, connect.CodeNotFound)
				if _, err := os.Lstat(e.path("nope2")); !os.IsNotExist(err) {
					t.Errorf("destination parent created for a missing source")
				}
			})
		})
	}
}

func TestListDir(t *testing.T) {
	e := newEnv(t)
	e.writeFile(t, e.path("a.txt"), "a")
	e.writeFile(t, e.path("sub", "b.txt"), "b")
	e.writeFile(t, e.path("sub", "deep", "c.txt"), "c")
	e.chown(t, e.path("sub"))
	e.chown(t, e.path("sub", "deep"))
	e.symlink(t, "sub", e.path("link"))
	e.symlink(t, "loop2", e.path("loop1"))
	e.symlink(t, "loop1", e.path("loop2"))

	tests := []struct {
		name  string
		path  string
		depth uint32
		want  []string // paths relative to the scratch dir, in order
	}{
		{"depth 0 means 1", e.dir, 0, []string{"a.txt", "link", "loop1", "loop2", "sub"}},
		{"depth 1 does not descend", e.dir, 1, []string{"a.txt", "link", "loop1", "loop2", "sub"}},
		{"depth 2 descends one level, not through links", e.dir, 2, []string{"a.txt", "link", "loop1", "loop2", "sub", "sub/b.txt", "sub/deep"}},
		{"depth 3", e.dir, 3, []string{"a.txt", "link", "loop1", "loop2", "sub", "sub/b.txt", "sub/deep", "sub/deep/c.txt"}},
		{"symlinked root is followed; paths stay under it", e.path("link"), 2, []string{"link/b.txt", "link/deep", "link/deep/c.txt"}},
	}
	for _, c := range codecs {
		fs := e.client("user", c.opts...)
		for _, tc := range tests {
			t.Run(c.name+"/"+tc.name, func(t *testing.T) {
				resp, err := fs.ListDir(ctx(t), connect.NewRequest(&rpc.ListDirRequest{Path: tc.path, Depth: tc.depth}))
				if err != nil {
					t.Fatal(err)
				}
				var got []string
				for _, entry := range resp.Msg.GetEntries() {
					rel, _ := filepath.Rel(e.dir, entry.GetPath())
					got = append(got, rel)
					if entry.GetName() != filepath.Base(entry.GetPath()) {
						t.Errorf("entry %s has name %q", entry.GetPath(), entry.GetName())
					}
				}
				if !slices.Equal(got, tc.want) {
					t.Errorf("entries %v, want %v", got, tc.want)
				}
			})
		}
		t.Run(c.name+"/entries are described fully", func(t *testing.T) {
			resp, err := fs.ListDir(ctx(t), connect.NewRequest(&rpc.ListDirRequest{Path: e.dir}))
			if err != nil {
				t.Fatal(err)
			}
			byName := map[string]*rpc.EntryInfo{}
			for _, entry := range resp.Msg.GetEntries() {
				byName[entry.GetName()] = entry
			}
			checkEntry(t, byName["a.txt"], &rpc.EntryInfo{Name: "a.txt", Type: rpc.FileType_FILE_TYPE_FILE, Path: e.path("a.txt"),
				Size: 1, Mode: 0o644, Permissions: "-rw-r--r--", Owner: "user", Group: "user"})
			checkEntry(t, byName["link"], &rpc.EntryInfo{Name: "link", Type: rpc.FileType_FILE_TYPE_DIRECTORY, Path: e.path("link"),
				Size: 3, Mode: 0o755, Permissions: "Lrwxrwxrwx", Owner: "user", Group: "user", SymlinkTarget: ptr(e.path("sub"))})
		})
		errorCases := []struct {
			name string
			path string
			code connect.Code
		}{
			{"a file is invalid_argument", e.path("a.txt"), connect.CodeInvalidArgument},
			{"a missing path is not_found", e.path("nope"), connect.CodeNotFound},
			{"a symlink loop is failed_precondition", e.path("loop1"), connect.CodeFailedPrecondition},
			{"an unreadable directory is permission_denied", "/root", connect.CodePermissionDenied},
		}
		for _, tc := range errorCases {
			t.Run(c.name+"/"+tc.name, func(t *testing.T) {
				_, err := fs.ListDir(ctx(t), connect.NewRequest(&rpc.ListDirRequest{Path: tc.path}))
				wantCode(t, err, tc.code)
			})
		}
	}
	t.Run("root may list /root", func(t *testing.T) {
		if _, err := e.client("root").ListDir(ctx(t), connect.NewRequest(&rpc.ListDirRequest{Path: "/root"})); err != nil {
			t.Fatal(err)
		}
	})
}

func TestRemove(t *testing.T) {
	e := newEnv(t)
	for _, c := range codecs {
		t.Run(c.name, func(t *testing.T) {
			fs := e.client("user", c.opts...)
			t.Run("removes a tree", func(t *testing.T) {
				top := e.path(c.name + "-tree")
				e.writeFile(t, filepath.Join(top, "a", "b.txt"), "b")
				e.chown(t, top)
				e.chown(t, filepath.Join(top, "a"))
				if _, err := fs.Remove(ctx(t), connect.NewRequest(&rpc.RemoveRequest{Path: top})); err != nil {
					t.Fatal(err)
				}
				if _, err := os.Lstat(top); !os.IsNotExist(err) {
					t.Errorf("%s still exists: %v", top, err)
				}
			})
			t.Run("a missing path is no error", func(t *testing.T) {
				if _, err := fs.Remove(ctx(t), connect.NewRequest(&rpc.RemoveRequest{Path: e.path("nope")})); err != nil {
					t.Fatal(err)
				}
			})
			t.Run("user may not remove root's files", func(t *testing.T) {
				f, err := os.CreateTemp("/root", "fstest-")
				if err != nil {
					t.Fatal(err)
				}
				f.Close()
				t.Cleanup(func() { os.Remove(f.Name()) })
				_, err = fs.Remove(ctx(t), connect.NewRequest(&rpc.RemoveRequest{Path: f.Name()}))
				wantCode(t, err, connect.CodePermissionDenied)
				if _, err := os.Lstat(f.Name()); err != nil {
					t.Errorf("root's file is gone: %v", err)
				}
			})
			t.Run("another user's home is invalid_argument", func(t *testing.T) {
				_, err := fs.Remove(ctx(t), connect.NewRequest(&rpc.RemoveRequest{Path: "~other/x"}))
				wantCode(t, err, connect.CodeInvalidArgument)
			})
		})
	}
}
