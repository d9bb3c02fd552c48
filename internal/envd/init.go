package envd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/warren-sh/warren/internal/envd/identity"
	"github.com/warren-sh/warren/internal/envd/reply"
	"github.com/warren-sh/warren/internal/version"
)

// initRequest is the body of POST /init (E2B envd's names).
type initRequest struct {
	EnvVars        map[string]string `json:"envVars"`
	AccessToken    *string           `json:"accessToken"`
	Timestamp      *time.Time        `json:"timestamp"`
	DefaultUser    *string           `json:"defaultUser"`
	DefaultWorkdir *string           `json:"defaultWorkdir"`
	// Entropy is a warren extension (base64 in JSON): random bytes from the
	// node that envd in a VM mixes into the kernel's pool before reseeding the
	// kernel RNG with them. Clones of one snapshot resume with the same RNG
	// state and would otherwise hand out the same "random" bytes. E2B's envd
	// ignores the field, and so does envd on a host.
	Entropy []byte `json:"entropy"`
	// DNS is a warren extension: the nameservers the guest uses, written to
	// /etc/resolv.conf in a VM.
	DNS []string `json:"dns"`
}

// InitSecretHeader carries Config.InitSecret on /init calls from the node.
const InitSecretHeader = "X-Warren-Init-Secret"

// maxInitBody bounds /init; it carries a few env vars and strings.
const maxInitBody = 1 << 20

// maxEntropy bounds initRequest.Entropy: the kernel's input pool is 256 bits,
// so more bytes than this add nothing.
const maxEntropy = 512

func (s *Server) handleInit(w http.ResponseWriter, r *http.Request) {
	// Once a token is set only its holder, or the node with the init secret, may
	// change the sandbox's configuration.
	if s.state.AccessToken() != "" && !s.state.TokenMatches(r.Header.Get("X-Access-Token")) &&
		!s.initSecretMatches(r.Header.Get(InitSecretHeader)) {
		reply.Error(w, http.StatusUnauthorized, unauthorizedMessage)
		return
	}
	began := time.Now()
	var req initRequest
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxInitBody))
	if err != nil {
		reply.Error(w, http.StatusBadRequest, "read /init body: %v", err)
		return
	}
	if len(bytes.TrimSpace(body)) > 0 {
		if err := json.Unmarshal(body, &req); err != nil {
			reply.Error(w, http.StatusBadRequest, "invalid /init body: %v", err)
			return
		}
	}
	// A restored clone's /init names the user the template already has: no
	// need to read the user database again on the create path.
	if req.DefaultUser != nil && *req.DefaultUser != "" && *req.DefaultUser != s.state.DefaultUser() {
		if _, err := identity.Lookup(*req.DefaultUser); err != nil {
			reply.Error(w, http.StatusBadRequest, "defaultUser: %v", err)
			return
		}
	}
	if len(req.Entropy) > maxEntropy {
		reply.Error(w, http.StatusBadRequest, "entropy: %d bytes, at most %d", len(req.Entropy), maxEntropy)
		return
	}
	for _, ns := range req.DNS {
		if _, err := netip.ParseAddr(ns); err != nil {
			reply.Error(w, http.StatusBadRequest, "dns: %q is not an IP address", ns)
			return
		}
	}
	timing := serverTiming{last: began}
	timing.mark("parse")
	if len(req.DNS) > 0 && s.cfg.InVM {
		if err := os.WriteFile("/etc/resolv.conf", resolvConf(req.DNS), 0o644); err != nil {
			s.cfg.Log.Warn("write /etc/resolv.conf", "err", err)
		}
	}
	timing.mark("dns")
	if req.Timestamp != nil && s.cfg.InVM {
		if err := setClock(*req.Timestamp); err != nil {
			s.cfg.Log.Error("set clock from /init", "err", err)
		}
	}
	timing.mark("clock")
	// Like the clock, the kernel RNG is the VM's own only in a VM (InVM).
	// A clone that cannot reseed must not run: it would share its keys.
	if len(req.Entropy) > 0 && s.cfg.InVM {
		if err := reseedRandom(req.Entropy); err != nil {
			reply.Error(w, http.StatusInternalServerError, "reseed the kernel RNG: %v", err)
			return
		}
	}
	timing.mark("rng")
	s.state.MergeEnvVars(req.EnvVars)
	if s.cfg.InVM {
		if err := writeSandboxFiles(s.state.EnvVars()); err != nil {
			s.cfg.Log.Warn("write /run/e2b", "err", err)
		}
	}
	timing.mark("files")
	if req.DefaultUser != nil && *req.DefaultUser != "" {
		s.state.SetDefaultUser(*req.DefaultUser)
	}
	if req.DefaultWorkdir != nil {
		s.state.SetDefaultWorkdir(*req.DefaultWorkdir)
	}
	if req.AccessToken != nil {
		s.state.SetAccessToken(*req.AccessToken)
	}
	w.Header().Set("X-Envd-Version", version.EnvdVersion)
	w.Header().Set("Server-Timing", timing.String())
	w.WriteHeader(http.StatusNoContent)
}

// serverTiming is /init's Server-Timing header (W3C Server Timing): how long
// each step took in the guest, for the node's debug log.
type serverTiming struct {
	last  time.Time
	steps []string
}

// mark ends the step name: its time since the previous mark.
func (t *serverTiming) mark(name string) {
	now := time.Now()
	t.steps = append(t.steps, fmt.Sprintf("%s;dur=%.3f", name, float64(now.Sub(t.last).Microseconds())/1000))
	t.last = now
}

func (t *serverTiming) String() string { return strings.Join(t.steps, ", ") }

