// Package progcost measures what one packet costs in each branch of the datapath programs
// (bpf/datapath.c: from_container, from_vnet) with BPF_PROG_TEST_RUN, against an empty TC
// program measured in the same run, interleaved, with maps of different sizes.
package progcost

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// Addresses and MACs of the fixture.
var (
	nicIP      = netip.MustParseAddr("10.0.0.4")
	vnetPrefix = netip.MustParsePrefix("10.0.0.0/16")
	addrA      = netip.MustParseAddr("10.0.0.10")
	addrB      = netip.MustParseAddr("10.0.0.11")
	// The agent gives the NIC's subnet (vnetPrefix) an on-link next hop and another VNet
	// prefix the gateway; fibPrefix inside the subnet stands for a prefix without a next hop
	// (one the node routes elsewhere), whose packets ask the FIB.
	fibPrefix  = netip.MustParsePrefix("10.0.0.0/20")
	viaPrefix  = netip.MustParsePrefix("10.3.0.0/16")
	viaGateway = netip.MustParseAddr("10.0.0.1")
	onLinkIP   = netip.MustParseAddr("10.0.20.5") // in the subnet, outside fibPrefix
	viaIP      = netip.MustParseAddr("10.3.0.5")
	remoteIP   = netip.MustParseAddr("10.0.5.5") // in the VNet, with a neighbour entry
	unknownIP  = netip.MustParseAddr("10.0.5.6") // in the VNet, no neighbour yet
	blackholed = netip.MustParseAddr("10.0.9.9") // in the VNet, blackhole route
	outsideIP  = netip.MustParseAddr("192.0.2.9")
	gatewayIP  = netip.MustParseAddr("169.254.1.1")
	strangerIP = netip.MustParseAddr("10.0.0.99")

	nicMAC   = mustMAC("02:00:00:00:00:04")
	neighMAC = mustMAC("02:00:00:00:05:05")
	// A forwarding path rewrites the source MAC (to the NIC's for the VNet, to the host veth's
	// for local delivery). The test run repeats the program on the same frame, so container A
	// sends with that very MAC and B's host side has it too: every repetition then passes the
	// anti-spoofing check and takes the same branch. The instructions run are the same as with
	// distinct MACs; only the compared values differ.
	macA     = nicMAC
	hostMACA = mustMAC("02:bb:00:00:00:10")
	macB     = mustMAC("02:aa:00:00:00:11")
	hostMACB = nicMAC
	otherMAC = mustMAC("02:de:ad:be:ef:00")
)

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// Fixture is two identical network namespaces and the datapath loaded once per map size.
//
// Both namespaces hold nic0 (the NIC, 10.0.0.4/16) and the host veths hA and hB, created in
// the same order so that their ifindexes agree and one endpoints map serves both. nic0
// forwards in fwd (the FIB answers with a next hop) and not in plain (as on a node with
// ip_forward=0, where the FIB says "forwarding disabled" and the kernel resolves the next hop).
type Fixture struct {
	fwd, plain ns.NetNS
	idx        ifindexes // equal in both namespaces
	Empty      *ebpf.Program
	Instances  []*Instance
	reg        *resources.Registry
}

// Instance is the datapath loaded under a bpffs root of its own, its endpoints map holding
// Endpoints entries.
type Instance struct {
	Endpoints int
	DP        *loader.Datapath
	Maps      *maps.Maps
	events    *ringbuf.Reader
}

// NewFixture builds the namespaces and loads the datapath once for each size in sizes
// (number of entries in the endpoints map, at least 2: local delivery needs a sender and a
// receiver). reg records what is created; Close removes it.
func NewFixture(reg *resources.Registry, sizes []int) (*Fixture, error) {
	f := &Fixture{reg: reg}
	if err := f.build(sizes); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func (f *Fixture) build(sizes []int) error {
	var err error
	if f.Empty, err = newEmptyProgram(); err != nil {
		return err
	}
	var got [2]ifindexes
	for i, forwarding := range []bool{true, false} {
		n, err := f.reg.NewNS()
		if err != nil {
			return err
		}
		if forwarding {
			f.fwd = n
		} else {
			f.plain = n
		}
		if err := n.Do(func(ns.NetNS) error {
			var err error
			got[i], err = buildNamespace(forwarding)
			return err
		}); err != nil {
			return err
		}
	}
	if got[0] != got[1] {
		return fmt.Errorf("ifindexes differ between the two namespaces: %+v", got)
	}
	f.idx = got[0]
	for _, n := range sizes {
		inst, err := f.newInstance(n)
		if err != nil {
			return err
		}
		f.Instances = append(f.Instances, inst)
	}
	return nil
}

// newEmptyProgram is the baseline: a TC program that returns TC_ACT_OK and does nothing else.
func newEmptyProgram() (*ebpf.Program, error) {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "empty",
		Type: ebpf.SchedCLS,
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 0),
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		return nil, fmt.Errorf("load the empty program: %w", err)
	}
	return p, nil
}

