// Package state holds what envd knows about its sandbox: the values the control
// plane hands over through POST /init (environment, access token, default user
// and working directory) and that every request reads.
package state

import (
	"crypto/subtle"
	"maps"
	"sync"
)

// Sandbox is the sandbox-wide configuration. It is safe for concurrent use.
type Sandbox struct {
	mu      sync.RWMutex
	envVars map[string]string
	token   string
	user    string
	workdir string
}

// New returns the state envd starts with: no token, the given default user.
func New(defaultUser string) *Sandbox {
	return &Sandbox{envVars: map[string]string{}, user: defaultUser}
}

// EnvVars returns a copy of the sandbox-level environment variables.
func (s *Sandbox) EnvVars() map[string]string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return maps.Clone(s.envVars)
}

// MergeEnvVars adds vars to the sandbox-level environment; later values win.
func (s *Sandbox) MergeEnvVars(vars map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	maps.Copy(s.envVars, vars)
}

// DefaultUser is the user for requests that name none.
func (s *Sandbox) DefaultUser() string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.user
}

// SetDefaultUser changes the user for requests that name none.
func (s *Sandbox) SetDefaultUser(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.user = name
}

// DefaultWorkdir is the directory for processes and paths when the request gives
// none; empty means the user's home.
func (s *Sandbox) DefaultWorkdir() string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workdir
}

// SetDefaultWorkdir changes the default working directory.
func (s *Sandbox) SetDefaultWorkdir(dir string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.workdir = dir
}

// AccessToken returns the token every request must carry; "" means none is required.
func (s *Sandbox) AccessToken() string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.token
}

// SetAccessToken replaces the access token.
func (s *Sandbox) SetAccessToken(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.token = token
}

// TokenMatches reports whether got equals the access token, in constant time.
// It is false when no token is set.
func (s *Sandbox) TokenMatches(got string) bool {
	want := s.AccessToken()
	return want != "" && subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}
