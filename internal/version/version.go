// Package version holds the build's version string, set by the linker.
package version

// Version is warren's version, set with -ldflags "-X .../internal/version.Version=...".
var Version = "dev"

// EnvdVersion is the E2B envd protocol version the agent reports. The SDKs gate
// features on it (ENVD.md §10); anything below 0.6.4 switches features off.
const EnvdVersion = "0.6.13"
