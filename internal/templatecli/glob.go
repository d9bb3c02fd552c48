package templatecli

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// This file reproduces how the e2b SDK selects the files of a COPY step
// (getAllFilesInPath in its template/utils.ts): node-glob 13 with
// {dot: true, cwd: <context>} and the ignore patterns, a matched directory
// expanded with "<dir>/**/*", the result sorted by path. The files hash is a
// cache key the SDK also computes, so the selection must agree with it,
// quirks included: an ignore pattern without "/**" drops only the entry it
// names, not what is below it; a "**" that is not the first segment follows
// one symlinked directory level.

// fileEntry is one selected file or directory: its path relative to the
// context directory ("/"-separated, "" for the context directory itself) and
// its lstat information.
type fileEntry struct {
	rel  string
	info fs.FileInfo
}

// segment is one "/"-separated part of a glob pattern.
type segment struct {
	literal  string // the name, when the part has no magic
	magic    string // a path.Match pattern, when it has
	globstar bool   // "**"
}

func (s segment) match(name string) bool {
	if s.magic == "" {
		return name == s.literal
	}
	ok, _ := path.Match(s.magic, name)
	return ok
}

// parsePattern splits one brace-free glob pattern into segments. Leading
// "./" parts are dropped (node-glob resolves them to the start directory),
// "a//b" is "a/b", and a trailing "/" stays as an empty last segment.
func parsePattern(p string) ([]segment, error) {
	parts := strings.Split(p, "/")
	for len(parts) > 1 && parts[0] == "." {
		parts = parts[1:]
	}
	var segs []segment
	for i, part := range parts {
		switch {
		case part == "**":
			segs = append(segs, segment{globstar: true})
		case part == "" && i > 0 && i < len(parts)-1:
		case hasMagic(part):
			m := translateClass(part)
			if _, err := path.Match(m, ""); err != nil {
				return nil, fmt.Errorf("%q: bad pattern: %w", p, err)
			}
			segs = append(segs, segment{magic: m})
		default:
			segs = append(segs, segment{literal: unescape(part)})
		}
	}
	return segs, nil
}

func hasMagic(s string) bool { return strings.ContainsAny(s, "*?[") }

// translateClass turns minimatch's "[!...]" into path.Match's "[^...]".
func translateClass(s string) string { return strings.ReplaceAll(s, "[!", "[^") }

func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// expandBraces expands "{a,b}" alternatives (nested allowed), as minimatch
// does before matching.
func expandBraces(p string) []string {
	depth, open := 0, -1
	var commas []int
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '\\':
			i++
		case '{':
			if depth == 0 {
				open, commas = i, nil
			}
			depth++
		case ',':
			if depth == 1 {
				commas = append(commas, i)
			}
		case '}':
			if depth == 0 {
				continue
			}
			depth--
			if depth > 0 {
				continue
			}
			if len(commas) == 0 { // "{a}" is literal
				open = -1
				continue
			}
			pre, post := p[:open], p[i+1:]
			var out []string
			start := open + 1
			for _, c := range append(commas, i) {
				for _, alt := range expandBraces(pre + p[start:c] + post) {
					out = append(out, alt)
				}
				start = c + 1
			}
			return out
		}
	}
	return []string{p}
}

// ignorer is node-glob's Ignore: an entry is dropped when a pattern matches
// its relative path (or that path with "/" appended); what is below a
// directory is skipped only for patterns ending in "/**". Patterns are
// minimatch patterns in dot mode; "/..." patterns match the absolute path.
type ignorer struct {
	root     string
	patterns [][]segment // relative patterns, per brace alternative
	absolute [][]segment
	children [][]segment // those of patterns that end in "**"
	absChild [][]segment
}

