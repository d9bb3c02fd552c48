package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"
)

// envFlags registers flags whose defaults come from WARREN_* environment
// variables, so every setting works as a flag or in the environment.
type envFlags struct {
	fs   *flag.FlagSet
	errs []error
}

func (e *envFlags) String(name, env, def, usage string) *string {
	if v, ok := os.LookupEnv(env); ok {
		def = v
	}
	return e.fs.String(name, def, fmt.Sprintf("%s (%s)", usage, env))
}

func (e *envFlags) Int(name, env string, def int, usage string) *int {
	if v, ok := os.LookupEnv(env); ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			e.errs = append(e.errs, fmt.Errorf("%s=%q is not a whole number", env, v))
		}
		def = n
	}
	return e.fs.Int(name, def, fmt.Sprintf("%s (%s)", usage, env))
}

func (e *envFlags) Duration(name, env string, def time.Duration, usage string) *time.Duration {
	if v, ok := os.LookupEnv(env); ok {
		d, err := time.ParseDuration(v)
		if err != nil {
			e.errs = append(e.errs, fmt.Errorf("%s=%q is not a duration such as 1h30m", env, v))
		}
		def = d
	}
	return e.fs.Duration(name, def, fmt.Sprintf("%s (%s)", usage, env))
}

// err is the first bad environment value, if any.
func (e *envFlags) err() error {
	if len(e.errs) > 0 {
		return e.errs[0]
	}
	return nil
}
