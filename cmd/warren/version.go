package main

import (
	"fmt"

	"github.com/warren-sh/warren/internal/version"
)

func init() {
	commands["version"] = command{summary: "print the version", run: func([]string) error {
		fmt.Printf("warren %s (envd protocol %s)\n", version.Version, version.EnvdVersion)
		return nil
	}}
}