func newIgnorer(root string, patterns []string) (*ignorer, error) {
	ig := &ignorer{root: root}
	for _, p := range patterns {
		for _, alt := range expandBraces(p) {
			abs := strings.HasPrefix(alt, "/")
			segs, err := parsePattern(strings.TrimPrefix(alt, "/"))
			if err != nil {
				return nil, fmt.Errorf("ignore pattern %w", err)
			}
			kids := len(segs) > 0 && segs[len(segs)-1].globstar
			if abs {
				ig.absolute = append(ig.absolute, segs)
				if kids {
					ig.absChild = append(ig.absChild, segs)
				}
			} else {
				ig.patterns = append(ig.patterns, segs)
				if kids {
					ig.children = append(ig.children, segs)
				}
			}
		}
	}
	return ig, nil
}

// matchPath is minimatch's matchOne in dot mode: "**" matches any number of
// segments (never "." or ".."), and a path with a trailing "/" matches a
// pattern without one.
func matchPath(pat []segment, file []string) bool {
	if len(pat) == 0 {
		return len(file) == 0 || (len(file) == 1 && file[0] == "")
	}
	if pat[0].globstar {
		if len(pat) == 1 {
			for _, f := range file {
				if f == "." || f == ".." {
					return false
				}
			}
			return len(file) > 0
		}
		for i := 0; i <= len(file); i++ {
			if matchPath(pat[1:], file[i:]) {
				return true
			}
			if i < len(file) && (file[i] == "." || file[i] == "..") {
				return false
			}
		}
		return false
	}
	if len(file) == 0 {
		return false
	}
	if pat[0].magic != "" && (file[0] == "" || file[0] == "." || file[0] == "..") {
		return false
	}
	return pat[0].match(file[0]) && matchPath(pat[1:], file[1:])
}

func anyMatch(pats [][]segment, s string) bool {
	file := strings.Split(s, "/")
	for _, p := range pats {
		if matchPath(p, file) {
			return true
		}
	}
	return false
}

func (ig *ignorer) relName(rel string) string {
	if rel == "" {
		return "."
	}
	return rel
}

func (ig *ignorer) full(rel string) string {
	return strings.TrimPrefix(filepath.ToSlash(filepath.Join(ig.root, rel)), "/")
}

// ignored reports whether the entry at rel is dropped from the results.
func (ig *ignorer) ignored(rel string) bool {
	r := ig.relName(rel)
	if anyMatch(ig.patterns, r) || anyMatch(ig.patterns, r+"/") {
		return true
	}
	f := ig.full(rel)
	return anyMatch(ig.absolute, f) || anyMatch(ig.absolute, f+"/")
}

// childrenIgnored reports whether nothing below the directory rel is walked.
func (ig *ignorer) childrenIgnored(rel string) bool {
	return anyMatch(ig.children, ig.relName(rel)+"/") || anyMatch(ig.absChild, ig.full(rel)+"/")
}

// walker runs one glob over the context directory.
type walker struct {
	root    string
	ig      *ignorer
	matches map[string]fs.FileInfo
}

func join(rel, name string) string {
	if rel == "" {
		return name
	}
	return rel + "/" + name
}

func (w *walker) abs(rel string) string { return filepath.Join(w.root, filepath.FromSlash(rel)) }

func (w *walker) add(rel string) {
	if _, ok := w.matches[rel]; ok || w.ig.ignored(rel) {
		return
	}
	info, err := os.Lstat(w.abs(rel))
	if err != nil {
		return
	}
	w.matches[rel] = info
}

// children lists a directory (following a symlink to one), nil when rel is
// not a directory or its children are ignored.
func (w *walker) children(rel string) []fs.DirEntry {
	if w.ig.childrenIgnored(rel) {
		return nil
	}
	list, err := os.ReadDir(w.abs(rel))
	if err != nil {
		return nil
	}
	return list
}

func (w *walker) isDir(rel string) bool {
	info, err := os.Stat(w.abs(rel))
	return err == nil && info.IsDir()
}

