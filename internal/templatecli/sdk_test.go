package templatecli

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// These tests hold our client against the npm e2b SDK itself (2.51.0, from
// test/compat/node_modules): the same Dockerfile and context built by both
// against the fake API must give the same steps, the same COPY hashes (the
// server's cache key) and archives with the same entries. They need Node.js
// and `npm ci` in test/compat (run.sh does it; so does the compat stage).

// sdkModule is the SDK's ESM entry, or the test is skipped.
func sdkModule(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("node"); err != nil {
		t.Skip("node is not installed: the SDK comparison needs Node.js >= 20.18.1")
	}
	p, err := filepath.Abs("../../test/compat/node_modules/e2b/dist/index.mjs")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Skipf("the e2b SDK is not installed (%v): run `npm ci` in test/compat", err)
	}
	return p
}

// runNode runs an ES module script with the SDK's path in E2B_MODULE.
func runNode(t *testing.T, module, script string, env []string, args ...string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "script.mjs")
	if err := os.WriteFile(f, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", append([]string{f}, args...)...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "E2B_MODULE=" + module}, env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v\n%s%s", err, out, stderr.String())
	}
	return string(out)
}

const sdkBuildScript = `
import { readFileSync } from 'node:fs'
const { Template } = await import(process.env.E2B_MODULE)
const [dir, dockerfile, name] = process.argv.slice(2)
const t = Template({ fileContextPath: dir }).fromDockerfile(readFileSync(dockerfile, 'utf8'))
await Template.build(t, name, { onBuildLogs: (e) => console.log(String(e)) })
`

func TestSameAsSDK(t *testing.T) {
	module := sdkModule(t)
	dir := makeContext(t)
	dockerfile := `FROM e2bdev/base
ENV GREETING=hello
COPY app /home/user/app
COPY *.txt /tmp/
COPY --chown=user conf/ /etc/conf
COPY . /srv/ctx
COPY app/*.py app/sub /opt/
RUN echo "a b" && \
    echo c
WORKDIR /home/user/app
CMD ["python3", "-m", "http.server", "8000"]
`
	df := filepath.Join(t.TempDir(), "Dockerfile")
	if err := os.WriteFile(df, []byte(dockerfile), 0o644); err != nil {
		t.Fatal(err)
	}

	sdk := newFakeAPI(t)
	logs := runNode(t, module, sdkBuildScript, []string{"E2B_API_URL=" + sdk.srv.URL, "E2B_API_KEY=" + testKey}, dir, df, "same")
	if !strings.Contains(logs, "Template created with ID: tpl0123456789abcdefgh, Build ID: b-1") {
		t.Errorf("the SDK build did not run:\n%s", logs)
	}

	ours := newFakeAPI(t)
	c := &Client{URL: ours.srv.URL, APIKey: testKey}
	if _, err := c.Build(context.Background(), BuildOptions{Name: "same", Spec: parse(t, dockerfile), ContextDir: dir,
		PollInterval: 10 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}

	if !reflect.DeepEqual(ours.creates, sdk.creates) {
		t.Errorf("POST /v3/templates: ours %v, the SDK's %v", ours.creates, sdk.creates)
	}
	var want, got any
	json.Unmarshal(sdk.starts[0], &want)
	json.Unmarshal(ours.starts[0], &got)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("build start body:\nours    %s\nthe SDK %s", ours.starts[0], sdk.starts[0])
	}
	if len(sdk.uploads) != 6 {
		t.Errorf("the SDK uploaded %d archives, want 6", len(sdk.uploads))
	}
	for hash, archive := range sdk.uploads {
		mine, ok := ours.uploads[hash]
		if !ok {
			t.Errorf("we did not upload %s (hashes differ?)", hash)
			continue
		}
		if a, b := readTarGz(t, mine), readTarGz(t, archive); !reflect.DeepEqual(a, b) {
			t.Errorf("archive %s:\nours    %+v\nthe SDK %+v", hash, a, b)
		}
	}
}

