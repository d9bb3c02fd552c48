package templatecli

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// The translation follows `e2b template create` (the SDK's
// dockerfileParser.ts): FROM → fromImage; USER root and WORKDIR / first;
// USER user and WORKDIR /home/user last unless the file sets them;
// RUN/ENV/WORKDIR/USER one to one, ARG → ENV, COPY/ADD → one COPY step per
// source, COPY --chown → owner; CMD/ENTRYPOINT → start command with the ready
// command "sleep 20". Where the SDK mangles a form, Docker's meaning wins:
// quoted ENV values keep their spaces ("ENV a b c" is a="b c"), exec-form
// RUN/CMD arguments are shell-quoted, quoted whitespace in RUN is kept, and
// ENTRYPOINT and CMD combine as in Docker.

// DefaultReadyCmd is the ready command of a template whose start command
// comes without one (upstream's finalize default, the SDK's
// waitForTimeout(20_000)).
const DefaultReadyCmd = "sleep 20"

// directive is a parser directive line ("# escape=`").
var directive = regexp.MustCompile(`^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(\S*)\s*$`)

// logicalLine is one instruction with its continuation lines joined.
type logicalLine struct {
	line int // first physical line, 1-based
	text string
}

// ParseDockerfile translates a Dockerfile into a build Spec (no COPY hashes
// yet). Warnings name instructions that have no meaning in a template and
// were skipped.
func ParseDockerfile(text string) (spec *Spec, warnings []string, err error) {
	lines, esc := logicalLines(text)
	spec = &Spec{Steps: []Step{{Type: "USER", Args: []string{"root"}}, {Type: "WORKDIR", Args: []string{"/"}}}}
	var (
		froms               int
		userSet, workdirSet bool
		entrypoint, cmd     *command
	)
	for _, l := range lines {
		keyword, rest := cutWord(strings.TrimSpace(l.text))
		keyword = strings.ToUpper(keyword)
		fail := func(format string, args ...any) error {
			return fmt.Errorf("Dockerfile line %d: %s: %s", l.line, keyword, fmt.Sprintf(format, args...))
		}
		switch keyword {
		case "FROM":
			froms++
			if froms > 1 {
				return nil, nil, fail("multi-stage Dockerfiles are not supported")
			}
			words, err := splitWords(rest, esc)
			if err != nil {
				return nil, nil, fail("%v", err)
			}
			for len(words) > 0 && strings.HasPrefix(words[0], "--") { // --platform=...
				words = words[1:]
			}
			if len(words) == 0 {
				return nil, nil, fail("an image is required")
			}
			spec.FromImage = words[0]
		case "RUN":
			if strings.HasPrefix(rest, "<<") {
				return nil, nil, fail("heredocs are not supported; use && or a script file")
			}
			c := parseCommand(rest, esc)
			if c.shell == "" {
				return nil, nil, fail("a command is required")
			}
			spec.Steps = append(spec.Steps, Step{Type: "RUN", Args: []string{c.shell}})
		case "COPY", "ADD":
			steps, err := parseCopy(keyword, rest, esc)
			if err != nil {
				return nil, nil, fail("%v", err)
			}
			spec.Steps = append(spec.Steps, steps...)
		case "ENV", "ARG":
			args, err := parseEnv(keyword, rest, esc)
			if err != nil {
				return nil, nil, fail("%v", err)
			}
			if len(args) > 0 {
				spec.Steps = append(spec.Steps, Step{Type: "ENV", Args: args})
			}
		case "WORKDIR", "USER":
			words, err := splitWords(rest, esc)
			if err != nil {
				return nil, nil, fail("%v", err)
			}
			if len(words) != 1 {
				return nil, nil, fail("exactly one argument is required, got %d", len(words))
			}
			spec.Steps = append(spec.Steps, Step{Type: keyword, Args: words})
			if keyword == "USER" {
				userSet = true
			} else {
				workdirSet = true
			}
		case "CMD", "ENTRYPOINT":
			c := parseCommand(rest, esc)
			if keyword == "CMD" {
				cmd = &c
			} else {
				entrypoint = &c
			}
		case "EXPOSE", "VOLUME":
			// Every port of a sandbox is reachable; the disk is persistent.
		default:
			warnings = append(warnings, fmt.Sprintf("Dockerfile line %d: %s is not supported in a template, skipped", l.line, keyword))
		}
	}
	if froms == 0 {
		return nil, nil, fmt.Errorf("Dockerfile: a FROM instruction is required")
	}
	if !userSet {
		spec.Steps = append(spec.Steps, Step{Type: "USER", Args: []string{"user"}})
	}
	if !workdirSet {
		spec.Steps = append(spec.Steps, Step{Type: "WORKDIR", Args: []string{"/home/user"}})
	}
	if start := startCommand(entrypoint, cmd); start != "" {
		spec.StartCmd, spec.ReadyCmd = start, DefaultReadyCmd
	}
	return spec, warnings, nil
}

