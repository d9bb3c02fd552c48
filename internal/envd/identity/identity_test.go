package identity

import (
	"errors"
	"net/http"
	"testing"

	"connectrpc.com/connect"
)

func TestResolve(t *testing.T) {
	u := &User{Name: "user", Home: "/home/user"}
	cases := []struct {
		path, workdir, want string
		bad                 bool
	}{
		{path: "", want: "/home/user"},
		{path: "", workdir: "/srv/app", want: "/srv/app"},
		{path: "", workdir: "proj", want: "/home/user/proj"},
		{path: "~", want: "/home/user"},
		{path: "~/a/b", want: "/home/user/a/b"},
		{path: "a/../b", want: "/home/user/b"},
		{path: "../../etc", want: "/etc"},
		{path: "/tmp//x/", want: "/tmp/x"},
		{path: "~root/x", bad: true},
	}
	for _, c := range cases {
		got, err := u.Resolve(c.path, c.workdir)
		if c.bad {
			if !errors.Is(err, ErrBadPath) {
				t.Errorf("Resolve(%q) = %q, %v; want ErrBadPath", c.path, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("Resolve(%q, %q) = %q, %v; want %q", c.path, c.workdir, got, err, c.want)
		}
	}
}

func TestFromBasicAuth(t *testing.T) {
	cases := []struct {
		header, want string
		unknownName  string
	}{
		{header: "", want: "root"},                           // default
		{header: "Basic cm9vdDo=", want: "root"},             // "root:"
		{header: "basic cm9vdDpwYXNzd29yZA==", want: "root"}, // "root:password", scheme case-insensitive
		{header: "Basic bm8tc3VjaC11c2VyLWhlcmU6", unknownName: "no-such-user-here"},
		{header: "Bearer abc", unknownName: "Bearer abc"},
		{header: "Basic !!!", unknownName: "Basic !!!"},
	}
	for _, c := range cases {
		u, err := FromBasicAuth(c.header, "root")
		if c.unknownName != "" {
			var unknown *UnknownUserError
			if !errors.As(err, &unknown) || unknown.Name != c.unknownName || !errors.Is(err, ErrUnknownUser) {
				t.Errorf("FromBasicAuth(%q) = %v, %v; want unknown user %q", c.header, u, err, c.unknownName)
			}
			continue
		}
		if err != nil || u.Name != c.want {
			t.Errorf("FromBasicAuth(%q) = %v, %v; want %s", c.header, u, err, c.want)
		}
	}
}

func TestForRPCUnknownUser(t *testing.T) {
	h := http.Header{}
	h.Set("Authorization", "Basic bm9ib2R5LWF0LWFsbDo=") // "nobody-at-all:"
	_, err := ForRPC(h, "root")
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("code %v, want unauthenticated", connect.CodeOf(err))
	}
	if msg := err.(*connect.Error).Message(); msg != "invalid username: 'nobody-at-all'" {
		t.Fatalf("message %q", msg)
	}
}
