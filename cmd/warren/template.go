package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/warren-sh/warren/internal/templatecli"
)

func init() {
	commands["template"] = command{summary: "build, list and delete templates through warren's API", run: runTemplate}
}

const templateUsage = `Usage: warren template <command> [flags]

Commands:
  build   build a template from a Dockerfile (like 'e2b template create')
  ls      list the templates of your team
  rm      delete a template by name or ID
  gc      remove template build storage nothing uses, and trim the build
          cache (runs on this host's data directory, not through the API)

build, ls and rm talk to warren's API like the e2b CLI does:
  --api-url  WARREN_API_URL, else E2B_API_URL, else http://localhost:3000
             (where 'warren up' listens by default)
  --api-key  WARREN_API_KEY, else E2B_API_KEY, else the key 'warren up'
             wrote to $WARREN_DATA_DIR/api-key (default /var/lib/warren)

Run 'warren template <command> --help' for a command's flags.
`

func runTemplate(args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(os.Stderr, templateUsage)
		return nil
	}
	sub := map[string]func([]string) error{
		"build": runTemplateBuild, "ls": runTemplateList, "list": runTemplateList,
		"rm": runTemplateRemove, "delete": runTemplateRemove,
		"gc": runTemplateGC,
	}
	run, ok := sub[args[0]]
	if !ok {
		fmt.Fprint(os.Stderr, templateUsage)
		return fmt.Errorf("template: unknown command %q (build, ls, rm, gc)", args[0])
	}
	if err := run(args[1:]); !errors.Is(err, flag.ErrHelp) {
		return err
	}
	return nil
}

// apiFlags registers --api-url and --api-key and returns the client they
// configure once the flags are parsed.
func apiFlags(fs *flag.FlagSet) func() (*templatecli.Client, error) {
	apiURL := fs.String("api-url", cmp.Or(os.Getenv("WARREN_API_URL"), os.Getenv("E2B_API_URL"), "http://localhost:3000"),
		"warren's API URL (WARREN_API_URL, E2B_API_URL)")
	apiKey := fs.String("api-key", cmp.Or(os.Getenv("WARREN_API_KEY"), os.Getenv("E2B_API_KEY")),
		"API key (WARREN_API_KEY, E2B_API_KEY; default: the key in $WARREN_DATA_DIR/api-key)")
	return func() (*templatecli.Client, error) {
		key := *apiKey
		if key == "" {
			file := filepath.Join(cmp.Or(os.Getenv("WARREN_DATA_DIR"), "/var/lib/warren"), "api-key")
			b, err := os.ReadFile(file)
			if err != nil {
				return nil, fmt.Errorf("no API key: set --api-key, WARREN_API_KEY or E2B_API_KEY (reading %s: %v)", file, err)
			}
			key = strings.TrimSpace(string(b))
		}
		return &templatecli.Client{URL: *apiURL, APIKey: key}, nil
	}
}