// ifindexes of the fixture's devices.
type ifindexes struct{ nic, hA, hB int }

func buildNamespace(forwarding bool) (ifindexes, error) {
	var idx ifindexes
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return idx, err
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return idx, err
	}
	nic, err := addVeth("nic0", "fab0", nicMAC)
	if err != nil {
		return idx, err
	}
	if err := netlink.AddrAdd(nic, &netlink.Addr{IPNet: &net.IPNet{IP: nicIP.AsSlice(), Mask: net.CIDRMask(vnetPrefix.Bits(), 32)}}); err != nil {
		return idx, fmt.Errorf("address nic0: %w", err)
	}
	hA, err := addVeth("hA", "cA", hostMACA)
	if err != nil {
		return idx, err
	}
	hB, err := addVeth("hB", "cB", mustMAC("02:bb:00:00:00:11"))
	if err != nil {
		return idx, err
	}
	idx = ifindexes{nic: nic.Attrs().Index, hA: hA.Attrs().Index, hB: hB.Attrs().Index}
	v := "0"
	if forwarding {
		v = "1"
	}
	if err := sysctl("net/ipv4/conf/nic0/forwarding", v); err != nil {
		return idx, err
	}
	if forwarding {
		neigh := &netlink.Neigh{LinkIndex: nic.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
			IP: remoteIP.AsSlice(), HardwareAddr: neighMAC}
		if err := netlink.NeighAdd(neigh); err != nil {
			return idx, fmt.Errorf("neighbour %s: %w", remoteIP, err)
		}
		bhDst := netip.PrefixFrom(blackholed, 24).Masked()
		bh := &netlink.Route{Dst: &net.IPNet{IP: bhDst.Addr().AsSlice(), Mask: net.CIDRMask(24, 32)}, Type: 6 /* RTN_BLACKHOLE */}
		if err := netlink.RouteAdd(bh); err != nil {
			return idx, fmt.Errorf("blackhole route: %w", err)
		}
	}
	return idx, nil
}

func sysctl(name, value string) error {
	if err := os.WriteFile(filepath.Join("/proc/sys", name), []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// MaxEndpoints is the capacity of the endpoints map, read from the compiled object.
func MaxEndpoints() (int, error) {
	spec, err := loader.LoadDatapath()
	if err != nil {
		return 0, err
	}
	m, ok := spec.Maps[loader.DatapathMapEndpoints]
	if !ok {
		return 0, fmt.Errorf("the datapath object has no %s map", loader.DatapathMapEndpoints)
	}
	return int(m.MaxEntries), nil
}

func addVeth(name, peer string, mac net.HardwareAddr) (netlink.Link, error) {
	la := netlink.NewLinkAttrs()
	la.Name = name
	la.HardwareAddr = mac
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peer}); err != nil {
		return nil, fmt.Errorf("add veth %s: %w", name, err)
	}
	for _, n := range []string{name, peer} {
		l, err := netlink.LinkByName(n)
		if err != nil {
			return nil, err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return nil, fmt.Errorf("set %s up: %w", n, err)
		}
	}
	return netlink.LinkByName(name)
}

