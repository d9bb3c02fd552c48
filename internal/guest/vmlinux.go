package guest

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Under TCG the bzImage spends a good part of its boot decompressing itself
// with emulated instructions. QEMU can instead load the uncompressed vmlinux
// directly through its PVH entry point (Debian builds CONFIG_PVH=y), so
// FetchKernel unpacks it once on the host. The cloud kernel is compressed
// with LZ4 (CONFIG_KERNEL_LZ4), in lz4's legacy frame format.

// extractVmlinux writes the ELF kernel inside bzImage to out.
func extractVmlinux(bzImage, out string) error {
	img, err := os.ReadFile(bzImage)
	if err != nil {
		return err
	}
	payload, err := bzPayload(img)
	if err != nil {
		return fmt.Errorf("%s: %w", bzImage, err)
	}
	vmlinux, err := decompressPayload(payload)
	if err != nil {
		return fmt.Errorf("%s: decompress kernel: %w", bzImage, err)
	}
	if err := checkPVH(vmlinux); err != nil {
		return fmt.Errorf("%s: %w", bzImage, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), ".vmlinux-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	if _, err := tmp.Write(vmlinux); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), out)
}

// bzPayload returns the compressed kernel inside a bzImage (x86 boot
// protocol ≥ 2.08: payload_offset and payload_length in the setup header).
func bzPayload(img []byte) ([]byte, error) {
	if len(img) < 0x250 || string(img[0x202:0x206]) != "HdrS" {
		return nil, errors.New("not a bzImage (no HdrS setup header)")
	}
	if v := binary.LittleEndian.Uint16(img[0x206:]); v < 0x208 {
		return nil, fmt.Errorf("boot protocol %#x predates payload fields (2.08)", v)
	}
	setupSects := int(img[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	start := (setupSects+1)*512 + int(binary.LittleEndian.Uint32(img[0x248:]))
	end := start + int(binary.LittleEndian.Uint32(img[0x24c:]))
	if start < 0 || end > len(img) || start >= end {
		return nil, fmt.Errorf("payload [%d, %d) lies outside the %d-byte image", start, end, len(img))
	}
	return img[start:end], nil
}

// decompressPayload decompresses a bzImage payload and checks the result
// against the uncompressed size the kernel build appends to it.
func decompressPayload(payload []byte) ([]byte, error) {
	out, err := unlz4Legacy(payload)
	if err != nil {
		return nil, err
	}
	if want := binary.LittleEndian.Uint32(payload[len(payload)-4:]); uint32(len(out)) != want {
		return nil, fmt.Errorf("decompressed %d bytes, the image says %d", len(out), want)
	}
	return out, nil
}

// lz4LegacyMagic starts an lz4 legacy frame: independent blocks, each
// preceded by its compressed size.
var lz4LegacyMagic = []byte{0x02, 0x21, 0x4c, 0x18}

// unlz4Legacy decompresses an lz4 legacy frame. The kernel build appends the
// uncompressed size after the last block; like the kernel's own decompressor,
// it stops where the remaining bytes cannot hold the next block.
func unlz4Legacy(src []byte) ([]byte, error) {
	if !bytes.HasPrefix(src, lz4LegacyMagic) {
		return nil, errors.New("not LZ4 legacy data (is the kernel built with CONFIG_KERNEL_LZ4?)")
	}
	src = src[len(lz4LegacyMagic):]
	var dst []byte
	for len(src) >= 4 {
		n := int(binary.LittleEndian.Uint32(src))
		if bytes.Equal(src[:4], lz4LegacyMagic) { // a concatenated frame
			src = src[4:]
			continue
		}
		if n > len(src)-4 {
			break // the appended size, not a block
		}
		var err error
		if dst, err = unlz4Block(dst, src[4:4+n]); err != nil {
			return nil, err
		}
		src = src[4+n:]
	}
	if len(dst) == 0 {
		return nil, errors.New("no LZ4 blocks")
	}
	return dst, nil
}

// unlz4Block appends the decompressed LZ4 block src to dst. Matches refer only
// to this block's output: legacy-frame blocks are independent.
func unlz4Block(dst, src []byte) ([]byte, error) {
	base := len(dst)
	errCorrupt := errors.New("corrupt LZ4 block")
	length := func(i, n int) (int, int, error) {
		if n != 15 {
			return i, n, nil
		}
		for {
			if i >= len(src) {
				return 0, 0, errCorrupt
			}
			b := src[i]
			i++
			n += int(b)
			if b != 255 {
				return i, n, nil
			}
		}
	}
	for i := 0; i < len(src); {
		token := src[i]
		lit, match := int(token>>4), int(token&15)
		var err error
		if i, lit, err = length(i+1, lit); err != nil || i+lit > len(src) {
			return nil, errCorrupt
		}
		dst = append(dst, src[i:i+lit]...)
		i += lit
		if i == len(src) {
			break // the last sequence is literals only
		}
		if i+2 > len(src) {
			return nil, errCorrupt
		}
		off := int(src[i]) | int(src[i+1])<<8
		if i, match, err = length(i+2, match); err != nil || off == 0 || off > len(dst)-base {
			return nil, errCorrupt
		}
		// Byte by byte: a match may overlap the bytes it produces.
		from := len(dst) - off
		for k := range match + 4 {
			dst = append(dst, dst[from+k])
		}
	}
	return dst, nil
}

// checkPVH checks that vmlinux is an ELF kernel with a PVH entry point
// (the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY), which QEMU needs to boot it.
func checkPVH(vmlinux []byte) error {
	f, err := elf.NewFile(bytes.NewReader(vmlinux))
	if err != nil {
		return fmt.Errorf("decompressed kernel is not ELF: %w", err)
	}
	const xenElfnotePhys32Entry = 18
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes := make([]byte, p.Filesz)
		if _, err := p.ReadAt(notes, 0); err != nil {
			return err
		}
		for len(notes) >= 12 {
			namesz := int(binary.LittleEndian.Uint32(notes))
			descsz := int(binary.LittleEndian.Uint32(notes[4:]))
			typ := binary.LittleEndian.Uint32(notes[8:])
			name := notes[12:min(len(notes), 12+namesz)]
			if typ == xenElfnotePhys32Entry && bytes.HasPrefix(name, []byte("Xen")) {
				return nil
			}
			next := 12 + (namesz+3)&^3 + (descsz+3)&^3
			if next > len(notes) {
				break
			}
			notes = notes[next:]
		}
	}
	return errors.New("kernel has no PVH entry point (CONFIG_PVH); boot the bzImage instead")
}
