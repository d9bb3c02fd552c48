// Command warren is the host binary: self-hosted, E2B-compatible sandboxes.
// Each subcommand lives in its own file; logic lives in internal/.
package main

import (
	"fmt"
	"os"
	"sort"
)

// command is one subcommand of warren.
type command struct {
	summary string
	run     func(args []string) error
}

var commands = map[string]command{}

func main() {
	if len(os.Args) < 2 || os.Args[1] == "help" || os.Args[1] == "-h" || os.Args[1] == "--help" {
		usage()
		return
	}
	cmd, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "warren: unknown command %q\n\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	if err := cmd.run(os.Args[2:]); err != nil {
		fmt.Fprintln(os.Stderr, "warren:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, "warren — self-hosted, E2B-compatible sandboxes\n\nUsage: warren <command> [flags]\n\nCommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprint(os.Stderr, "\nRun 'warren <command> --help' for a command's flags.\n")
}
