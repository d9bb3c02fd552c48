package templatecli

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
)

func TestSelectFiles(t *testing.T) {
	dir := makeContext(t)
	ignore, err := ReadDockerignore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"*.log", "app/*.log", "node_modules/**"}; !slices.Equal(ignore, want) {
		t.Fatalf(".dockerignore patterns %q, want %q", ignore, want)
	}
	tests := []struct {
		src    string
		ignore []string
		want   []string
	}{
		{"app/sub", ignore, []string{"app/sub", "app/sub/run.sh"}},
		{"./app/sub/", ignore, []string{"app/sub", "app/sub/run.sh"}},
		{"*.txt", ignore, []string{"one.txt", "two.txt"}},
		{"app/*.py", ignore, []string{"app/link.py", "app/main.py"}},
		{"app/{main,data}.*", ignore, []string{"app/data.txt", "app/main.py"}},
		{"app/[!.dl]*", ignore, []string{"app/confdir", "app/main.py", "app/sub", "app/sub/run.sh"}},
		// A symlinked directory matched as such is copied as a link; below a
		// directory ("<dir>/**/*") one symlinked level is followed.
		{"app/confdir", ignore, []string{"app/confdir"}},
		{"app", []string{"app/sub/**", "app/.*"}, []string{"app", "app/confdir", "app/confdir/a.conf", "app/confdir/deep",
			"app/data.txt", "app/debug.log", "app/link.py", "app/main.py"}},
		// "**" first never follows symlinks; dot files match.
		{"**/*.conf", ignore, []string{"conf/a.conf", "conf/deep/b.conf"}},
		{"app/**/.hidden", ignore, []string{"app/.hidden"}},
		// The context itself ("**/*": no symlink followed); node_modules/**
		// drops node_modules and what is below it.
		{".", ignore, []string{"", ".dockerignore", "app", "app/.hidden", "app/confdir", "app/data.txt", "app/link.py", "app/main.py", "app/sub", "app/sub/run.sh",
			"conf", "conf/a.conf", "conf/deep", "conf/deep/b.conf", "one.txt", "two.txt"}},
		// As in the SDK, a pattern without "/**" drops only what it names.
		{"node_modules", []string{"node_modules/m"}, []string{"node_modules", "node_modules/m/index.js"}},
		{"conf", []string{"/" + filepath.ToSlash(dir[1:]) + "/conf/deep/**"}, []string{"conf", "conf/a.conf"}},
	}
	for _, tt := range tests {
		files, err := selectFiles(dir, tt.src, tt.ignore)
		if err != nil {
			t.Errorf("%s: %v", tt.src, err)
			continue
		}
		var got []string
		for _, f := range files {
			got = append(got, f.rel)
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("COPY %s (ignore %q):\n got  %q\n want %q", tt.src, tt.ignore, got, tt.want)
		}
	}
}

func TestFilesHash(t *testing.T) {
	dir := makeContext(t)
	hash := func(src, dest string) string {
		t.Helper()
		h, err := FilesHash(dir, src, dest, nil)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	a := hash("app", "/x")
	if b := hash("app", "/x"); a != b {
		t.Errorf("the hash is not stable: %s, %s", a, b)
	}
	if hash("app", "/y") == a {
		t.Errorf("the destination is not part of the hash")
	}
	// Content, mode and names count; times do not.
	changes := []func(){
		func() { os.WriteFile(filepath.Join(dir, "app/main.py"), []byte("print('bye')\n"), 0o644) },
		func() { os.Chmod(filepath.Join(dir, "app/main.py"), 0o755) },
		func() { os.Rename(filepath.Join(dir, "app/data.txt"), filepath.Join(dir, "app/data2.txt")) },
	}
	for i, change := range changes {
		before := hash("app", "/x")
		change()
		if hash("app", "/x") == before {
			t.Errorf("change %d does not change the hash", i)
		}
	}
	before := hash("app", "/x")
	os.Chtimes(filepath.Join(dir, "app/main.py"), timeZero, timeZero)
	if hash("app", "/x") != before {
		t.Errorf("a new mtime changes the hash")
	}
}

func TestWriteTarGz(t *testing.T) {
	dir := makeContext(t)
	var buf bytes.Buffer
	if err := WriteTarGz(&buf, dir, ".", []string{"node_modules/**", "app/**", "*.txt"}); err != nil {
		t.Fatal(err)
	}
	var got []tarEntry
	for _, e := range readTarGz(t, buf.Bytes()) {
		got = append(got, tarEntry{Name: e.Name, Type: e.Type, Mode: e.Mode, Link: e.Link, Size: e.Size})
	}
	want := []tarEntry{
		{Name: "./", Type: tar.TypeDir, Mode: modeOf(t, dir)},
		{Name: ".dockerignore", Type: tar.TypeReg, Mode: 0o644, Size: 40},
		{Name: "conf/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "conf/a.conf", Type: tar.TypeReg, Mode: 0o644, Size: 4},
		{Name: "conf/deep/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "conf/deep/b.conf", Type: tar.TypeReg, Mode: 0o644, Size: 4},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("entries\n got  %+v\n want %+v", got, want)
	}

	buf.Reset()
	if err := WriteTarGz(&buf, dir, "app/*", []string{"*.log"}); err != nil {
		t.Fatal(err)
	}
	var links []tarEntry
	for _, e := range readTarGz(t, buf.Bytes()) {
		if e.Type == tar.TypeSymlink {
			links = append(links, tarEntry{Name: e.Name, Type: e.Type, Link: e.Link})
		}
	}
	wantLinks := []tarEntry{{Name: "app/confdir", Type: tar.TypeSymlink, Link: "../conf"}, {Name: "app/link.py", Type: tar.TypeSymlink, Link: "main.py"}}
	if !reflect.DeepEqual(links, wantLinks) {
		t.Errorf("symlinks %+v, want %+v", links, wantLinks)
	}
}

func modeOf(t *testing.T, p string) int64 {
	info, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return int64(info.Mode().Perm())
}
