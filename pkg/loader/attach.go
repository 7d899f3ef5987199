package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Mode is how a program is attached to a device.
type Mode string

// Attach modes.
const (
	// ModeAuto attaches from_vnet to the NIC through TCX where the kernel has it (6.6+),
	// else through clsact + cls_bpf. An endpoint's host veth gets a cls_bpf filter when it
	// is new (AttachEndpoint), which the agent later moves to TCX. A TCX attach holds the RTNL
	// lock across an RCU grace period (tcx_entry_sync: 8 to 15 ms on the machines we
	// measured, against 50 µs for a cls_bpf filter), too long for the CNI ADD path, where
	// it would also serialise every concurrent ADD on the node; cls_bpf in turn costs about
	// 70 ns more per packet than TCX (cls_bpf_classify, the cb save, the qdisc's stats), too
	// much to keep.
	ModeAuto Mode = "auto"
	// ModeTCX attaches through a pinned TCX link.
	ModeTCX Mode = "tcx"
	// ModeTC attaches a cls_bpf filter to the device's clsact qdisc.
	ModeTC Mode = "tc"
)

const (
	linksDir = "links"
	// Our cls_bpf filter's handle and priority on clsact ingress. Fixed, so that replacing and
	// deleting find exactly our filter and leave others' alone.
	tcHandle   = 0x1
	tcPriority = 0x1
)

func (m Mode) validate() error {
	switch m {
	case ModeAuto, ModeTCX, ModeTC:
		return nil
	}
	return fmt.Errorf("attach mode %q: want auto, tcx or tc", m)
}

// Program names one of the datapath's programs.
type Program string

// The datapath's programs.
const (
	FromContainer Program = DatapathProgFromContainer
	FromVNet      Program = DatapathProgFromVnet
)

func (d *Datapath) program(p Program) (*ebpf.Program, error) {
	switch p {
	case FromContainer:
		return d.Objects.FromContainer, nil
	case FromVNet:
		return d.Objects.FromVnet, nil
	}
	return nil, fmt.Errorf("unknown program %q", p)
}

// Mode is the attach mode of the NIC's program. ModeAuto becomes ModeTCX or ModeTC at the
// first Attach of FromVNet, which tries TCX and falls back when the kernel says it is not
// supported.
func (d *Datapath) Mode() Mode {
	d.modeMu.Lock()
	defer d.modeMu.Unlock()
	return d.mode
}

// EndpointMode is the attach mode of from_container on endpoints' host veths: ModeAuto (a
// cls_bpf filter at first, TCX once settled) unless a mode was asked for explicitly.
func (d *Datapath) EndpointMode() Mode {
	if d.configured == ModeAuto {
		return ModeAuto
	}
	return d.Mode()
}

// Attach attaches p to the ingress of device ifname in the caller's network namespace. If a
// program of ours is already attached there it is replaced atomically, so no packet meets a
// device without one. FromContainer goes as AttachEndpoint(ifname, false) places it.
func (d *Datapath) Attach(ifname string, p Program) error {
	if p == FromContainer {
		_, err := d.AttachEndpoint(ifname, false)
		return err
	}
	dev, err := netlink.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", p, ifname, err)
	}
	_, err = d.attach(dev, p, d.Mode())
	return err
}

// AttachEndpoint attaches from_container to an endpoint's host veth and says how. In ModeAuto
// it goes through TCX when tcx is set or the veth already has our TCX link (then the program
// is swapped in place, without a grace period), and our cls_bpf filter and an empty clsact
// are removed; otherwise it gets a cls_bpf filter, which a later AttachEndpoint(ifname, true)
// moves to TCX off the CNI ADD's path. A new TCX attach holds the RTNL lock for an RCU grace
// period. On a kernel without TCX it falls back to cls_bpf (see TCXUnsupported).
func (d *Datapath) AttachEndpoint(ifname string, tcx bool) (Mode, error) {
	dev, err := netlink.LinkByName(ifname)
	if err != nil {
		return "", fmt.Errorf("attach %s to %s: %w", FromContainer, ifname, err)
	}
	auto := d.EndpointMode() == ModeAuto
	mode := d.EndpointMode()
	if auto {
		mode = ModeTC
		if tcx && !d.noTCX.Load() || d.hasTCXLink(dev) {
			mode = ModeTCX
		}
	}
	got, err := d.attach(dev, FromContainer, mode)
	if auto && errors.Is(err, ebpf.ErrNotSupported) {
		got, err = d.attach(dev, FromContainer, ModeTC)
	}
	if err != nil || !auto || got != ModeTCX {
		return got, err
	}
	if err := deleteClsactIfEmpty(dev); err != nil {
		return got, fmt.Errorf("attach %s to %s: %w", FromContainer, ifname, err)
	}
	return got, nil
}

