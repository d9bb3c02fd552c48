package transfer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNoDevice is OpenDevice in a guest without a transfer disk (a VM started
// from a snapshot older than the disk).
var ErrNoDevice = errors.New("no transfer disk")

// OpenDevice opens the guest's transfer disk, found by its virtio serial
// under sysBlock (/sys/block), for O_DIRECT reads.
func OpenDevice(sysBlock string) (*os.File, error) {
	entries, err := os.ReadDir(sysBlock)
	if err != nil {
		return nil, fmt.Errorf("find the transfer disk: %w", err)
	}
	for _, e := range entries {
		serial, err := os.ReadFile(filepath.Join(sysBlock, e.Name(), "serial"))
		if err != nil || strings.TrimSpace(string(serial)) != Serial {
			continue
		}
		return os.OpenFile(filepath.Join("/dev", e.Name()), os.O_RDONLY|unix.O_DIRECT, 0)
	}
	return nil, ErrNoDevice
}
