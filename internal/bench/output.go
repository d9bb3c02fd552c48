package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Files written by WriteDir.
const (
	ReportFile  = "report.md"
	PlotFile    = "tti.png"
	ResultsFile = "results.json"
)

// WriteDir writes the report, the TTI plot and the raw results into dir.
func (r *Results) WriteDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	write := func(name string, fn func(f *os.File) error) error {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			return err
		}
		if err := fn(f); err != nil {
			f.Close()
			return fmt.Errorf("write %s: %w", f.Name(), err)
		}
		return f.Close()
	}
	if err := write(PlotFile, func(f *os.File) error { return r.PlotTTI(f) }); err != nil {
		return err
	}
	if err := write(ReportFile, func(f *os.File) error { return r.WriteMarkdown(f, PlotFile) }); err != nil {
		return err
	}
	return write(ResultsFile, func(f *os.File) error {
		enc := json.NewEncoder(f)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	})
}
