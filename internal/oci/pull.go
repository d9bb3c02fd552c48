package oci

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Credentials are a template build's fromImageRegistry (TEMPLATES.md §1).
type Credentials struct {
	// Type is "registry" (or empty) for username and password; E2B's "aws"
	// and "gcp" are not supported.
	Type     string
	Username string
	Password string
}

// authenticator turns credentials into go-containerregistry's form.
func (c *Credentials) authenticator() (authn.Authenticator, error) {
	if c == nil {
		return authn.Anonymous, nil
	}
	switch c.Type {
	case "", "registry":
		if c.Username == "" && c.Password == "" {
			return authn.Anonymous, nil
		}
		return &authn.Basic{Username: c.Username, Password: c.Password}, nil
	case "aws", "gcp":
		return nil, fmt.Errorf("fromImageRegistry type %q is not supported by warren; use type \"registry\" with a username and password, or pull the image elsewhere and `warren image import` it", c.Type)
	default:
		return nil, fmt.Errorf("fromImageRegistry type %q is not one of registry, aws, gcp", c.Type)
	}
}

// Pull fetches ref (the linux image for this host's architecture) from its
// registry into the store, replacing a stored image of that name.
func (s *Store) Pull(ctx context.Context, ref string, creds *Credentials) (Info, error) {
	r, err := ParseReference(ref)
	if err != nil {
		return Info{}, err
	}
	return s.pull(ctx, r, creds)
}

func (s *Store) pull(ctx context.Context, ref name.Reference, creds *Credentials) (Info, error) {
	auth, err := creds.authenticator()
	if err != nil {
		return Info{}, fmt.Errorf("pull %s: %w", FamiliarName(ref), err)
	}
	start := time.Now()
	registry := ref.Context().RegistryStr()
	s.log().Info("image pull: fetching manifest", "name", FamiliarName(ref), "registry", registry)
	want := v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	img, err := remote.Image(ref, remote.WithContext(ctx), remote.WithAuth(auth), remote.WithPlatform(want))
	if err != nil {
		return Info{}, fmt.Errorf("image %s is not in warren's image store and pulling it from %s failed: %w; "+
			"import it instead: `warren image import %s FILE`, FILE from `docker save %s` or an OCI archive",
			FamiliarName(ref), registry, err, FamiliarName(ref), FamiliarName(ref))
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return Info{}, fmt.Errorf("pull %s: read image config: %w", FamiliarName(ref), err)
	}
	if cf.OS != want.OS || cf.Architecture != want.Architecture {
		return Info{}, fmt.Errorf("pull %s: the registry has no %s image (got %s/%s); warren's VMs run %s",
			FamiliarName(ref), want, cf.OS, cf.Architecture, want)
	}
	s.reclaimWork()
	work, err := s.workDir("pull-")
	if err != nil {
		return Info{}, err
	}
	defer os.RemoveAll(work) // renamed away on success
	stored, err := s.writeLayout(ctx, ref, img, work, "pull")
	if err != nil {
		return Info{}, fmt.Errorf("pull %s: %w", FamiliarName(ref), err)
	}
	info, err := imageInfo(ref, stored, "pull")
	if err != nil {
		return Info{}, fmt.Errorf("pull %s: %w", FamiliarName(ref), err)
	}
	if err := s.commit(ctx, ref, work, info); err != nil {
		return Info{}, err
	}
	s.log().Info("image pull: done", "name", FamiliarName(ref), "digest", info.Digest, "layers", info.Layers,
		"bytes", info.Size, "elapsed", time.Since(start).Round(100*time.Millisecond))
	return info, nil
}
