package oci

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// provisionRecipe versions what provision writes: bump it when that changes,
// so cached root images are rebuilt.
const provisionRecipe = 1

// Names and values of E2B's template conventions (TEMPLATES.md §4), the same
// the Debian base image has.
const (
	defaultUser = "user"
	defaultHome = "/home/user"
	sudoGroup   = "sudo"
	hostname    = "e2b.local"
	envdPath    = "/usr/bin/envd"
	sudoersFile = "/etc/sudoers.d/warren"
	// firstUID is where Debian's useradd starts regular users; E2B's user is
	// 1000 on Debian-family images.
	firstUID = 1000
	// sudoGID is Debian's gid of group sudo, used when the image lacks the group.
	sudoGID = 27
)

// Provisioned is what provision did to an image's tree.
type Provisioned struct {
	// UID and GID are the ids of user `user`.
	UID int `json:"uid"`
	GID int `json:"gid"`
	// Shell is the user's login shell: /bin/bash when the image has bash, else /bin/sh.
	Shell string `json:"shell"`
	// Warnings say what the image lacks for E2B's conventions (sudo, bash):
	// the build goes on, a template step can install it.
	Warnings []string `json:"warnings,omitempty"`
}

// provision applies E2B's template conventions to an image's flattened tree,
// without running anything from the image: the mount points warren's init
// uses, user `user` with a home and passwordless sudo, envd at /usr/bin/envd,
// and the host files the node and sudo expect (hostname, hosts, resolv.conf).
// The account files stay consistent: a new passwd entry gets its group,
// shadow and (if the image has one) gshadow entries.
func provision(r *root, envd string) (Provisioned, error) {
	var res Provisioned
	// Init mounts /dev, /proc, /sys, /run and /tmp (it would create them,
	// but on a fresh root that would race nothing and cost a write each boot).
	for _, d := range []struct {
		path string
		mode uint32
	}{
		{"/dev", 0o755}, {"/proc", 0o555}, {"/sys", 0o555}, {"/run", 0o755}, {"/tmp", 0o1777},
		{"/root", 0o700}, {"/home", 0o755}, {"/etc", 0o755}, {"/usr/bin", 0o755},
	} {
		if err := r.ensureDir(d.path, d.mode, 0, 0); err != nil {
			return res, err
		}
	}

	res.Shell = "/bin/sh"
	switch {
	case r.isExecutable("/bin/bash"):
		res.Shell = "/bin/bash"
	case r.isExecutable("/usr/bin/bash"):
		res.Shell = "/usr/bin/bash"
	default:
		res.Warnings = append(res.Warnings, "the image has no bash: user's login shell is /bin/sh, and E2B SDK commands that assume bash may fail")
		if !r.isExecutable("/bin/sh") {
			res.Warnings = append(res.Warnings, "the image has no /bin/sh: no command can run in the sandbox")
		}
	}

	acc, err := readAccounts(r)
	if err != nil {
		return res, err
	}
	acc.ensureRoot(res.Shell)
	sudoG := acc.ensureGroup(sudoGroup, sudoGID)
	if u := acc.passwd.find(defaultUser); u != nil {
		// The image has a `user` already (an E2B-style image): keep it.
		res.UID, _ = strconv.Atoi(u[2])
		res.GID, _ = strconv.Atoi(u[3])
		if len(u) > 6 && u[6] != "" {
			res.Shell = u[6]
		}
	} else {
		res.UID, res.GID = acc.addUser(defaultUser, defaultHome, res.Shell)
	}
	acc.addMember(sudoG, defaultUser)
	if err := acc.write(r); err != nil {
		return res, err
	}

	home := defaultHome
	if u := acc.passwd.find(defaultUser); u != nil && len(u) > 5 && u[5] != "" {
		home = u[5]
	}
	if _, ok, err := r.stat(home); err != nil {
		return res, err
	} else if !ok {
		if err := r.ensureDir(home, 0o755, res.UID, res.GID); err != nil {
			return res, err
		}
		if st, ok := r.statFollow("/etc/skel"); ok && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			if err := r.copyTree("/etc/skel", home, res.UID, res.GID); err != nil {
				return res, fmt.Errorf("fill %s from /etc/skel: %w", home, err)
			}
		}
	}

	if err := provisionSudo(r, &res); err != nil {
		return res, err
	}

	in, err := os.Open(envd)
	if err != nil {
		return res, fmt.Errorf("install envd: %w", err)
	}
	defer in.Close()
	if err := r.writeFrom(envdPath, in, 0o755, 0, 0); err != nil {
		return res, fmt.Errorf("install envd: %w", err)
	}

	files := []struct {
		path, content string
	}{
		{"/etc/hostname", hostname + "\n"},
		{"/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t" + hostname + "\n" +
			"::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"},
		// Often a symlink into /run in images; envd writes the sandbox's own
		// resolver at start and must write a file, not through a link.
		{"/etc/resolv.conf", "# written by warren when the sandbox starts\n"},
	}
	for _, f := range files {
		if err := r.writeFile(f.path, []byte(f.content), 0o644, 0, 0); err != nil {
			return res, err
		}
	}
	return res, nil
}

