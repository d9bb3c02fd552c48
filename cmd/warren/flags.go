package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/warren-sh/warren/internal/template"
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

func (e *envFlags) Bool(name, env string, def bool, usage string) *bool {
	if v, ok := os.LookupEnv(env); ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			e.errs = append(e.errs, fmt.Errorf("%s=%q is not one of true, false", env, v))
		}
		def = b
	}
	return e.fs.Bool(name, def, fmt.Sprintf("%s (%s)", usage, env))
}

// err is the first bad environment value, if any.
func (e *envFlags) err() error {
	if len(e.errs) > 0 {
		return e.errs[0]
	}
	return nil
}

// templateCacheMax registers --template-cache-max and returns its value,
// parsed, once the flags are.
func templateCacheMax(e *envFlags) func() (int64, error) {
	v := e.String("template-cache-max", "WARREN_TEMPLATE_CACHE_MAX", fmt.Sprintf("%dGiB", template.DefaultCacheMax>>30),
		"disk the template build cache (step layers, source images, snapshots of deleted templates) may keep beyond what live templates, sandboxes and builds use; least recently used entries go first. 0: keep only what costs nothing; off: no limit, remove only what nothing uses")
	return func() (int64, error) {
		n, err := template.ParseCacheMax(*v)
		if err != nil {
			return 0, fmt.Errorf("--template-cache-max %w", err)
		}
		return n, nil
	}
}