// TCXUnsupported says whether the kernel has refused a TCX attach.
func (d *Datapath) TCXUnsupported() bool { return d.noTCX.Load() }

// attach attaches p to dev in mode; ModeAuto tries TCX and falls back to clsact, and
// settles the NIC's mode when p is FromVNet.
func (d *Datapath) attach(dev netlink.Link, p Program, mode Mode) (Mode, error) {
	prog, err := d.program(p)
	if err != nil {
		return "", err
	}
	ifname, ifindex := dev.Attrs().Name, dev.Attrs().Index
	switch mode {
	case ModeTC:
		err = attachTC(ifindex, prog, string(p))
	case ModeTCX:
		err = d.attachTCX(ifname, ifindex, prog)
	default:
		mode = ModeTCX
		err = d.attachTCX(ifname, ifindex, prog)
		if errors.Is(err, ebpf.ErrNotSupported) {
			mode = ModeTC
			err = attachTC(ifindex, prog, string(p))
		}
		if err == nil && p == FromVNet {
			d.setMode(mode)
		}
	}
	if err != nil {
		return "", fmt.Errorf("attach %s to %s: %w", p, ifname, err)
	}
	// An attachment of the other kind, left by an agent that ran in the other mode, would
	// keep running before (TCX) or instead of ours: remove it once ours is in place.
	if mode == ModeTC {
		err = d.unpinLink(ifname)
	} else {
		err = deleteTCFilter(ifindex)
	}
	if err != nil {
		return "", fmt.Errorf("attach %s to %s: remove the %s-mode attachment: %w", p, ifname, otherMode(mode), err)
	}
	return mode, nil
}

// pinnedTCX opens dev's pinned TCX link when it is live on dev; stale says a pin is there
// but belongs to another device (a veth recreated under the same name).
func (d *Datapath) pinnedTCX(dev netlink.Link) (l link.Link, stale bool, err error) {
	pin := d.linkPin(dev.Attrs().Name)
	l, err = link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("open pinned link %s: %w", pin, err)
	}
	info, err := l.Info()
	if err == nil && info.TCX() != nil && int(info.TCX().Ifindex) == dev.Attrs().Index {
		return l, false, nil
	}
	return l, true, nil
}

// hasTCXLink says whether dev has our pinned TCX link, live on it.
func (d *Datapath) hasTCXLink(dev netlink.Link) bool {
	l, stale, err := d.pinnedTCX(dev)
	if l != nil {
		l.Close()
	}
	return err == nil && l != nil && !stale
}

// deleteClsactIfEmpty removes dev's clsact qdisc when no filter is left on it: an empty
// clsact still costs every packet a classifier walk.
func deleteClsactIfEmpty(dev netlink.Link) error {
	qs, err := netlink.QdiscList(dev)
	if err != nil {
		return fmt.Errorf("list qdiscs: %w", err)
	}
	for _, q := range qs {
		if q.Type() != "clsact" {
			continue
		}
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			fs, err := netlink.FilterList(dev, parent)
			if err != nil {
				return fmt.Errorf("list filters: %w", err)
			}
			if len(fs) > 0 {
				return nil // someone else's filters: leave it
			}
		}
		if err := netlink.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("delete empty clsact qdisc: %w", err)
		}
	}
	return nil
}

func otherMode(m Mode) Mode {
	if m == ModeTC {
		return ModeTCX
	}
	return ModeTC
}

func (d *Datapath) linkPin(ifname string) string {
	return filepath.Join(d.root, linksDir, ifname)
}

