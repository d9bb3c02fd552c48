package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"text/tabwriter"

	"github.com/warren-sh/warren/internal/oci"
)

func init() {
	commands["image"] = command{summary: "import, list and remove the images templates are built from (fromImage)", run: runImage}
}

const imageUsage = `Usage: warren image <command> [flags] [args]

Manages warren's local image store (DATA/images), where template builds find
the image named by fromImage (Template().fromImage("python:3.12-slim"), or FROM
in an e2b.Dockerfile). A build whose image is not in the store pulls it from
its registry, with the build's fromImageRegistry credentials; on a host that
cannot reach the registry, import the image instead.

Commands:
  import NAME FILE   add the image in FILE under NAME (a tag; NAME without
                     one means NAME:latest), replacing an image of that name.
                     FILE is an OCI image layout archive (docker buildx build
                     --output type=oci,dest=FILE; skopeo copy ... oci-archive:FILE)
                     or a docker save tarball (docker save -o FILE NAME), maybe
                     gzipped. Only its linux/amd64 image is kept.
  ls                 list the stored images
  rm NAME...         remove images (and the root filesystems built from them)

Names are Docker references: python:3.12-slim is
docker.io/library/python:3.12-slim, the name a build's fromImage matches.

Run 'warren image <command> --help' for its flags.
`

func runImage(args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(os.Stderr, imageUsage)
		return nil
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("image "+sub, flag.ExitOnError)
	e := &envFlags{fs: fs}
	dataDir := e.String("data-dir", "WARREN_DATA_DIR", "/var/lib/warren", "warren's data directory; images live in DATA/images")
	var asJSON *bool
	var synopsis string
	switch sub {
	case "import":
		synopsis = "import [flags] NAME FILE"
	case "ls", "list":
		synopsis = "ls [flags]"
		asJSON = fs.Bool("json", false, "print the images as JSON")
	case "rm", "remove":
		synopsis = "rm [flags] NAME..."
	default:
		fmt.Fprint(os.Stderr, imageUsage)
		return fmt.Errorf("image: unknown command %q (import, ls, rm)", sub)
	}
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: warren image %s\n\nFlags (each also read from the environment variable shown):\n", synopsis)
		fs.PrintDefaults()
		fmt.Fprint(fs.Output(), "\nSee 'warren image --help' for what the commands do.\n")
	}
	fs.Parse(args)
	if err := e.err(); err != nil {
		return err
	}
	store := &oci.Store{
		Dir: filepath.Join(*dataDir, "images"),
		// Progress (layers, bytes) on stderr; the result on stdout.
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{
			ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
				if a.Key == slog.TimeKey && len(groups) == 0 {
					return slog.Attr{}
				}
				return a
			},
		})),
	}
	switch sub {
	case "import":
		if fs.NArg() != 2 {
			fs.Usage()
			return fmt.Errorf("image import takes NAME and FILE, got %q", fs.Args())
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		info, err := store.Import(ctx, fs.Arg(0), fs.Arg(1))
		if err != nil {
			return err
		}
		fmt.Printf("imported %s (%s, %d layers, %s)\n", info.FamiliarName(), info.Digest, info.Layers, humanBytes(info.Size))
	case "ls", "list":
		if fs.NArg() != 0 {
			return fmt.Errorf("image ls takes no arguments, got %q", fs.Args())
		}
		images, err := store.List()
		if err != nil {
			return err
		}
		if *asJSON {
			enc := json.NewEncoder(os.Stdout)
			enc.SetIndent("", "  ")
			if images == nil {
				images = []oci.Info{}
			}
			return enc.Encode(images)
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tDIGEST\tSIZE\tADDED\tSOURCE")
		for _, i := range images {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", i.FamiliarName(), shortDigest(i.Digest), humanBytes(i.Size),
				i.Added.Local().Format("2006-01-02 15:04"), i.Source)
		}
		return tw.Flush()
	case "rm", "remove":
		if fs.NArg() == 0 {
			fs.Usage()
			return fmt.Errorf("image rm takes one or more NAMEs")
		}
		for _, n := range fs.Args() {
			if err := store.Remove(n); err != nil {
				return err
			}
			fmt.Printf("removed %s\n", n)
		}
	}
	return nil
}

// shortDigest is sha256:<12 hex digits>, as docker prints image IDs.
func shortDigest(d string) string {
	if len(d) > len("sha256:")+12 {
		return d[:len("sha256:")+12]
	}
	return d
}

func humanBytes(n int64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", float64(n)/float64(div), "kMGTPE"[exp])
}