// logicalLines joins continuation lines (ending in the escape character)
// and drops blank lines and comments, also inside a continuation, as Docker
// does. It returns the escape character (parser directive "escape").
func logicalLines(text string) ([]logicalLine, byte) {
	esc := byte('\\')
	raw := strings.Split(strings.ReplaceAll(text, "\r\n", "\n"), "\n")
	i := 0
	for ; i < len(raw); i++ { // parser directives come first
		m := directive.FindStringSubmatch(strings.TrimSpace(raw[i]))
		if m == nil {
			break
		}
		if strings.EqualFold(m[1], "escape") && m[2] == "`" {
			esc = '`'
		}
	}
	var out []logicalLine
	var cur *logicalLine
	for ; i < len(raw); i++ {
		trimmed := strings.TrimSpace(raw[i])
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		line := strings.TrimRight(raw[i], " \t")
		cont := strings.HasSuffix(line, string(esc))
		if cont {
			line = line[:len(line)-1]
		}
		if cur == nil {
			out = append(out, logicalLine{line: i + 1})
			cur = &out[len(out)-1]
			line = strings.TrimLeft(line, " \t")
		}
		cur.text += line
		if !cont {
			cur = nil
		}
	}
	return out, esc
}

// command is a RUN/CMD/ENTRYPOINT argument: exec (JSON) or shell form.
type command struct {
	exec  []string // exec form
	shell string   // the command line: the shell form, or exec quoted
}

func parseCommand(rest string, esc byte) command {
	if strings.HasPrefix(rest, "[") {
		var argv []string
		if err := json.Unmarshal([]byte(rest), &argv); err == nil && len(argv) > 0 {
			return command{exec: argv, shell: shellJoin(argv)}
		}
	}
	return command{shell: collapseSpace(rest, esc)}
}

// startCommand combines ENTRYPOINT and CMD as Docker does: an exec-form
// entrypoint takes CMD as arguments, a shell-form one ignores CMD.
func startCommand(entrypoint, cmd *command) string {
	switch {
	case entrypoint == nil && cmd == nil:
		return ""
	case entrypoint == nil:
		return cmd.shell
	case entrypoint.exec == nil || cmd == nil:
		return entrypoint.shell
	case cmd.exec != nil:
		return shellJoin(append(append([]string{}, entrypoint.exec...), cmd.exec...))
	default:
		return shellJoin(append(append([]string{}, entrypoint.exec...), "/bin/sh", "-c", cmd.shell))
	}
}

// parseCopy turns COPY/ADD into one COPY step per source:
// [src, dest, owner, mode].
func parseCopy(keyword, rest string, esc byte) ([]Step, error) {
	owner, mode := "", ""
	for strings.HasPrefix(rest, "--") {
		var flag string
		flag, rest = cutWord(rest)
		name, value, _ := strings.Cut(strings.TrimPrefix(flag, "--"), "=")
		switch name {
		case "chown":
			owner = value
		case "chmod":
			m, err := strconv.ParseUint(value, 8, 32)
			if err != nil {
				return nil, fmt.Errorf("--chmod=%s is not an octal mode such as 755", value)
			}
			mode = fmt.Sprintf("%04o", m)
		case "link":
		case "from":
			return nil, fmt.Errorf("--from (multi-stage builds) is not supported")
		default:
			return nil, fmt.Errorf("flag --%s is not supported (only --chown, --chmod, --link)", name)
		}
	}
	var words []string
	if !strings.HasPrefix(rest, "[") || json.Unmarshal([]byte(rest), &words) != nil {
		// Not the JSON form ["src", ..., "dest"].
		var err error
		if words, err = splitWords(rest, esc); err != nil {
			return nil, err
		}
	}
	if len(words) < 2 {
		return nil, fmt.Errorf("a source and a destination are required")
	}
	dest := words[len(words)-1]
	var steps []Step
	for _, src := range words[:len(words)-1] {
		if keyword == "ADD" && strings.Contains(src, "://") {
			return nil, fmt.Errorf("%s: remote sources are not supported; download them in a RUN step", src)
		}
		if err := checkSource(src); err != nil {
			return nil, err
		}
		steps = append(steps, Step{Type: "COPY", Args: []string{src, dest, owner, mode}})
	}
	return steps, nil
}

