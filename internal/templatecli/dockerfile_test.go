package templatecli

import (
	"reflect"
	"strings"
	"testing"
)

func step(typ string, args ...string) Step { return Step{Type: typ, Args: args} }

var (
	userRoot    = step("USER", "root")
	workdirRoot = step("WORKDIR", "/")
	userUser    = step("USER", "user")
	workdirHome = step("WORKDIR", "/home/user")
)

func TestParseDockerfile(t *testing.T) {
	tests := []struct {
		name, file string
		want       Spec
	}{{
		// TEMPLATES.md §2, captured from `e2b template create`.
		name: "captured example",
		file: `FROM python:3.12-slim
ENV APP_ENV=production
RUN pip install flask
COPY app /home/user/app
WORKDIR /home/user/app
USER user
CMD ["python3", "main.py"]
`,
		want: Spec{FromImage: "python:3.12-slim", StartCmd: "python3 main.py", ReadyCmd: "sleep 20", Steps: []Step{
			userRoot, workdirRoot, step("ENV", "APP_ENV", "production"), step("RUN", "pip install flask"),
			step("COPY", "app", "/home/user/app", "", ""), step("WORKDIR", "/home/user/app"), userUser,
		}},
	}, {
		name: "E2B defaults appended when the file sets no USER or WORKDIR",
		file: "FROM e2bdev/base\nRUN echo hi\n",
		want: Spec{FromImage: "e2bdev/base", Steps: []Step{userRoot, workdirRoot, step("RUN", "echo hi"), userUser, workdirHome}},
	}, {
		name: "only the missing default is appended",
		file: "FROM e2bdev/base\nUSER app\n",
		want: Spec{FromImage: "e2bdev/base", Steps: []Step{userRoot, workdirRoot, step("USER", "app"), workdirHome}},
	}, {
		name: "comments, # syntax, blank lines, continuations with comments inside",
		file: `# syntax=docker/dockerfile:1
# a comment

FROM debian:bookworm AS base
RUN apt-get update && \
    # install curl
    apt-get install -y curl \

    && echo done
`,
		want: Spec{FromImage: "debian:bookworm", Steps: []Step{userRoot, workdirRoot,
			step("RUN", "apt-get update && apt-get install -y curl && echo done"), userUser, workdirHome}},
	}, {
		name: "lower-case keywords and FROM --platform",
		file: "from --platform=linux/amd64 alpine:3\nrun echo a\n",
		want: Spec{FromImage: "alpine:3", Steps: []Step{userRoot, workdirRoot, step("RUN", "echo a"), userUser, workdirHome}},
	}, {
		name: "quoted whitespace in RUN is kept",
		file: "FROM x\nRUN echo \"a   b\"   'c  d'\n",
		want: Spec{FromImage: "x", Steps: []Step{userRoot, workdirRoot, step("RUN", `echo "a   b" 'c  d'`), userUser, workdirHome}},
	}, {
		name: "exec-form RUN is shell-quoted",
		file: `FROM x
RUN ["echo", "json form", "it's"]
`,
		want: Spec{FromImage: "x", Steps: []Step{userRoot, workdirRoot, step("RUN", `echo 'json form' 'it'\''s'`), userUser, workdirHome}},
	}, {
		name: "ENV forms",
		file: `FROM x
ENV A=1 B="two words" \
    C=3
ENV D 4 5
ENV E=
ENV F='$HOME' G=a\ b
`,
		want: Spec{FromImage: "x", Steps: []Step{userRoot, workdirRoot,
			step("ENV", "A", "1", "B", "two words", "C", "3"), step("ENV", "D", "4 5"), step("ENV", "E", ""),
			step("ENV", "F", "$HOME", "G", "a b"), userUser, workdirHome}},
	}, {
		name: "ARG becomes ENV, empty without a default",
		file: "FROM x\nARG V\nARG W=w X=\"x y\"\n",
		want: Spec{FromImage: "x", Steps: []Step{userRoot, workdirRoot, step("ENV", "V", ""), step("ENV", "W", "w", "X", "x y"), userUser, workdirHome}},
	}, {
		name: "COPY: one step per source, --chown, --chmod, JSON form, ADD",
		file: `FROM x
COPY --chown=user:user app /home/user/app
COPY a.txt b.txt /dest/
COPY --chmod=755 --link run.sh /usr/local/bin/
COPY ["with space.txt", "/d/"]
ADD c.tar /x
`,
		want: Spec{FromImage: "x", Steps: []Step{userRoot, workdirRoot,
			step("COPY", "app", "/home/user/app", "user:user", ""),
			step("COPY", "a.txt", "/dest/", "", ""), step("COPY", "b.txt", "/dest/", "", ""),
			step("COPY", "run.sh", "/usr/local/bin/", "", "0755"),
			step("COPY", "with space.txt", "/d/", "", ""),
			step("COPY", "c.tar", "/x", "", ""), userUser, workdirHome}},
	}, {
		name: "shell-form CMD",
		file: "FROM x\nCMD python3 -m http.server 8000\n",
		want: Spec{FromImage: "x", StartCmd: "python3 -m http.server 8000", ReadyCmd: "sleep 20",
			Steps: []Step{userRoot, workdirRoot, userUser, workdirHome}},
	}, {
		name: "exec ENTRYPOINT takes exec CMD as arguments",
		file: `FROM x
ENTRYPOINT ["/bin/server", "--port"]
CMD ["8080"]
`,
		want: Spec{FromImage: "x", StartCmd: "/bin/server --port 8080", ReadyCmd: "sleep 20",
			Steps: []Step{userRoot, workdirRoot, userUser, workdirHome}},
	}, {
		name: "shell ENTRYPOINT ignores CMD; the last CMD counts",
		file: "FROM x\nCMD one\nCMD two\nENTRYPOINT exec server\n",
		want: Spec{FromImage: "x", StartCmd: "exec server", ReadyCmd: "sleep 20",
			Steps: []Step{userRoot, workdirRoot, userUser, workdirHome}},
	}, {
		name: "escape directive",
		file: "# escape=`\nFROM x\nRUN echo a `\n  b\nCOPY c:\\dir /d\n",
		want: Spec{FromImage: "x", Steps: []Step{userRoot, workdirRoot, step("RUN", "echo a b"),
			step("COPY", `c:\dir`, "/d", "", ""), userUser, workdirHome}},
	}, {
		name: "EXPOSE and VOLUME are dropped",
		file: "FROM x\nEXPOSE 80\nVOLUME /data\n",
		want: Spec{FromImage: "x", Steps: []Step{userRoot, workdirRoot, userUser, workdirHome}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, warnings, err := ParseDockerfile(tt.file)
			if err != nil {
				t.Fatal(err)
			}
			if len(warnings) > 0 {
				t.Errorf("warnings: %q", warnings)
			}
			if !reflect.DeepEqual(*got, tt.want) {
				t.Errorf("got  %+v\nwant %+v", *got, tt.want)
			}
		})
	}
}

