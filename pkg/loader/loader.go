// Package loader loads the vnetbpf datapath (bpf/datapath.c), pins its maps under a bpffs
// root, and attaches its programs to network devices with TCX (clsact and cls_bpf on kernels
// without TCX). A new endpoint's veth gets a cls_bpf filter first, fast enough for the CNI
// ADD path, which AttachEndpoint(ifname, true) moves to TCX later (see ModeAuto).
//
// Layout under the root (default /sys/fs/bpf/vnetbpf):
//
//	<root>/<map>            every map, pinned by name (endpoints, vnet_cidrs, config, ...)
//	<root>/links/<ifname>   the TCX link of each device a program is attached to
//
// Pinned maps and links outlive the process, so the datapath keeps forwarding while the agent
// restarts; a new Load reuses the pinned maps with their contents.
package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// DefaultRoot is the bpffs directory the agent pins under unless configured otherwise.
const DefaultRoot = "/sys/fs/bpf/vnetbpf"

// Options configure Load.
type Options struct {
	// Root is the bpffs directory for pins; it is created if missing.
	Root string
	// Mode chooses how programs are attached; the zero value is ModeAuto.
	Mode Mode
	// Spec replaces the embedded object, for tools and tests that load a changed datapath
	// (an upgrade); nil loads the one built into this binary.
	Spec *ebpf.CollectionSpec
}

// Datapath is the loaded programs and maps.
type Datapath struct {
	root       string
	configured Mode // as asked for in Options
	mode       Mode // the NIC's: configured, with ModeAuto resolved at the first Attach
	// Replaced names the pinned maps Load found with another definition (an upgrade that
	// changed them) and replaced with new, empty ones.
	Replaced []string
	Objects  DatapathObjects

	modeMu sync.Mutex
	noTCX  atomic.Bool // the kernel refused a TCX attach
}

// Load loads the datapath, pinning its maps under opts.Root or reusing the maps already
// pinned there (their entries are kept). A pinned map whose definition changed (a new
// version's) is unpinned and created anew, empty, and named in Replaced: the programs
// attached now keep the old map, which lives as long as they do, so forwarding goes on
// until the caller has filled the new maps and attached the new programs. Every map is
// state the agent can write again from its store and the node.
func Load(opts Options) (*Datapath, error) {
	if opts.Root == "" {
		opts.Root = DefaultRoot
	}
	if opts.Mode == "" {
		opts.Mode = ModeAuto
	}
	if err := opts.Mode.validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(opts.Root, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w (is bpffs mounted at %s?)", err, filepath.Dir(opts.Root))
	}
	d := &Datapath{root: opts.Root, configured: opts.Mode, mode: opts.Mode}
	spec := opts.Spec
	if spec == nil {
		var err error
		if spec, err = LoadDatapath(); err != nil {
			return nil, fmt.Errorf("load datapath spec: %w", err)
		}
	}
	load := func() error {
		return spec.LoadAndAssign(&d.Objects, &ebpf.CollectionOptions{
			Maps: ebpf.MapOptions{PinPath: opts.Root},
		})
	}
	err := load()
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		if d.Replaced, err = unpinIncompatible(spec, opts.Root); err != nil {
			return nil, fmt.Errorf("load datapath: %w", err)
		}
		err = load()
	}
	var verr *ebpf.VerifierError
	if errors.As(err, &verr) {
		return nil, fmt.Errorf("load datapath: %+v", verr)
	}
	if err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	return d, nil
}

// unpinIncompatible removes the pins under root of maps whose definition differs from spec's.
func unpinIncompatible(spec *ebpf.CollectionSpec, root string) ([]string, error) {
	var replaced []string
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		pin := filepath.Join(root, name)
		m, err := ebpf.LoadPinnedMap(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w", pin, err)
		}
		incompatible := ms.Compatible(m) != nil
		m.Close()
		if !incompatible {
			continue
		}
		if err := os.Remove(pin); err != nil {
			return nil, fmt.Errorf("replace map %s of another version: %w", pin, err)
		}
		replaced = append(replaced, name)
	}
	slices.Sort(replaced)
	return replaced, nil
}

// Root is the bpffs directory the datapath is pinned under.
func (d *Datapath) Root() string { return d.root }

// Close releases this process's handles. Pinned maps and links, and so the forwarding, stay.
func (d *Datapath) Close() error {
	return d.Objects.Close()
}

// Unpin removes every pin under root: maps and links. Programs attached through a pinned
// TCX link are detached; clsact filters are not (Detach removes those per device).
func Unpin(root string) error {
	if err := os.RemoveAll(root); err != nil {
		return fmt.Errorf("remove pins under %s: %w", root, err)
	}
	return nil
}

var reasonNames = sync.OnceValues(func() (map[uint32]string, error) {
	spec, err := LoadDatapath()
	if err != nil {
		return nil, err
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("stat_reason", &enum); err != nil {
		return nil, fmt.Errorf("find enum stat_reason: %w", err)
	}
	names := make(map[uint32]string, len(enum.Values))
	for _, v := range enum.Values {
		if v.Value < uint64(DatapathStatReasonSTAT_REASON_MAX) {
			names[uint32(v.Value)] = v.Name
		}
	}
	return names, nil
})

// ReasonName is the C name of a stats reason (FWD_LOCAL, DROP_SPOOFED_IP, ...), read from the
// object's BTF so that Go and C cannot disagree.
func ReasonName(r DatapathStatReason) string {
	names, err := reasonNames()
	if err == nil {
		if n, ok := names[uint32(r)]; ok {
			return n
		}
	}
	return fmt.Sprintf("REASON_%d", uint32(r))
}

// Reasons lists every stats reason in order.
func Reasons() []DatapathStatReason {
	rs := make([]DatapathStatReason, 0, DatapathStatReasonSTAT_REASON_MAX)
	for r := DatapathStatReason(0); r < DatapathStatReasonSTAT_REASON_MAX; r++ {
		rs = append(rs, r)
	}
	return rs
}