// includedirRE matches a sudoers line that reads /etc/sudoers.d ("#includedir"
// is a directive, not a comment).
var includedirRE = regexp.MustCompile(`(?m)^[#@]includedir\s+/etc/sudoers\.d\s*$`)

// provisionSudo writes the NOPASSWD rule for `user`. It is written even when
// the image has no sudo: a template step that installs sudo makes it work.
func provisionSudo(r *root, res *Provisioned) error {
	if !slices.ContainsFunc([]string{"/usr/bin/sudo", "/bin/sudo", "/usr/sbin/sudo", "/sbin/sudo"}, r.isExecutable) {
		res.Warnings = append(res.Warnings, "the image has no sudo: user cannot become root with sudo until a template step installs it")
	}
	if err := r.ensureDir("/etc/sudoers.d", 0o755, 0, 0); err != nil {
		return err
	}
	if err := r.writeFile(sudoersFile, []byte(defaultUser+" ALL=(ALL:ALL) NOPASSWD: ALL\n"), 0o440, 0, 0); err != nil {
		return err
	}
	sudoers, err := r.readFile("/etc/sudoers")
	if errors.Is(err, unix.ENOENT) {
		return nil // sudo's package brings one that reads sudoers.d
	}
	if err != nil {
		return fmt.Errorf("read /etc/sudoers: %w", err)
	}
	if includedirRE.Match(sudoers) {
		return nil
	}
	if len(sudoers) > 0 && sudoers[len(sudoers)-1] != '\n' {
		sudoers = append(sudoers, '\n')
	}
	sudoers = append(sudoers, "#includedir /etc/sudoers.d\n"...)
	return r.writeFile("/etc/sudoers", sudoers, 0o440, 0, 0)
}

// dbFile is a colon-separated account database (/etc/passwd, group, shadow,
// gshadow) kept line by line, so what provision does not touch stays as it was.
type dbFile struct {
	path    string
	lines   []string
	present bool
	changed bool
	// mode, uid and gid of the existing file, kept when it is rewritten.
	mode     uint32
	uid, gid int
}

