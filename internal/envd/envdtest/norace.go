//go:build !race

package envdtest

const raceEnabled = false
