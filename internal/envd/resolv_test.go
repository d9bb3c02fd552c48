package envd

import "testing"

func TestResolvConf(t *testing.T) {
	got := string(resolvConf([]string{"10.255.255.53", "2001:db8::53"}))
	want := "# written by warren's envd at sandbox start\nnameserver 10.255.255.53\nnameserver 2001:db8::53\n"
	if got != want {
		t.Fatalf("resolv.conf = %q, want %q", got, want)
	}
}
