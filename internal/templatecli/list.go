package templatecli

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteTable prints templates as `warren template ls` shows them: ID,
// names, status of the latest build, CPUs, memory, creation time (local).
func WriteTable(w io.Writer, list []Template) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAMES\tSTATUS\tCPU\tMEMORY\tCREATED")
	for _, t := range list {
		names := strings.Join(t.Names, ",")
		if names == "" {
			names = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d MiB\t%s\n", t.TemplateID, names, t.BuildStatus, t.CPUCount, t.MemoryMB,
			t.CreatedAt.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

// Find returns the template whose ID, name or alias is ref ("name:tag"
// counts as name), or nil.
func Find(list []Template, ref string) *Template {
	name, _, _ := strings.Cut(strings.ToLower(strings.TrimSpace(ref)), ":")
	for i, t := range list {
		if t.TemplateID == name {
			return &list[i]
		}
	}
	for i, t := range list {
		for _, n := range append(append([]string{}, t.Names...), t.Aliases...) {
			if n == name {
				return &list[i]
			}
		}
	}
	return nil
}
