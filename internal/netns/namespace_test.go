package netns

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestNamedNetnsLeavesNoThreadInside: the thread that made a namespace is not
// left in it (a thread in it keeps it alive after deleteNamedNetns, and the
// main thread would keep it for the process's lifetime), and deleting the
// namespace leaves no mount point.
func TestNamedNetnsLeavesNoThreadInside(t *testing.T) {
	requireRoot(t)
	for i := range 20 {
		n := newTestNetns(t, fmt.Sprintf("thread%d", i))
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(netnsDir, n.name), &st); err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("net:[%d]", st.Ino)
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			t.Fatal(err)
		}
		for _, task := range tasks {
			link, err := os.Readlink(filepath.Join("/proc/self/task", task.Name(), "ns/net"))
			if err != nil {
				continue // the thread ended meanwhile
			}
			if link == want {
				t.Fatalf("thread %s of this process is still in %s (%s) after createNamedNetns", task.Name(), n.name, link)
			}
		}
	}
}
