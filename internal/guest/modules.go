package guest

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
)

// Modules are the drivers a warren VM needs that Debian's cloud kernel builds
// as modules: the virtio-mmio transport of QEMU's microvm machine, the root
// disk and the network card. Their dependencies are added from each module's
// own depends= field.
var Modules = []string{"virtio_mmio", "virtio_blk", "virtio_net"}

// Module is a kernel module file and what it depends on.
type Module struct {
	Name    string
	Path    string
	Depends []string
}

// ModuleOrder returns the named modules and everything they depend on, each
// after its dependencies: the order to load them in. Debian's package ships no
// modules.dep, so the order comes from the depends= field of each .ko's
// .modinfo section.
func ModuleOrder(modulesDir string, names []string) ([]Module, error) {
	paths, err := moduleFiles(modulesDir)
	if err != nil {
		return nil, err
	}
	var order []Module
	state := map[string]int{} // 1: visiting, 2: done
	var visit func(name, neededBy string) error
	visit = func(name, neededBy string) error {
		name = moduleName(name)
		switch state[name] {
		case 1:
			return fmt.Errorf("module %s depends on itself (through %s)", name, neededBy)
		case 2:
			return nil
		}
		path, ok := paths[name]
		if !ok {
			if neededBy != "" {
				return fmt.Errorf("module %s (needed by %s) not found under %s", name, neededBy, modulesDir)
			}
			return fmt.Errorf("module %s not found under %s", name, modulesDir)
		}
		state[name] = 1
		deps, err := moduleDepends(path)
		if err != nil {
			return err
		}
		for _, dep := range deps {
			if err := visit(dep, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, Module{Name: name, Path: path, Depends: deps})
		return nil
	}
	for _, name := range names {
		if err := visit(name, ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleFiles maps module names to their .ko files under dir.
func moduleFiles(dir string) (map[string]string, error) {
	paths := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if strings.HasSuffix(path, ".ko") && d.Type().IsRegular() {
			paths[moduleName(strings.TrimSuffix(d.Name(), ".ko"))] = path
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list modules: %w", err)
	}
	return paths, nil
}

// moduleName normalises a module name as the kernel does: '-' and '_' are
// the same (virtio-rng.ko is module virtio_rng).
func moduleName(s string) string { return strings.ReplaceAll(s, "-", "_") }

// moduleDepends reads depends= from a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo of %s: %w", path, err)
	}
	for _, field := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(field, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}