// walk matches segs below rel. pos is the position of segs[0] in the whole
// pattern: a "**" at position 0 never follows symlinks.
func (w *walker) walk(rel string, segs []segment, pos int) {
	// Leading literal segments are resolved without listing directories.
	for len(segs) > 1 && !segs[0].globstar && segs[0].magic == "" {
		if segs[0].literal != "" {
			rel = join(rel, segs[0].literal)
		}
		segs, pos = segs[1:], pos+1
	}
	if len(segs) == 0 {
		return
	}
	s, rest := segs[0], segs[1:]
	switch {
	case s.globstar:
		if len(rest) == 0 || (len(rest) == 1 && rest[0].literal == "" && rest[0].magic == "" && !rest[0].globstar) {
			// "x/**" matches x and everything below it (no symlinks followed).
			if len(rest) == 0 || w.isDir(rel) {
				w.add(rel)
			}
			w.walkAll(rel)
			return
		}
		// Zero segments: the rest applies here.
		w.walk(rel, rest, pos+1)
		for _, e := range w.children(rel) {
			child := join(rel, e.Name())
			switch {
			case e.IsDir():
				w.walk(child, segs, pos)
			case e.Type()&fs.ModeSymlink != 0 && pos > 0 && w.isDir(child):
				// The symlink consumes the "**".
				w.walk(child, rest, pos+1)
			}
		}
	case len(rest) == 0 && s.magic == "":
		if s.literal == "" { // trailing "/": directories only
			if w.isDir(rel) {
				w.add(rel)
			}
			return
		}
		w.add(join(rel, s.literal))
	default:
		for _, e := range w.children(rel) {
			if !s.match(e.Name()) {
				continue
			}
			child := join(rel, e.Name())
			if len(rest) == 0 {
				w.add(child)
			} else {
				w.walk(child, rest, pos+1)
			}
		}
	}
}

// walkAll adds everything below rel, not following symlinks.
func (w *walker) walkAll(rel string) {
	for _, e := range w.children(rel) {
		child := join(rel, e.Name())
		w.add(child)
		if e.IsDir() {
			w.walkAll(child)
		}
	}
}

// glob returns the entries pattern matches in root, unsorted.
func glob(root, pattern string, ig *ignorer) (map[string]fs.FileInfo, error) {
	w := &walker{root: root, ig: ig, matches: map[string]fs.FileInfo{}}
	for _, alt := range expandBraces(pattern) {
		segs, err := parsePattern(alt)
		if err != nil {
			return nil, err
		}
		if len(segs) == 1 && segs[0].literal == "." {
			w.add("")
			continue
		}
		w.walk("", segs, 0)
	}
	return w.matches, nil
}

// selectFiles returns the entries a COPY of src takes from root, in the
// SDK's order: each match, and for a matched directory the directory and
// everything below it ("<dir>/**/*").
func selectFiles(root, src string, ignore []string) ([]fileEntry, error) {
	ig, err := newIgnorer(root, ignore)
	if err != nil {
		return nil, err
	}
	matches, err := glob(root, src, ig)
	if err != nil {
		return nil, err
	}
	all := map[string]fs.FileInfo{}
	for rel, info := range matches {
		all[rel] = info
		if !info.IsDir() {
			continue
		}
		pattern := "**/*"
		if rel != "" {
			pattern = escapeGlob(rel) + "/**/*"
		}
		below, err := glob(root, pattern, ig)
		if err != nil {
			return nil, err
		}
		for r, i := range below {
			all[r] = i
		}
	}
	if len(all) == 0 {
		return nil, errors.New("no files match")
	}
	out := make([]fileEntry, 0, len(all))
	for rel, info := range all {
		out = append(out, fileEntry{rel: rel, info: info})
	}
	// The SDK sorts by absolute path: the same order as the relative paths,
	// except that the context directory itself ("") comes first either way.
	slices.SortFunc(out, func(a, b fileEntry) int { return strings.Compare(a.rel, b.rel) })
	return out, nil
}

// escapeGlob makes a matched path a literal pattern again. (The SDK joins
// the path into the pattern as is, so below a directory whose name has glob
// characters it selects other files than we do: a knowingly kept difference.)
func escapeGlob(p string) string {
	var b strings.Builder
	for _, r := range p {
		if strings.ContainsRune(`*?[]{}\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}