func (d *Datapath) attachTCX(ifname string, ifindex int, prog *ebpf.Program) error {
	pin := d.linkPin(ifname)
	dev := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: ifname, Index: ifindex}}
	old, stale, err := d.pinnedTCX(dev)
	if err != nil {
		return err
	}
	if old != nil {
		defer old.Close()
		if !stale {
			if err := old.Update(prog); err != nil {
				return fmt.Errorf("replace program on pinned link %s: %w", pin, err)
			}
			return nil
		}
		// The pin outlived its device (a veth recreated under the same name): start over.
		if err := old.Unpin(); err != nil {
			return fmt.Errorf("remove stale link pin %s: %w", pin, err)
		}
	}

	l, err := link.AttachTCX(link.TCXOptions{
		Interface: ifindex,
		Program:   prog,
		Attach:    ebpf.AttachTCXIngress,
	})
	if errors.Is(err, ebpf.ErrNotSupported) {
		d.noTCX.Store(true)
	}
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link %s: %w", pin, err)
	}
	return nil
}

func attachTC(ifindex int, prog *ebpf.Program, name string) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("add clsact qdisc: %w", err)
	}
	filter := &netlink.BpfFilter{
		FilterAttrs:  tcFilterAttrs(ifindex),
		Fd:           prog.FD(),
		Name:         name,
		DirectAction: true,
	}
	// NLM_F_REPLACE on the same handle and priority swaps the program in one step.
	if err := netlink.FilterReplace(filter); err != nil {
		return fmt.Errorf("replace cls_bpf filter: %w", err)
	}
	return nil
}

func tcFilterAttrs(ifindex int) netlink.FilterAttrs {
	return netlink.FilterAttrs{
		LinkIndex: ifindex,
		Parent:    netlink.HANDLE_MIN_INGRESS,
		Handle:    tcHandle,
		Priority:  tcPriority,
		Protocol:  unix.ETH_P_ALL,
	}
}

// DetachFilter removes our cls_bpf filter from ifname, and leaves a TCX link: closing the
// link of a device that still exists waits for an RCU grace period holding the RTNL lock,
// while after the device is gone it costs nothing. A CNI DEL removes the veth right after
// the agent forgets it; Detach the name once it is gone. A device that is gone is fine.
func (d *Datapath) DetachFilter(ifname string) error {
	dev, err := netlink.LinkByName(ifname)
	if err != nil {
		return nil
	}
	if err := deleteTCFilter(dev.Attrs().Index); err != nil {
		return fmt.Errorf("detach %s: %w", ifname, err)
	}
	return nil
}

// Detach removes our program from device ifname, whichever way it was attached. A device or
// attachment that is already gone is not an error.
func (d *Datapath) Detach(ifname string) error {
	return Detach(d.root, ifname)
}

// Detach removes the program pinned under root for ifname and our cls_bpf filter on it.
func Detach(root, ifname string) error {
	if err := unpinLink(root, ifname); err != nil {
		return fmt.Errorf("detach %s: %w", ifname, err)
	}
	dev, err := netlink.LinkByName(ifname)
	if err != nil {
		return nil // the device is gone, and with it any filter
	}
	if err := deleteTCFilter(dev.Attrs().Index); err != nil {
		return fmt.Errorf("detach %s: %w", ifname, err)
	}
	return nil
}

func (d *Datapath) unpinLink(ifname string) error { return unpinLink(d.root, ifname) }

// unpinLink removes ifname's TCX link pin; with it goes the last reference, so the program
// detaches. A missing pin is fine.
func unpinLink(root, ifname string) error {
	pin := filepath.Join(root, linksDir, ifname)
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		// A pin we cannot open as a link is junk in our directory: remove it.
		if rerr := os.Remove(pin); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return err
		}
		return nil
	}
	defer l.Close()
	return l.Unpin()
}

// deleteTCFilter removes our cls_bpf filter (handle 1, priority 1) from ifindex's clsact
// ingress; one that is not there is fine.
func deleteTCFilter(ifindex int) error {
	filter := &netlink.BpfFilter{FilterAttrs: tcFilterAttrs(ifindex)}
	if err := netlink.FilterDel(filter); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("delete cls_bpf filter: %w", err)
	}
	return nil
}

// LinkPins lists the device names that have a pinned TCX link under root, for reconciling
// them against the devices that still exist.
func LinkPins(root string) ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(root, linksDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names, nil
}

func (d *Datapath) setMode(m Mode) {
	d.modeMu.Lock()
	defer d.modeMu.Unlock()
	d.mode = m
}
