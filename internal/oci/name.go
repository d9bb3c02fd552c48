package oci

import (
	"fmt"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// ParseReference parses an image reference the way Docker does: `python:3.12-slim`
// is index.docker.io/library/python:3.12-slim, a name without tag or digest
// means :latest.
func ParseReference(s string) (name.Reference, error) {
	ref, err := name.ParseReference(s)
	if err != nil {
		return nil, fmt.Errorf("image name %q is not a valid reference (like python:3.12-slim or registry.example.com/team/app:v1): %w", s, err)
	}
	return ref, nil
}

// FamiliarName is ref as a person writes it: Docker Hub's registry and its
// library/ namespace are left out (python:3.12-slim, team/app:v1); other
// registries stay (ghcr.io/team/app:v1).
func FamiliarName(ref name.Reference) string {
	repo := ref.Context()
	s := repo.RepositoryStr()
	if repo.RegistryStr() == name.DefaultRegistry {
		s = strings.TrimPrefix(s, "library/")
	} else {
		s = repo.RegistryStr() + "/" + s
	}
	switch r := ref.(type) {
	case name.Digest:
		return s + "@" + r.DigestStr()
	default:
		return s + ":" + ref.Identifier()
	}
}