// resolvConf is /etc/resolv.conf naming the given nameservers.
func resolvConf(nameservers []string) []byte {
	var b strings.Builder
	b.WriteString("# written by warren's envd at sandbox start\n")
	for _, ns := range nameservers {
		b.WriteString("nameserver " + ns + "\n")
	}
	return []byte(b.String())
}

// writeSandboxFiles writes E2B's identity files /run/e2b/.E2B_SANDBOX,
// .E2B_SANDBOX_ID and .E2B_TEMPLATE_ID (ENVD.md §12), readable by every user.
func writeSandboxFiles(env map[string]string) error {
	const dir = "/run/e2b"
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, name := range []string{"E2B_SANDBOX", "E2B_SANDBOX_ID", "E2B_TEMPLATE_ID"} {
		if v, ok := env[name]; ok {
			if err := os.WriteFile(dir+"/."+name, []byte(v), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *Server) initSecretMatches(got string) bool {
	return s.cfg.InitSecret != "" && got != "" && constantTimeEqual(got, s.cfg.InitSecret)
}

// setClock steps the wall clock to t when it is off by more than 10 ms: a
// restored snapshot's clock lags by however long the snapshot was stored.
func setClock(t time.Time) error {
	if d := time.Since(t); d < 10*time.Millisecond && d > -10*time.Millisecond {
		return nil
	}
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("clock_settime: %w", err)
	}
	return nil
}

// reseedRandom mixes b into the kernel's entropy pool, credits it
// (RNDADDENTROPY) and makes the kernel RNG reseed from the pool at once
// (RNDRESEEDCRNG): a credit alone reseeds only on the kernel's own schedule,
// up to a minute later. Both ioctls need CAP_SYS_ADMIN; envd is root in a VM.
func reseedRandom(b []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(b))
	binary.NativeEndian.PutUint32(info[0:], uint32(8*len(b)))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(b)))
	copy(info[8:], b)
	var errno unix.Errno
	if err := withRawFd(f, func(fd uintptr) {
		if _, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
			return
		}
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDRESEEDCRNG, 0)
	}); err != nil {
		return err
	}
	if errno != 0 {
		return fmt.Errorf("ioctl on /dev/urandom: %w", errno)
	}
	return nil
}

// withRawFd runs fn with f's descriptor, which stays open meanwhile.
func withRawFd(f *os.File, fn func(fd uintptr)) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(fn)
}

func (s *Server) handleEnvs(w http.ResponseWriter, r *http.Request) {
	reply.JSON(w, http.StatusOK, s.state.EnvVars())
}

// metrics is the body of GET /metrics (E2B envd's names and units: bytes, MiB, percent).
type metrics struct {
	Timestamp   int64   `json:"ts"`
	CPUCount    int     `json:"cpu_count"`
	CPUUsedPct  float64 `json:"cpu_used_pct"`
	MemTotal    uint64  `json:"mem_total"`
	MemUsed     uint64  `json:"mem_used"`
	MemCache    uint64  `json:"mem_cache"`
	MemTotalMiB uint64  `json:"mem_total_mib"`
	MemUsedMiB  uint64  `json:"mem_used_mib"`
	DiskUsed    uint64  `json:"disk_used"`
	DiskTotal   uint64  `json:"disk_total"`
}

func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	m, err := readMetrics()
	if err != nil {
		reply.Error(w, http.StatusInternalServerError, "read metrics: %v", err)
		return
	}
	reply.JSON(w, http.StatusOK, m)
}

func readMetrics() (*metrics, error) {
	m := &metrics{Timestamp: time.Now().Unix(), CPUCount: runtime.NumCPU()}
	// CPU use over a short window: two samples of /proc/stat.
	busy1, total1, err := cpuTimes()
	if err != nil {
		return nil, err
	}
	time.Sleep(100 * time.Millisecond)
	busy2, total2, err := cpuTimes()
	if err != nil {
		return nil, err
	}
	if total2 > total1 {
		m.CPUUsedPct = float64(int(10000*float64(busy2-busy1)/float64(total2-total1))) / 100
	}
	mem, err := meminfo()
	if err != nil {
		return nil, err
	}
	m.MemTotal = mem["MemTotal"]
	m.MemCache = mem["Cached"] + mem["Buffers"]
	if avail, ok := mem["MemAvailable"]; ok && avail <= m.MemTotal {
		m.MemUsed = m.MemTotal - avail
	}
	m.MemTotalMiB, m.MemUsedMiB = m.MemTotal>>20, m.MemUsed>>20
	var st unix.Statfs_t
	if err := unix.Statfs("/", &st); err != nil {
		return nil, fmt.Errorf("statfs /: %w", err)
	}
	m.DiskTotal = st.Blocks * uint64(st.Bsize)
	m.DiskUsed = (st.Blocks - st.Bfree) * uint64(st.Bsize)
	return m, nil
}

// cpuTimes returns busy and total jiffies from the first line of /proc/stat.
func cpuTimes() (busy, total uint64, err error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(data), "\n")
	fields := strings.Fields(line)
	if len(fields) < 5 || fields[0] != "cpu" {
		return 0, 0, fmt.Errorf("unexpected /proc/stat line %q", line)
	}
	for i, f := range fields[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total, nil
}

// meminfo returns /proc/meminfo in bytes.
func meminfo() (map[string]uint64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		v, err := strconv.ParseUint(fields[0], 10, 64)
		if err != nil {
			continue
		}
		if len(fields) > 1 && fields[1] == "kB" {
			v *= 1024
		}
		out[key] = v
	}
	return out, sc.Err()
}
