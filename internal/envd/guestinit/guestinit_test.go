package guestinit

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestReadConfig(t *testing.T) {
	tests := []struct {
		name    string
		env     map[string]string
		want    config
		wantErr string
	}{
		{
			name: "nothing set: no network, default hostname",
			want: config{hostname: DefaultHostname},
		},
		{
			name: "address, gateway and hostname",
			env:  map[string]string{EnvAddr: "10.11.0.2/30", EnvGateway: "10.11.0.1", EnvHostname: "box"},
			want: config{hostname: "box", net: &Network{Addr: netip.MustParsePrefix("10.11.0.2/30"), Gateway: netip.MustParseAddr("10.11.0.1")}},
		},
		{
			name: "address without gateway",
			env:  map[string]string{EnvAddr: "10.11.0.2/30"},
			want: config{hostname: DefaultHostname, net: &Network{Addr: netip.MustParsePrefix("10.11.0.2/30")}},
		},
		{name: "address without prefix", env: map[string]string{EnvAddr: "10.11.0.2"}, wantErr: `warren_ip="10.11.0.2"`},
		{name: "IPv6 address", env: map[string]string{EnvAddr: "fd00::2/64"}, wantErr: "not an IPv4 address"},
		{name: "gateway outside the subnet", env: map[string]string{EnvAddr: "10.11.0.2/30", EnvGateway: "10.12.0.1"}, wantErr: "inside 10.11.0.0/30"},
		{name: "gateway without address", env: map[string]string{EnvGateway: "10.11.0.1"}, wantErr: "needs warren_ip"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, k := range []string{EnvAddr, EnvGateway, EnvHostname} {
				t.Setenv(k, tt.env[k]) // restores the old value after the test
			}
			got, err := readConfig()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("readConfig() error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("readConfig(): %v", err)
			}
			if got.hostname != tt.want.hostname || (got.net == nil) != (tt.want.net == nil) ||
				(got.net != nil && *got.net != *tt.want.net) {
				t.Fatalf("readConfig() = %+v (net %+v), want %+v (net %+v)", got, got.net, tt.want, tt.want.net)
			}
			for _, k := range []string{EnvAddr, EnvGateway, EnvHostname} {
				if v, ok := os.LookupEnv(k); ok {
					t.Errorf("%s=%q is still in the environment; processes would inherit it", k, v)
				}
			}
		})
	}
}

// TestNetlink runs the rtnetlink requests in a fresh network namespace (root
// only), where they must not touch the host's interfaces.
func TestNetlink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	errc := make(chan error, 1)
	var addrs []net.Addr
	go func() {
		// The thread never leaves the new namespace: it ends with the goroutine,
		// because it stays locked.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		if err := linkUp("lo"); err != nil {
			errc <- err
			return
		}
		index, err := linkIndex("lo")
		if err != nil {
			errc <- err
			return
		}
		if err := addAddr(index, netip.MustParsePrefix("10.77.0.2/30")); err != nil {
			errc <- err
			return
		}
		if err := addDefaultRoute(index, netip.MustParseAddr("10.77.0.1")); err != nil {
			errc <- err
			return
		}
		// The kernel's error reply must come back as an error.
		if err := addAddr(index, netip.MustParsePrefix("10.77.0.2/30")); !errors.Is(err, unix.EEXIST) {
			errc <- fmt.Errorf("adding the address twice: %v, want EEXIST", err)
			return
		}
		iface, err := net.InterfaceByIndex(index)
		if err != nil {
			errc <- err
			return
		}
		addrs, err = iface.Addrs()
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, a := range addrs {
		found = found || a.String() == "10.77.0.2/30"
	}
	if !found {
		t.Fatalf("lo addresses %v lack 10.77.0.2/30", addrs)
	}
}

// TestBootRefusesOutsidePID1: init mode mounts over /dev and switches root,
// which must never happen to a host that ran `envd --init` by mistake.
func TestBootRefusesOutsidePID1(t *testing.T) {
	var console strings.Builder
	err := Boot(&console)
	if err == nil || !strings.Contains(err.Error(), "needs PID 1") {
		t.Fatalf("Boot as PID %d: err = %v, want a refusal naming PID 1", os.Getpid(), err)
	}
	if _, statErr := os.Stat("/newroot"); statErr == nil {
		t.Errorf("Boot left /newroot behind on the host")
	}
}