// parseInterleaved parses flags that may come before or after positional
// arguments ("build NAME -f x" and "build -f x NAME") and returns the
// positional ones.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func runTemplateBuild(args []string) error {
	fs := flag.NewFlagSet("template build", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: warren template build [flags] NAME[:TAG]

Builds a template from a Dockerfile, as 'e2b template create' does: the
Dockerfile is translated here (FROM becomes the base image, e2bdev/base is
warren's base template; RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, CMD and
ENTRYPOINT are kept), COPY sources are uploaded from the context directory
(honouring .dockerignore), and the build log is printed as it happens.
Templates run as "user" in /home/user unless the Dockerfile sets USER or
WORKDIR. CMD/ENTRYPOINT (or -c) becomes the start command, running in every
sandbox of the template; the template is snapshotted once the ready command
exits 0 (default "sleep 20").

Flags:
`)
		fs.PrintDefaults()
	}
	client := apiFlags(fs)
	file := fs.String("f", "", "the Dockerfile (default: e2b.Dockerfile, else Dockerfile, in the context directory)")
	contextDir := fs.String("p", ".", "context directory: where COPY sources are")
	startCmd := fs.String("c", "", "start command (overrides CMD/ENTRYPOINT)")
	readyCmd := fs.String("ready-cmd", "", "command that must exit 0 before the template is ready (default \"sleep 20\" with a start command)")
	cpus := fs.Int("cpu-count", 0, "vCPUs of the template's sandboxes: 1 or an even number (default: the server's, 2)")
	memory := fs.Int("memory-mb", 0, "memory of the template's sandboxes in MiB, even (default: the server's, 1024)")
	noCache := fs.Bool("no-cache", false, "rebuild every step, ignoring the build cache")
	var tags stringList
	fs.Var(&tags, "tag", "extra tag for this build (repeatable)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		fs.Usage()
		return fmt.Errorf("template build takes one NAME[:TAG], got %d arguments", len(pos))
	}
	c, err := client()
	if err != nil {
		return err
	}
	path, err := findDockerfile(*file, *contextDir)
	if err != nil {
		return err
	}
	text, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	spec, warnings, err := templatecli.ParseDockerfile(string(text))
	if err != nil {
		return err
	}
	for _, w := range warnings {
		fmt.Fprintln(os.Stderr, "warning:", w)
	}
	if *startCmd != "" {
		spec.StartCmd, spec.ReadyCmd = *startCmd, templatecli.DefaultReadyCmd
	}
	if *readyCmd != "" {
		spec.ReadyCmd = *readyCmd
	}
	spec.Force = *noCache

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	fmt.Printf("Building template %s from %s (context %s)\n", pos[0], path, *contextDir)
	res, err := c.Build(ctx, templatecli.BuildOptions{
		Name: pos[0], Tags: tags, CPUCount: *cpus, MemoryMB: *memory,
		Spec: spec, ContextDir: *contextDir, Progress: os.Stdout,
	})
	if err != nil {
		return err
	}
	fmt.Printf("Built template %s in %s: template ID %s, build ID %s\n", pos[0], res.Duration.Round(100*time.Millisecond), res.TemplateID, res.BuildID)
	return nil
}

// findDockerfile is -f, or e2b.Dockerfile, else Dockerfile, in dir.
func findDockerfile(file, dir string) (string, error) {
	if file != "" {
		return file, nil
	}
	for _, name := range []string{"e2b.Dockerfile", "Dockerfile"} {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("no e2b.Dockerfile or Dockerfile in %s; name one with -f", dir)
}

func runTemplateList(args []string) error {
	fs := flag.NewFlagSet("template ls", flag.ContinueOnError)
	client := apiFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("template ls takes no arguments, got %q", fs.Args())
	}
	c, err := client()
	if err != nil {
		return err
	}
	list, err := c.ListTemplates(context.Background())
	if err != nil {
		return err
	}
	return templatecli.WriteTable(os.Stdout, list)
}

func runTemplateRemove(args []string) error {
	fs := flag.NewFlagSet("template rm", flag.ContinueOnError)
	client := apiFlags(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return errors.New("template rm takes one or more template names or IDs")
	}
	c, err := client()
	if err != nil {
		return err
	}
	ctx := context.Background()
	list, err := c.ListTemplates(ctx)
	if err != nil {
		return err
	}
	for _, ref := range pos {
		id := ref
		if t := templatecli.Find(list, ref); t != nil {
			id = t.TemplateID
		}
		if err := c.DeleteTemplate(ctx, id); err != nil {
			var ae *templatecli.APIError
			if errors.As(err, &ae) {
				// The server's words, as they are (409: in use, ...).
				return fmt.Errorf("template rm %s: %s", ref, ae.Message)
			}
			return err
		}
		fmt.Printf("Deleted template %s (%s)\n", ref, id)
	}
	return nil
}
