package template_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/warren-sh/warren/internal/netns"
	"github.com/warren-sh/warren/internal/template"
)

// BenchmarkBuild measures a three-step template build from base (a COPY, a
// RUN and an ENV, with a start command): cold (Force: every layer built
// again) and cached (unchanged: no VM runs).
//
//	go test -run '^$' -bench BenchmarkBuild -benchtime 3x ./internal/template
func BenchmarkBuild(b *testing.B) {
	pool := newPool(b)
	base := ensureBase(b, pool)
	builder, _ := newBuilder(b, pool, base)
	files := writeContext(b, map[string]string{"app/": "", "app/main.py": "print('hi')\n"})
	steps := []template.Step{
		{Type: "COPY", Args: []string{"app", "/home/user/app", "", ""}, FilesHash: "h"},
		{Type: "RUN", Args: []string{"python3 -m compileall -q /home/user/app"}},
		{Type: "ENV", Args: []string{"APP", "1"}},
	}
	n := 0
	build := func(b *testing.B, force bool) {
		n++
		_, err := builder.Build(context.Background(), template.BuildRequest{
			BuildID: fmt.Sprintf("bench-%d", n), TemplateID: "bench", From: template.Source{Template: base},
			Steps: steps, Force: force, StartCmd: "python3 -m http.server 8000",
			ReadyCmd: `[ -n "$(ss -Htuln sport = :8000)" ]`, CPUs: base.CPUs, MemoryMiB: base.MemoryMiB,
			Files: func(string) (string, error) { return files, nil },
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			build(b, true)
		}
	})
	b.Run("cached", func(b *testing.B) {
		for b.Loop() {
			build(b, false)
		}
	})
	// Sandboxes of the built template against sandboxes of base: a restore
	// until envd answers /health.
	built, err := builder.Build(context.Background(), template.BuildRequest{
		BuildID: "bench-restore", TemplateID: "bench", From: template.Source{Template: base}, Steps: steps,
		StartCmd: "python3 -m http.server 8000", ReadyCmd: `[ -n "$(ss -Htuln sport = :8000)" ]`,
		CPUs: base.CPUs, MemoryMiB: base.MemoryMiB, Files: func(string) (string, error) { return files, nil },
	})
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		a    *template.Artifact
	}{{"restore/base", base}, {"restore/built", built}} {
		b.Run(c.name, func(b *testing.B) {
			i := 0
			for b.Loop() {
				i++
				restoreOnce(b, pool, c.a, fmt.Sprintf("bench-%s-%d", c.a.BuildID, i))
			}
		})
	}
}

// restoreOnce restores a VM from a and waits for envd's /health, then kills it.
func restoreOnce(b *testing.B, pool *netns.Pool, a *template.Artifact, id string) {
	slot, err := pool.Acquire(context.Background(), netns.Policy{})
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Release(slot)
	vm, err := rt.Start(context.Background(), a.Spec(id, slot))
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		b.StopTimer()
		rt.Kill(context.Background(), vm)
		b.StartTimer()
	}()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Second}
	url := "http://" + net.JoinHostPort(slot.SlotIP.String(), "49983") + "/health"
	for deadline := time.Now().Add(30 * time.Second); ; {
		if resp, err := client.Get(url); err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("envd did not answer")
		}
		time.Sleep(2 * time.Millisecond)
	}
}