// cutWord splits s at its first run of whitespace.
func cutWord(s string) (word, rest string) {
	i := strings.IndexFunc(s, func(r rune) bool { return r < 128 && isSpace(byte(r)) })
	if i < 0 {
		return s, ""
	}
	return s[:i], strings.TrimSpace(s[i:])
}

// parseEnv returns the [k1, v1, k2, v2, ...] of ENV ("k=v ..." or the old
// "k value with spaces") or ARG ("k[=default] ...", no default ⇒ "").
func parseEnv(keyword, rest string, esc byte) ([]string, error) {
	words, err := splitWords(rest, esc)
	if err != nil {
		return nil, err
	}
	if len(words) == 0 {
		return nil, fmt.Errorf("a name is required")
	}
	if keyword == "ENV" && !strings.Contains(words[0], "=") {
		if len(words) < 2 {
			return nil, fmt.Errorf("%s has no value (use %s=value)", words[0], words[0])
		}
		return []string{words[0], strings.Join(words[1:], " ")}, nil
	}
	var args []string
	for _, w := range words {
		k, v, ok := strings.Cut(w, "=")
		if k == "" || (!ok && keyword == "ENV") {
			return nil, fmt.Errorf("%q is not name=value", w)
		}
		args = append(args, k, v)
	}
	return args, nil
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// splitWords splits at unquoted whitespace and removes quotes and escapes,
// like Docker's word processing (without variable expansion).
func splitWords(s string, esc byte) ([]string, error) {
	var words []string
	var b strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case isSpace(c):
			if inWord {
				words = append(words, b.String())
				b.Reset()
				inWord = false
			}
			continue
		case c == esc && i+1 < len(s):
			i++
			b.WriteByte(s[i])
		case c == '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, fmt.Errorf("unterminated ' quote in %q", s)
			}
			b.WriteString(s[i+1 : i+1+j])
			i += j + 1
		case c == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == esc && i+1 < len(s) && strings.IndexByte("\"$`\\", s[i+1]) >= 0 {
					i++
				}
				b.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, fmt.Errorf("unterminated \" quote in %q", s)
			}
		default:
			b.WriteByte(c)
		}
		inWord = true
	}
	if inWord {
		words = append(words, b.String())
	}
	return words, nil
}

// collapseSpace trims s and turns each run of unquoted whitespace into one
// space (what joining continuation lines leaves), keeping quoted text as is.
func collapseSpace(s string, esc byte) string {
	var b strings.Builder
	var quote byte
	space := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		if quote == 0 && isSpace(c) {
			space = b.Len() > 0
			continue
		}
		if space {
			b.WriteByte(' ')
			space = false
		}
		b.WriteByte(c)
		switch {
		case c == esc && quote != '\'' && i+1 < len(s):
			i++
			b.WriteByte(s[i])
		case quote == 0 && (c == '\'' || c == '"'):
			quote = c
		case c == quote:
			quote = 0
		}
	}
	return b.String()
}

// safeWord is an argument a shell reads as is.
var safeWord = regexp.MustCompile(`^[A-Za-z0-9_@%+=:,./-]+$`)

// shellJoin quotes argv for a POSIX shell.
func shellJoin(argv []string) string {
	out := make([]string, len(argv))
	for i, a := range argv {
		if safeWord.MatchString(a) {
			out[i] = a
		} else {
			out[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return strings.Join(out, " ")
}