func TestParseDockerfileWarnings(t *testing.T) {
	_, warnings, err := ParseDockerfile("FROM x\nLABEL a=b\nHEALTHCHECK CMD true\n")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"Dockerfile line 2: LABEL is not supported in a template, skipped",
		"Dockerfile line 3: HEALTHCHECK is not supported in a template, skipped",
	}
	if !reflect.DeepEqual(warnings, want) {
		t.Errorf("warnings %q, want %q", warnings, want)
	}
}

func TestParseDockerfileErrors(t *testing.T) {
	tests := []struct{ file, want string }{
		{"RUN echo\n", "a FROM instruction is required"},
		{"FROM a AS one\nFROM b\n", "line 2: FROM: multi-stage Dockerfiles are not supported"},
		{"FROM a\nCOPY --from=one /x /y\n", "line 2: COPY: --from (multi-stage builds) is not supported"},
		{"FROM a\nCOPY x\n", "line 2: COPY: a source and a destination are required"},
		{"FROM a\nCOPY /etc/passwd /x\n", "absolute paths are not allowed"},
		{"FROM a\nCOPY ../secret /x\n", "leaves the context directory"},
		{"FROM a\nADD https://example.com/f /x\n", "remote sources are not supported"},
		{"FROM a\nCOPY --chmod=abc x /y\n", "--chmod=abc is not an octal mode"},
		{"FROM a\nRUN <<EOF\necho\nEOF\n", "heredocs are not supported"},
		{"FROM a\nENV A\n", "line 2: ENV: A has no value"},
		{"FROM a\nENV A=1 B\n", `"B" is not name=value`},
		{"FROM a\nENV A=\"x\n", "unterminated \" quote"},
		{"FROM a\nWORKDIR\n", "exactly one argument is required, got 0"},
	}
	for _, tt := range tests {
		_, _, err := ParseDockerfile(tt.file)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: error %v, want one containing %q", tt.file, err, tt.want)
		}
	}
}