// TestFilesHashSameAsSDK compares FilesHash with the SDK's hashes for
// source patterns and ignore rules one by one (Template.toJSON computes
// them offline).
func TestFilesHashSameAsSDK(t *testing.T) {
	module := sdkModule(t)
	dir := makeContext(t)
	sources := []string{"app", "app/", "./app", "app/*", "app/**", "app/**/*.py", "*.txt", "conf", ".", "**/*.conf",
		"app/confdir", "app/confdir/*", "app/{main,link}.py", "app/[cd]*", "app/[!cd]*", "missing", "app/*.nothing", "app/sub/run.sh", "one.txt"}
	script := `
const { Template } = await import(process.env.E2B_MODULE)
const [dir, ...sources] = process.argv.slice(2)
const out = []
for (const src of sources) {
  try {
    const t = Template({ fileContextPath: dir }).fromImage('x').copy(src, '/dest/')
    out.push(JSON.parse(await Template.toJSON(t, true)).steps[0].filesHash)
  } catch (err) {
    out.push('error: ' + err.message)
  }
}
console.log(JSON.stringify(out))
`
	var want []string
	if err := json.Unmarshal([]byte(runNode(t, module, script, nil, append([]string{dir}, sources...)...)), &want); err != nil {
		t.Fatal(err)
	}
	ignore, err := ReadDockerignore(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i, src := range sources {
		got, err := FilesHash(dir, src, "/dest/", ignore)
		if strings.HasPrefix(want[i], "error: ") {
			if err == nil || !strings.Contains(want[i], "No files found") || !strings.Contains(err.Error(), "no files found") {
				t.Errorf("COPY %s: the SDK fails (%s), we: %v", src, want[i], err)
			}
			continue
		}
		if err != nil {
			t.Errorf("COPY %s: %v (the SDK's hash: %s)", src, err, want[i])
			continue
		}
		if got != want[i] {
			files, _ := selectFiles(dir, src, ignore)
			var rels []string
			for _, f := range files {
				rels = append(rels, f.rel)
			}
			t.Errorf("COPY %s: hash %s, the SDK's %s (we selected %q)", src, got, want[i], rels)
		}
	}
}

// TestParseSameAsSDK compares ParseDockerfile with the SDK's
// fromDockerfile on files where Docker and the SDK agree (see
// TestParseDockerfile for where they do not and we follow Docker).
func TestParseSameAsSDK(t *testing.T) {
	module := sdkModule(t)
	files := []string{
		"FROM e2bdev/base\n",
		"# syntax=docker/dockerfile:1\nFROM python:3.12-slim AS app\nUSER app\n",
		"FROM x\nENV A=1 B=2\nENV C 3\nARG D\nARG E=5\nWORKDIR /srv\n",
		"FROM x\nRUN apt-get update && \\\n    # comment\n    apt-get install -y curl\n\nRUN echo   spaced   out\n",
		"FROM x\nCOPY --chown=user:user app /home/user/app\nADD one.txt two.txt /opt/\nCOPY conf/ /etc/\n",
		"FROM x\nCMD [\"python3\", \"-m\", \"http.server\", \"8000\"]\n",
		"FROM x\nENTRYPOINT node server.js\n",
		"FROM x\nCMD sleep infinity\nEXPOSE 8080\nVOLUME /data\nUSER root\nWORKDIR /\n",
	}
	script := `
const { Template } = await import(process.env.E2B_MODULE)
const out = []
for (const file of JSON.parse(process.argv[2])) {
  out.push(JSON.parse(await Template.toJSON(Template({ fileContextPath: '.' }).fromDockerfile(file), false)))
}
console.log(JSON.stringify(out))
`
	arg, _ := json.Marshal(files)
	var want []any
	if err := json.Unmarshal([]byte(runNode(t, module, script, nil, string(arg))), &want); err != nil {
		t.Fatal(err)
	}
	for i, file := range files {
		spec := parse(t, file)
		b, _ := json.Marshal(spec)
		var got any
		json.Unmarshal(b, &got)
		if !reflect.DeepEqual(got, want[i]) {
			w, _ := json.Marshal(want[i])
			t.Errorf("%q:\nours    %s\nthe SDK %s", file, b, w)
		}
	}
}