// newInstance loads the datapath under a root of its own and fills its endpoints map with
// A, B and size-2 other endpoints (10.1.0.0 upwards), as a node with that many containers.
func (f *Fixture) newInstance(size int) (*Instance, error) {
	limit, err := MaxEndpoints()
	if err != nil {
		return nil, err
	}
	if size < 2 || size > limit {
		return nil, fmt.Errorf("endpoints map size %d: want 2..%d", size, limit)
	}
	root, err := f.reg.NewBPFRoot("vnetbpf-bench-prog")
	if err != nil {
		return nil, err
	}
	dp, err := loader.Load(loader.Options{Root: root})
	if err != nil {
		return nil, err
	}
	inst := &Instance{Endpoints: size, DP: dp, Maps: maps.FromObjects(&dp.Objects)}
	if inst.events, err = ringbuf.NewReader(dp.Objects.Events); err != nil {
		dp.Close()
		return nil, fmt.Errorf("open events ring buffer: %w", err)
	}
	m := inst.Maps
	put := func(ip netip.Addr, ifindex int, id uint32, mac, host net.HardwareAddr) error {
		cm, _ := maps.MAC(mac)
		hm, _ := maps.MAC(host)
		return m.PutEndpoint(ip, maps.Endpoint{Ifindex: uint32(ifindex), Id: id, Mac: cm, HostMac: hm})
	}
	if err := put(addrA, f.idx.hA, 1, macA, hostMACA); err != nil {
		return nil, err
	}
	if err := put(addrB, f.idx.hB, 2, macB, hostMACB); err != nil {
		return nil, err
	}
	if err := fillEndpoints(m, size-2); err != nil {
		return nil, err
	}
	for _, c := range []maps.VNetCIDR{
		{Prefix: vnetPrefix, OnLink: true},
		{Prefix: viaPrefix, Via: viaGateway},
		{Prefix: fibPrefix},
	} {
		if err := m.PutVNetCIDR(c); err != nil {
			return nil, err
		}
	}
	if err := m.AddHostAddress(nicIP); err != nil {
		return nil, err
	}
	nm, _ := maps.MAC(nicMAC)
	if err := m.SetConfig(maps.NodeConfig{NicIfindex: uint32(f.idx.nic), NicMac: nm, NicMtu: 1500}); err != nil {
		return nil, err
	}
	return inst, nil
}

// fillEndpoints adds n endpoints 10.1.0.0, 10.1.0.1, ... with ids from 3, in batches.
func fillEndpoints(m *maps.Maps, n int) error {
	const batch = 4096
	for start := 0; start < n; start += batch {
		cnt := min(batch, n-start)
		keys := make([]loader.DatapathEndpointKey, cnt)
		vals := make([]loader.DatapathEndpoint, cnt)
		for i := range cnt {
			j := start + i
			keys[i] = loader.DatapathEndpointKey{Ip: [4]byte{10, 1, byte(j >> 8), byte(j)}}
			vals[i] = loader.DatapathEndpoint{
				Ifindex: uint32(1000 + j), Id: uint32(3 + j),
				Mac:     [6]byte{0x02, 0xcc, 0, byte(j >> 16), byte(j >> 8), byte(j)},
				HostMac: [6]byte{0x02, 0xdd, 0, byte(j >> 16), byte(j >> 8), byte(j)},
			}
		}
		if _, err := m.Endpoints.BatchUpdate(keys, vals, nil); err != nil {
			return fmt.Errorf("fill endpoints map: %w", err)
		}
	}
	var count int
	var k loader.DatapathEndpointKey
	var v loader.DatapathEndpoint
	it := m.Endpoints.Iterate()
	for it.Next(&k, &v) {
		count++
	}
	if err := it.Err(); err != nil {
		return err
	}
	if count != n+2 {
		return fmt.Errorf("endpoints map holds %d entries, want %d", count, n+2)
	}
	return nil
}

// drainEvents discards the drop events the programs wrote, so that the ring buffer never
// fills: a full ring would make bpf_ringbuf_output fail fast and the drop paths look cheaper
// than they are on a node whose agent reads the events.
func (i *Instance) drainEvents() error {
	var rec ringbuf.Record
	i.events.SetDeadline(time.Now())
	for {
		err := i.events.ReadInto(&rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("drain events: %w", err)
		}
	}
}

// Close removes everything the fixture created.
func (f *Fixture) Close() error {
	var errs []error
	for _, i := range f.Instances {
		i.events.Close()
		errs = append(errs, i.DP.Close(), loader.Unpin(i.DP.Root()))
	}
	if f.Empty != nil {
		f.Empty.Close()
	}
	for _, n := range []ns.NetNS{f.fwd, f.plain} {
		if n != nil {
			errs = append(errs, f.reg.RemoveNS(n))
		}
	}
	return errors.Join(errs...)
}
