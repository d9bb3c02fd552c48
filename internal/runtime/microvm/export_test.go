package microvm

// SetCPUModel makes r cold boot guests on model instead of cpuModel's: a
// test's stand-in for a warren whose default model differs.
func SetCPUModel(r *Runtime, model string) { r.cpu = model }

// CPUModel is the default guest CPU model under a.
func CPUModel(a Accel) string { return cpuModel(a) }

// SetTransferDiskSize makes r cold boot guests with a transfer disk of size
// bytes; 0: none, a test's stand-in for a warren from before the disk.
func SetTransferDiskSize(r *Runtime, size int64) { r.transferSize = size }