func readDB(r *root, p string, mode uint32) (*dbFile, error) {
	f := &dbFile{path: p, mode: mode}
	b, err := r.readFile(p)
	if errors.Is(err, unix.ENOENT) {
		return f, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	f.present = true
	if st, ok := r.statFollow(p); ok {
		f.mode, f.uid, f.gid = st.Mode&0o7777, int(st.Uid), int(st.Gid)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if l != "" {
			f.lines = append(f.lines, l)
		}
	}
	return f, nil
}

// find returns the fields of the entry called name, or nil.
func (f *dbFile) find(name string) []string {
	for _, l := range f.lines {
		if fields := strings.Split(l, ":"); fields[0] == name {
			return fields
		}
	}
	return nil
}

// ids is the set of numeric ids in field i (uid or gid).
func (f *dbFile) ids(i int) map[int]bool {
	ids := map[int]bool{}
	for _, l := range f.lines {
		fields := strings.Split(l, ":")
		if len(fields) > i {
			if n, err := strconv.Atoi(fields[i]); err == nil {
				ids[n] = true
			}
		}
	}
	return ids
}

func (f *dbFile) add(fields ...string) {
	f.lines = append(f.lines, strings.Join(fields, ":"))
	f.changed = true
}

// set replaces the entry called name.
func (f *dbFile) set(name string, fields []string) {
	for i, l := range f.lines {
		if strings.Split(l, ":")[0] == name {
			f.lines[i] = strings.Join(fields, ":")
			f.changed = true
		}
	}
}

// accounts are the image's user and group databases.
type accounts struct {
	passwd, group, shadow, gshadow *dbFile
	// days is "today" in shadow's days since 1970.
	days string
}

func readAccounts(r *root) (*accounts, error) {
	a := &accounts{days: strconv.FormatInt(time.Now().Unix()/86400, 10)}
	var err error
	if a.passwd, err = readDB(r, "/etc/passwd", 0o644); err != nil {
		return nil, err
	}
	if a.group, err = readDB(r, "/etc/group", 0o644); err != nil {
		return nil, err
	}
	if a.shadow, err = readDB(r, "/etc/shadow", 0o640); err != nil {
		return nil, err
	}
	if a.gshadow, err = readDB(r, "/etc/gshadow", 0o640); err != nil {
		return nil, err
	}
	if !a.shadow.present {
		// passwd's "x" sends every account to shadow: give each one there,
		// locked ("*"), as Debian's images have for system accounts.
		if g := a.group.find("shadow"); g != nil {
			a.shadow.gid, _ = strconv.Atoi(g[2])
		} else {
			a.shadow.mode = 0o600
		}
		for _, l := range a.passwd.lines {
			a.shadow.add(strings.Split(l, ":")[0], "*", a.days, "0", "99999", "7", "", "", "")
		}
	}
	return a, nil
}

// ensureRoot adds root's entries to an image that has none (a scratch image).
func (a *accounts) ensureRoot(shell string) {
	if a.passwd.find("root") == nil {
		a.passwd.add("root", "x", "0", "0", "root", "/root", shell)
	}
	if a.shadow.find("root") == nil {
		a.shadow.add("root", "*", a.days, "0", "99999", "7", "", "", "")
	}
	if a.group.find("root") == nil {
		a.group.add("root", "x", "0", "")
	}
}

// ensureGroup returns the fields of group name, adding it (gid want, or the
// first free system gid) when missing.
func (a *accounts) ensureGroup(name string, want int) []string {
	if g := a.group.find(name); g != nil {
		return g
	}
	gid := want
	used := a.group.ids(2)
	for n := 100; used[gid]; n++ {
		gid = n
	}
	a.group.add(name, "x", strconv.Itoa(gid), "")
	if a.gshadow.present {
		a.gshadow.add(name, "*", "", "")
	}
	return a.group.find(name)
}

// addUser adds a regular user like `useradd --create-home --user-group`: uid
// and gid firstUID when free, else the first number from there free as both
// (or the existing group of the same name as the primary group).
func (a *accounts) addUser(name, home, shell string) (uid, gid int) {
	uids, gids := a.passwd.ids(2), a.group.ids(2)
	g := a.group.find(name)
	if g != nil {
		gid, _ = strconv.Atoi(g[2])
		for uid = firstUID; uids[uid]; uid++ {
		}
	} else {
		for uid = firstUID; uids[uid] || gids[uid]; uid++ {
		}
		gid = uid
		a.group.add(name, "x", strconv.Itoa(gid), "")
		if a.gshadow.present {
			a.gshadow.add(name, "!", "", "")
		}
	}
	a.passwd.add(name, "x", strconv.Itoa(uid), strconv.Itoa(gid), "", home, shell)
	// "!": no password to log in with, as useradd leaves it; sudo's NOPASSWD
	// rule and envd (which runs as root) need none.
	if a.shadow.find(name) == nil {
		a.shadow.add(name, "!", a.days, "0", "99999", "7", "", "", "")
	}
	return uid, gid
}

// addMember adds user to the supplementary members of group (fields as
// ensureGroup returned them), in group and gshadow.
func (a *accounts) addMember(group []string, user string) {
	addTo := func(f *dbFile, field int) {
		g := f.find(group[0])
		if g == nil {
			return
		}
		for len(g) <= field {
			g = append(g, "")
		}
		members := strings.Split(g[field], ",")
		if g[field] == "" {
			members = nil
		}
		if slices.Contains(members, user) {
			return
		}
		g[field] = strings.Join(append(members, user), ",")
		f.set(group[0], g)
	}
	addTo(a.group, 3)
	if a.gshadow.present {
		addTo(a.gshadow, 3)
	}
}

// write rewrites the databases that changed.
func (a *accounts) write(r *root) error {
	for _, f := range []*dbFile{a.passwd, a.group, a.shadow, a.gshadow} {
		if !f.changed {
			continue
		}
		if err := r.writeFile(f.path, []byte(strings.Join(f.lines, "\n")+"\n"), f.mode, f.uid, f.gid); err != nil {
			return err
		}
	}
	return nil
}
