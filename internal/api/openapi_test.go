package api

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestOpenAPIDocumentsExactlyTheRoutes holds openapi.yaml and the route
// table equal: every served (method, path) is documented and every
// documented one is served.
func TestOpenAPIDocumentsExactlyTheRoutes(t *testing.T) {
	var doc struct {
		OpenAPI    string                          `yaml:"openapi"`
		Paths      map[string]map[string]yaml.Node `yaml:"paths"`
		Components map[string]map[string]yaml.Node `yaml:"components"`
	}
	if err := yaml.Unmarshal(openAPIDocument, &doc); err != nil {
		t.Fatalf("openapi.yaml does not parse: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Errorf("openapi = %q, want 3.x", doc.OpenAPI)
	}
	methods := []string{"get", "put", "post", "delete", "options", "head", "patch", "trace"}
	var documented, served []string
	for path, item := range doc.Paths {
		for key := range item {
			if slices.Contains(methods, key) {
				documented = append(documented, strings.ToUpper(key)+" "+path)
			} else if key != "parameters" && key != "summary" && key != "description" {
				t.Errorf("path %s has unknown key %q", path, key)
			}
		}
	}
	for _, rt := range routes() {
		served = append(served, rt.method+" "+rt.path)
	}
	slices.Sort(documented)
	slices.Sort(served)
	if fmt.Sprint(documented) != fmt.Sprint(served) {
		for _, d := range documented {
			if !slices.Contains(served, d) {
				t.Errorf("documented but not served: %s", d)
			}
		}
		for _, s := range served {
			if !slices.Contains(documented, s) {
				t.Errorf("served but not documented: %s", s)
			}
		}
	}
	if dup := slices.Compact(slices.Clone(served)); len(dup) != len(served) {
		t.Error("the route table has duplicate rows")
	}

	// Every $ref points at a component that exists.
	var root yaml.Node
	if err := yaml.Unmarshal(openAPIDocument, &root); err != nil {
		t.Fatal(err)
	}
	var walk func(n *yaml.Node)
	walk = func(n *yaml.Node) {
		for i := 0; i+1 < len(n.Content); i++ {
			if n.Kind == yaml.MappingNode && i%2 == 0 && n.Content[i].Value == "$ref" {
				ref := n.Content[i+1].Value
				parts := strings.Split(strings.TrimPrefix(ref, "#/components/"), "/")
				if len(parts) != 2 {
					t.Errorf("line %d: unexpected $ref %q", n.Content[i+1].Line, ref)
				} else if _, ok := doc.Components[parts[0]][parts[1]]; !ok {
					t.Errorf("line %d: $ref %q points nowhere", n.Content[i+1].Line, ref)
				}
			}
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(&root)
}
