package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/warren-sh/warren/internal/doctor"
)

func init() {
	commands["doctor"] = command{summary: "check this host for running sandboxes and print fixes", run: runDoctor}
}

func runDoctor(args []string) error {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	dataDir := fs.String("data-dir", cmp.Or(os.Getenv("WARREN_DATA_DIR"), "/var/lib/warren"), "warren's data directory (env WARREN_DATA_DIR)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("doctor takes no arguments, got %q", fs.Args())
	}
	r := doctor.Run(context.Background(), *dataDir)
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(r); err != nil {
			return err
		}
	} else if err := r.WriteText(os.Stdout); err != nil {
		return err
	}
	if n := r.Failed(); n > 0 {
		return fmt.Errorf("doctor: %d check(s) failed", n)
	}
	return nil
}
