package loader_test

import (
	"bytes"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/gopacket/layers"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// TC verdicts as BPF_PROG_TEST_RUN reports them.
const (
	actOK       = 0
	actShot     = 2
	actRedirect = 7
)

var (
	gatewayIP = netip.MustParseAddr("169.254.1.1")
	nicIP     = netip.MustParseAddr("10.0.0.4")
	remoteIP  = netip.MustParseAddr("10.0.5.5")  // in the VNet, reached through the NIC
	outsideIP = netip.MustParseAddr("192.0.2.9") // not in the VNet: the host stack's business
	imdsIP    = netip.MustParseAddr("169.254.169.254")
	nicMAC    = mustMAC("02:00:00:00:00:04")
	neighMAC  = mustMAC("02:00:00:00:05:05")
)

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

type endpoint struct {
	ip          netip.Addr
	mac         net.HardwareAddr
	hostMAC     net.HardwareAddr
	hostIfindex int
	id          uint32
}

// fixture is a network namespace with a NIC (nic0, its peer fab0) and two container veths
// (hA, hB), and the datapath loaded with both endpoints, the VNet 10.0.0.0/16 and the NIC
// configured. Programs run through BPF_PROG_TEST_RUN in that namespace.
type fixture struct {
	t      testing.TB
	netns  ns.NetNS
	dp     *loader.Datapath
	m      *maps.Maps
	nicIdx int
	a, b   endpoint
}

func newFixture(t testing.TB) *fixture {
	f := &fixture{t: t, netns: testutils.NewNS(t)}
	root := testutils.BPFRoot(t)
	f.a = endpoint{ip: netip.MustParseAddr("10.0.0.10"), mac: mustMAC("02:aa:00:00:00:10"), hostMAC: mustMAC("02:bb:00:00:00:10"), id: 1}
	f.b = endpoint{ip: netip.MustParseAddr("10.0.0.11"), mac: mustMAC("02:aa:00:00:00:11"), hostMAC: mustMAC("02:bb:00:00:00:11"), id: 2}
	testutils.Do(t, f.netns, func() error {
		nic := addVeth(t, "nic0", "fab0", nicMAC)
		f.nicIdx = nic.Attrs().Index
		addr, _ := netlink.ParseAddr(nicIP.String() + "/16")
		if err := netlink.AddrAdd(nic, addr); err != nil {
			return err
		}
		f.a.hostIfindex = addVeth(t, "hA", "cA", f.a.hostMAC).Attrs().Index
		f.b.hostIfindex = addVeth(t, "hB", "cB", f.b.hostMAC).Attrs().Index
		return nil
	})
	dp, err := loader.Load(loader.Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	f.dp = dp
	f.m = maps.FromObjects(&dp.Objects)
	for _, ep := range []endpoint{f.a, f.b} {
		f.putEndpoint(ep)
	}
	if err := f.m.AddVNetCIDR(netip.MustParsePrefix("10.0.0.0/16")); err != nil {
		t.Fatal(err)
	}
	if err := f.m.AddHostAddress(nicIP); err != nil {
		t.Fatal(err)
	}
	mac, _ := maps.MAC(nicMAC)
	if err := f.m.SetConfig(maps.NodeConfig{NicIfindex: uint32(f.nicIdx), NicMac: mac}); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) putEndpoint(ep endpoint) {
	mac, _ := maps.MAC(ep.mac)
	host, _ := maps.MAC(ep.hostMAC)
	if err := f.m.PutEndpoint(ep.ip, maps.Endpoint{Ifindex: uint32(ep.hostIfindex), Id: ep.id, Mac: mac, HostMac: host}); err != nil {
		f.t.Fatal(err)
	}
}

func addVeth(t testing.TB, name, peer string, mac net.HardwareAddr) netlink.Link {
	t.Helper()
	la := netlink.NewLinkAttrs()
	la.Name = name
	la.HardwareAddr = mac
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peer}); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	for _, n := range []string{name, peer} {
		l, err := netlink.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// run runs prog on frame as if it arrived on ifindex and returns the verdict and the frame
// after the program.
func (f *fixture) run(prog *ebpf.Program, ifindex int, frame []byte) (uint32, []byte) {
	f.t.Helper()
	ret, out, err := f.tryRun(prog, ifindex, frame)
	if err != nil {
		f.t.Fatal(err)
	}
	return ret, out
}

func (f *fixture) tryRun(prog *ebpf.Program, ifindex int, frame []byte) (uint32, []byte, error) {
	var ret uint32
	var out []byte
	err := f.netns.Do(func(ns.NetNS) error {
		ctx, err := testutils.SkbContext(ifindex)
		if err != nil {
			return err
		}
		opts := ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256), Context: ctx}
		ret, err = prog.Run(&opts)
		out = opts.DataOut
		return err
	})
	return ret, out, err
}

// testRunRefuses reports whether BPF_PROG_TEST_RUN rejects frame before any program runs:
// the kernel wants a whole network header (20 bytes for IPv4, 40 for IPv6) behind those
// ethertypes. Such
// frames are sent for real in the integration test instead.
func testRunRefuses(frame []byte) bool {
	l3 := uint16(frame[12])<<8 | uint16(frame[13])
	return (l3 == 0x0800 && len(frame) < 14+20) || (l3 == 0x86dd && len(frame) < 14+40)
}

// maxTestRunFrame is about the largest frame BPF_PROG_TEST_RUN takes for a TC program: the
// data must fit one page with the skb's headroom and shared info (EINVAL beyond).
const maxTestRunFrame = 3400

func (f *fixture) stats() map[maps.Reason]maps.Stat {
	f.t.Helper()
	s, err := f.m.ReadStats()
	if err != nil {
		f.t.Fatal(err)
	}
	return s
}

// expectCounted runs fn and checks that exactly one packet was counted, under want.
func (f *fixture) expectCounted(want maps.Reason, fn func()) {
	f.t.Helper()
	before := f.stats()
	fn()
	after := f.stats()
	for r, s := range after {
		got := s.Packets - before[r].Packets
		switch {
		case r == want && got != 1:
			f.t.Errorf("reason %s counted %d packets, want 1", loader.ReasonName(r), got)
		case r != want && got != 0:
			f.t.Errorf("reason %s counted %d packets, want 0 (expected %s)", loader.ReasonName(r), got, loader.ReasonName(want))
		}
	}
}

// expectRedirect runs from_container on frame from ep, requires a redirect counted under
// reason, and returns the frame as the program left it.
func (f *fixture) expectRedirect(t *testing.T, reason maps.Reason, ep endpoint, frame []byte) []byte {
	t.Helper()
	var ret uint32
	var out []byte
	f.expectCounted(reason, func() { ret, out = f.fromContainer(ep, frame) })
	if ret != actRedirect {
		t.Fatalf("verdict %d, want redirect (%d)", ret, actRedirect)
	}
	return out
}

func (f *fixture) fromContainer(ep endpoint, frame []byte) (uint32, []byte) {
	return f.run(f.dp.Objects.FromContainer, ep.hostIfindex, frame)
}

func (f *fixture) fromVNet(frame []byte) (uint32, []byte) {
	return f.run(f.dp.Objects.FromVnet, f.nicIdx, frame)
}

func (f *fixture) setNICForwarding(on bool) {
	v := "0"
	if on {
		v = "1"
	}
	testutils.Do(f.t, f.netns, func() error { return testutils.Sysctl("net.ipv4.conf.nic0.forwarding", v) })
}

// checkForwarded asserts a rewritten IPv4 frame: MACs, TTL one less, valid checksum, and the
// rest of the packet unchanged.
func checkForwarded(t *testing.T, in, out []byte, dstMAC, srcMAC net.HardwareAddr) {
	t.Helper()
	eth, ip, _ := testutils.Decode(out)
	_, inIP, _ := testutils.Decode(in)
	if eth == nil || ip == nil {
		t.Fatalf("output is not Ethernet/IPv4: % x", out)
	}
	if dstMAC != nil && !bytes.Equal(eth.DstMAC, dstMAC) {
		t.Errorf("dst MAC %s, want %s", eth.DstMAC, dstMAC)
	}
	if srcMAC != nil && !bytes.Equal(eth.SrcMAC, srcMAC) {
		t.Errorf("src MAC %s, want %s", eth.SrcMAC, srcMAC)
	}
	if ip.TTL != inIP.TTL-1 {
		t.Errorf("TTL %d, want %d", ip.TTL, inIP.TTL-1)
	}
	if !testutils.IPv4HeaderChecksumOK(out) {
		t.Errorf("IPv4 header checksum %#04x is invalid after the rewrite", ip.Checksum)
	}
	if !bytes.Equal(in[14+10+2:], out[14+10+2:]) || in[14+8] != out[14+8]+1 {
		t.Errorf("bytes other than MACs, TTL and checksum changed:\n in % x\nout % x", in, out)
	}
}

func udp(src, dst endpointOrAddr) testutils.IPv4 {
	return testutils.IPv4{SrcMAC: src.hwaddr(), DstMAC: dst.hwaddr(), Src: src.address(), Dst: dst.address(), SrcPort: 4000, DstPort: 53, Payload: []byte("vnetbpf")}
}

type endpointOrAddr interface {
	address() netip.Addr
	hwaddr() net.HardwareAddr
}

func (e endpoint) address() netip.Addr      { return e.ip }
func (e endpoint) hwaddr() net.HardwareAddr { return e.mac }

type host struct {
	ip netip.Addr
	hw net.HardwareAddr
}

func (h host) address() netip.Addr      { return h.ip }
func (h host) hwaddr() net.HardwareAddr { return h.hw }

func TestFromContainerLocalDelivery(t *testing.T) {
	f := newFixture(t)
	// The stated rule for IP options and fragments: both are forwarded like any packet, with
	// the same source checks; only the first fragment carries ports.
	for _, opts := range []struct {
		name    string
		options []layers.IPv4Option
		frag    uint16
	}{
		{"plain", nil, 0},
		// Options change the header length, which the checksum rewrite must not depend on.
		{"ip options", []layers.IPv4Option{{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 0}}, 0},
		{"a later fragment", nil, 185},
	} {
		t.Run(opts.name, func(t *testing.T) {
			p := udp(f.a, host{f.b.ip, f.a.hostMAC})
			p.Options = opts.options
			p.FragOffset = opts.frag
			in := p.Frame()
			before, _ := f.m.ReadEndpointStat(f.b.id)
			var ret uint32
			var out []byte
			f.expectCounted(loader.DatapathStatReasonFWD_LOCAL, func() { ret, out = f.fromContainer(f.a, in) })
			if ret != actRedirect {
				t.Fatalf("verdict %d, want redirect (%d)", ret, actRedirect)
			}
			checkForwarded(t, in, out, f.b.mac, f.b.hostMAC)
			after, _ := f.m.ReadEndpointStat(f.b.id)
			if after.RxPackets != before.RxPackets+1 {
				t.Errorf("endpoint B rx packets %d, want %d", after.RxPackets, before.RxPackets+1)
			}
		})
	}
}

func TestFromContainerToVNet(t *testing.T) {
	f := newFixture(t)
	in := udp(f.a, host{remoteIP, f.a.hostMAC}).Frame()

	t.Run("fib success", func(t *testing.T) {
		f.setNICForwarding(true)
		defer f.setNICForwarding(false)
		testutils.Do(t, f.netns, func() error {
			nic, _ := netlink.LinkByName("nic0")
			return netlink.NeighAdd(&netlink.Neigh{LinkIndex: nic.Attrs().Index, IP: remoteIP.AsSlice(), HardwareAddr: neighMAC, State: netlink.NUD_PERMANENT, Family: netlink.FAMILY_V4})
		})
		defer testutils.Do(t, f.netns, func() error {
			nic, _ := netlink.LinkByName("nic0")
			return netlink.NeighDel(&netlink.Neigh{LinkIndex: nic.Attrs().Index, IP: remoteIP.AsSlice(), Family: netlink.FAMILY_V4})
		})
		out := f.expectRedirect(t, loader.DatapathStatReasonFWD_TO_VNET, f.a, in)
		// Azure accepts only the NIC's own MAC as source.
		checkForwarded(t, in, out, neighMAC, nicMAC)
	})
	t.Run("no neighbour yet", func(t *testing.T) {
		f.setNICForwarding(true)
		defer f.setNICForwarding(false)
		out := f.expectRedirect(t, loader.DatapathStatReasonFWD_TO_VNET, f.a, in)
		// bpf_redirect_neigh fills the MACs at transmit time; the TTL is ours.
		checkForwarded(t, in, out, nil, nil)
	})
	t.Run("forwarding disabled on the node", func(t *testing.T) {
		out := f.expectRedirect(t, loader.DatapathStatReasonFWD_TO_VNET, f.a, in)
		checkForwarded(t, in, out, nil, nil)
	})
	t.Run("blackhole route", func(t *testing.T) {
		f.setNICForwarding(true)
		defer f.setNICForwarding(false)
		dst := netip.MustParsePrefix("10.0.9.0/24")
		testutils.Do(t, f.netns, func() error {
			return netlink.RouteAdd(&netlink.Route{Dst: &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(24, 32)}, Type: 6 /* RTN_BLACKHOLE */})
		})
		p := udp(f.a, host{netip.MustParseAddr("10.0.9.9"), f.a.hostMAC})
		f.expectCounted(loader.DatapathStatReasonDROP_NO_ROUTE, func() {
			if ret, _ := f.fromContainer(f.a, p.Frame()); ret != actShot {
				t.Fatalf("verdict %d, want drop", ret)
			}
		})
	})
}

// TestFromContainerToVNetNextHop: a prefix whose next hop the agent wrote goes out through
// bpf_redirect_neigh without asking the FIB. The FIB here says blackhole for the destination
// and knows its neighbour: the FIB path would drop it, or write the neighbour's MAC. Frames
// larger than the NIC's MTU, and any frame while the MTU is unset, take the FIB path.
func TestFromContainerToVNetNextHop(t *testing.T) {
	f := newFixture(t)
	f.setNICForwarding(true)
	dst := netip.MustParseAddr("10.0.9.9")
	testutils.Do(t, f.netns, func() error {
		nic, _ := netlink.LinkByName("nic0")
		if err := netlink.NeighAdd(&netlink.Neigh{LinkIndex: nic.Attrs().Index, IP: dst.AsSlice(), HardwareAddr: neighMAC, State: netlink.NUD_PERMANENT, Family: netlink.FAMILY_V4}); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{Dst: &net.IPNet{IP: net.IP{10, 0, 9, 0}, Mask: net.CIDRMask(24, 32)}, Type: 6 /* RTN_BLACKHOLE */})
	})
	mac, _ := maps.MAC(nicMAC)
	setMTU := func(mtu uint16) {
		if err := f.m.SetConfig(maps.NodeConfig{NicIfindex: uint32(f.nicIdx), NicMac: mac, NicMtu: mtu}); err != nil {
			t.Fatal(err)
		}
	}
	in := udp(f.a, host{dst, f.a.hostMAC}).Frame()
	for _, c := range []maps.VNetCIDR{
		{Prefix: netip.MustParsePrefix("10.0.9.0/24"), OnLink: true},
		{Prefix: netip.MustParsePrefix("10.0.9.0/24"), Via: netip.MustParseAddr("10.0.0.1")},
	} {
		name := "on link"
		if c.Via.IsValid() {
			name = "via " + c.Via.String()
		}
		t.Run(name, func(t *testing.T) {
			if err := f.m.PutVNetCIDR(c); err != nil {
				t.Fatal(err)
			}
			got, err := f.m.ListVNetCIDRs()
			if err != nil || !slices.Contains(got, c) {
				t.Fatalf("vnet_cidrs %v (%v), want it to hold %+v", got, err, c)
			}
			setMTU(1500)
			out := f.expectRedirect(t, loader.DatapathStatReasonFWD_TO_VNET, f.a, in)
			// The MACs are bpf_redirect_neigh's to fill at transmit: the FIB's neighbour
			// MAC would be here had the FIB been asked.
			checkForwarded(t, in, out, f.a.hostMAC, f.a.mac)

			for _, mtu := range []uint16{uint16(len(in) - 14 - 1), 0} {
				setMTU(mtu)
				f.expectCounted(loader.DatapathStatReasonDROP_NO_ROUTE, func() {
					if ret, _ := f.fromContainer(f.a, in); ret != actShot {
						t.Errorf("NIC MTU %d, a %d-byte packet: verdict %d, want the FIB path's drop", mtu, len(in)-14, ret)
					}
				})
			}
		})
	}
	t.Run("invalid entries are refused", func(t *testing.T) {
		for _, c := range []maps.VNetCIDR{
			{Prefix: netip.MustParsePrefix("10.0.9.0/24"), OnLink: true, Via: netip.MustParseAddr("10.0.0.1")},
			{Prefix: netip.MustParsePrefix("10.0.0.4/32"), Host: true, OnLink: true},
		} {
			if err := f.m.PutVNetCIDR(c); err == nil {
				t.Errorf("PutVNetCIDR(%+v) succeeded, want an error", c)
			}
		}
	})
}

func TestFromContainerToStack(t *testing.T) {
	f := newFixture(t)
	for name, dst := range map[string]netip.Addr{
		"outside the VNet": outsideIP,
		// In the VNet prefix, but the node's own: its host entry in vnet_cidrs wins the
		// longest match, whether or not the node forwards.
		"the node's NIC": nicIP,
	} {
		t.Run(name, func(t *testing.T) {
			in := udp(f.a, host{dst, f.a.hostMAC}).Frame()
			f.expectCounted(loader.DatapathStatReasonPASS_TO_STACK, func() {
				ret, out := f.fromContainer(f.a, in)
				if ret != actOK {
					t.Fatalf("verdict %d, want pass (%d)", ret, actOK)
				}
				if !bytes.Equal(in, out) {
					t.Errorf("frame passed to the stack was modified")
				}
			})
		})
	}
	t.Run("IMDS when allowed", func(t *testing.T) {
		mac, _ := maps.MAC(nicMAC)
		allow := uint32(loader.DatapathNodeConfigFlagsCONFIG_F_ALLOW_IMDS)
		if err := f.m.SetConfig(maps.NodeConfig{NicIfindex: uint32(f.nicIdx), NicMac: mac, Flags: allow}); err != nil {
			t.Fatal(err)
		}
		defer f.m.SetConfig(maps.NodeConfig{NicIfindex: uint32(f.nicIdx), NicMac: mac})
		in := udp(f.a, host{imdsIP, f.a.hostMAC}).Frame()
		f.expectCounted(loader.DatapathStatReasonPASS_TO_STACK, func() {
			if ret, _ := f.fromContainer(f.a, in); ret != actOK {
				t.Fatalf("verdict %d, want pass", ret)
			}
		})
	})
	t.Run("no config yet", func(t *testing.T) {
		if err := f.m.SetConfig(maps.NodeConfig{}); err != nil {
			t.Fatal(err)
		}
		in := udp(f.a, host{remoteIP, f.a.hostMAC}).Frame()
		f.expectCounted(loader.DatapathStatReasonPASS_TO_STACK, func() {
			if ret, _ := f.fromContainer(f.a, in); ret != actOK {
				t.Fatalf("verdict %d, want pass", ret)
			}
		})
	})
}

func TestFromContainerDrops(t *testing.T) {
	f := newFixture(t)
	stranger := host{netip.MustParseAddr("10.0.0.99"), f.a.mac}
	cases := []struct {
		name   string
		frame  []byte
		reason maps.Reason
	}{
		{"source IP of nobody", udp(stranger, f.b).Frame(), loader.DatapathStatReasonDROP_SPOOFED_IP},
		{"source IP of another container", udp(host{f.b.ip, f.a.mac}, host{remoteIP, nil}).Frame(), loader.DatapathStatReasonDROP_SPOOFED_IP},
		{"source MAC not its own", udp(host{f.a.ip, mustMAC("02:de:ad:be:ef:00")}, f.b).Frame(), loader.DatapathStatReasonDROP_SPOOFED_MAC},
		{"a spoofed later fragment", func() []byte { p := udp(stranger, f.b); p.FragOffset = 185; return p.Frame() }(), loader.DatapathStatReasonDROP_SPOOFED_IP},
		{"TTL 1 to a local container", func() []byte { p := udp(f.a, f.b); p.TTL = 1; return p.Frame() }(), loader.DatapathStatReasonDROP_TTL_EXCEEDED},
		{"TTL 1 to the VNet", func() []byte { p := udp(f.a, host{remoteIP, nil}); p.TTL = 1; return p.Frame() }(), loader.DatapathStatReasonDROP_TTL_EXCEEDED},
		{"IPv6", ethOnly(f.a.mac, 0x86dd, 60), loader.DatapathStatReasonDROP_UNSUPPORTED},
		// A pod that reaches IMDS can take the node's managed identity.
		{"to IMDS", udp(f.a, host{imdsIP, f.a.hostMAC}).Frame(), loader.DatapathStatReasonDROP_IMDS},
		{"to IMDS with IP options", func() []byte {
			p := udp(f.a, host{imdsIP, f.a.hostMAC})
			p.Options = []layers.IPv4Option{{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 0}}
			return p.Frame()
		}(), loader.DatapathStatReasonDROP_IMDS},
		{"VLAN tag", ethOnly(f.a.mac, 0x8100, 60), loader.DatapathStatReasonDROP_UNSUPPORTED},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f.expectCounted(c.reason, func() {
				if ret, _ := f.fromContainer(f.a, c.frame); ret != actShot {
					t.Fatalf("verdict %d, want drop", ret)
				}
			})
		})
	}
}

// ethOnly is an Ethernet header of the given type followed by n zero bytes.
func ethOnly(src net.HardwareAddr, ethertype uint16, n int) []byte {
	b := make([]byte, 14+n)
	copy(b[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(b[6:12], src)
	b[12], b[13] = byte(ethertype>>8), byte(ethertype)
	return b
}

// The stated rule: from a container, every frame too short or inconsistent for its
// ethertype is dropped as malformed; from the VNet it goes to the host stack untouched.
func malformedFrames(f *fixture) map[string][]byte {
	good := udp(f.a, f.b).Frame()
	mutate := func(fn func(b []byte)) []byte {
		b := bytes.Clone(good)
		fn(b)
		return b
	}
	arp := testutils.ARP{SrcMAC: f.a.mac, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: f.a.mac, SPA: f.a.ip, TPA: gatewayIP}.Frame()
	// Shorter IPv4 frames cannot go through BPF_PROG_TEST_RUN (testRunRefuses).
	return map[string][]byte{
		"IPv4 version 6 in header": mutate(func(b []byte) { b[14] = 0x65 }),
		"IHL below 5":              mutate(func(b []byte) { b[14] = 0x44 }),
		"IHL past the frame":       mutate(func(b []byte) { b[14] = 0x4f })[:14+40],
		"total length below IHL":   mutate(func(b []byte) { b[16], b[17] = 0, 10 }),
		"ARP cut short":            arp[:14+20],
		"ARP for IPv6":             func() []byte { b := bytes.Clone(arp); b[16], b[17] = 0x86, 0xdd; return b }(),
		"ARP with 8-byte MACs":     func() []byte { b := bytes.Clone(arp); b[18] = 8; return b }(),
	}
}

func TestFromContainerMalformed(t *testing.T) {
	f := newFixture(t)
	for name, frame := range malformedFrames(f) {
		t.Run(name, func(t *testing.T) {
			f.expectCounted(loader.DatapathStatReasonDROP_MALFORMED, func() {
				if ret, _ := f.fromContainer(f.a, frame); ret != actShot {
					t.Fatalf("verdict %d, want drop", ret)
				}
			})
		})
	}
}

func TestFromContainerARP(t *testing.T) {
	f := newFixture(t)
	req := testutils.ARP{SrcMAC: f.a.mac, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: f.a.mac, SPA: f.a.ip, TPA: gatewayIP}

	t.Run("request for the gateway is answered with the host veth MAC", func(t *testing.T) {
		var ret uint32
		var out []byte
		f.expectCounted(loader.DatapathStatReasonARP_REPLY, func() { ret, out = f.fromContainer(f.a, req.Frame()) })
		if ret != actRedirect {
			t.Fatalf("verdict %d, want redirect back out of the veth", ret)
		}
		want := testutils.ARP{SrcMAC: f.a.hostMAC, DstMAC: f.a.mac, Op: layers.ARPReply, SHA: f.a.hostMAC, SPA: gatewayIP, THA: f.a.mac, TPA: f.a.ip}.Frame()
		if !bytes.Equal(out, want) {
			t.Errorf("ARP reply\n got % x\nwant % x", out, want)
		}
	})
	t.Run("request for another container is answered too", func(t *testing.T) {
		r := req
		r.TPA = f.b.ip
		f.expectCounted(loader.DatapathStatReasonARP_REPLY, func() {
			ret, out := f.fromContainer(f.a, r.Frame())
			_, _, arp := testutils.Decode(out)
			if ret != actRedirect || arp == nil || !bytes.Equal(arp.SourceHwAddress, f.a.hostMAC) {
				t.Fatalf("verdict %d, reply %+v: want the host veth MAC for %s", ret, arp, f.b.ip)
			}
		})
	})
	t.Run("announcement of its own address goes to the host", func(t *testing.T) {
		r := req
		r.TPA = f.a.ip
		f.expectCounted(loader.DatapathStatReasonARP_TO_STACK, func() {
			if ret, _ := f.fromContainer(f.a, r.Frame()); ret != actOK {
				t.Fatalf("verdict %d, want pass", ret)
			}
		})
	})
	t.Run("reply to the node goes to the host", func(t *testing.T) {
		r := testutils.ARP{SrcMAC: f.a.mac, DstMAC: f.a.hostMAC, Op: layers.ARPReply, SHA: f.a.mac, SPA: f.a.ip, THA: f.a.hostMAC, TPA: nicIP}
		f.expectCounted(loader.DatapathStatReasonARP_TO_STACK, func() {
			if ret, _ := f.fromContainer(f.a, r.Frame()); ret != actOK {
				t.Fatalf("verdict %d, want pass", ret)
			}
		})
	})
	for name, r := range map[string]testutils.ARP{
		"gratuitous ARP claiming another container": {SrcMAC: f.a.mac, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: f.a.mac, SPA: f.b.ip, TPA: f.b.ip},
		"gratuitous ARP claiming the node":          {SrcMAC: f.a.mac, DstMAC: layers.EthernetBroadcast, Op: layers.ARPReply, SHA: f.a.mac, SPA: nicIP, TPA: nicIP},
		"sender MAC not its own":                    {SrcMAC: f.a.mac, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: mustMAC("02:de:ad:be:ef:00"), SPA: f.a.ip, TPA: gatewayIP},
		"Ethernet source not its own":               {SrcMAC: mustMAC("02:de:ad:be:ef:00"), DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: f.a.mac, SPA: f.a.ip, TPA: gatewayIP},
	} {
		t.Run(name, func(t *testing.T) {
			f.expectCounted(loader.DatapathStatReasonDROP_ARP_SPOOFED, func() {
				if ret, _ := f.fromContainer(f.a, r.Frame()); ret != actShot {
					t.Fatalf("verdict %d, want drop", ret)
				}
			})
		})
	}
	t.Run("from B's address on A's veth", func(t *testing.T) {
		r := testutils.ARP{SrcMAC: f.b.mac, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: f.b.mac, SPA: f.b.ip, TPA: gatewayIP}
		f.expectCounted(loader.DatapathStatReasonDROP_ARP_SPOOFED, func() {
			if ret, _ := f.fromContainer(f.a, r.Frame()); ret != actShot {
				t.Fatalf("verdict %d, want drop", ret)
			}
		})
	})
}

func TestFromVNet(t *testing.T) {
	f := newFixture(t)
	fabric := host{remoteIP, neighMAC}
	t.Run("to a container", func(t *testing.T) {
		in := udp(fabric, host{f.a.ip, nicMAC}).Frame()
		var ret uint32
		var out []byte
		f.expectCounted(loader.DatapathStatReasonFWD_FROM_VNET, func() { ret, out = f.fromVNet(in) })
		if ret != actRedirect {
			t.Fatalf("verdict %d, want redirect", ret)
		}
		checkForwarded(t, in, out, f.a.mac, f.a.hostMAC)
	})
	t.Run("TTL 1 to a container", func(t *testing.T) {
		p := udp(fabric, host{f.a.ip, nicMAC})
		p.TTL = 1
		f.expectCounted(loader.DatapathStatReasonDROP_TTL_EXCEEDED, func() {
			if ret, _ := f.fromVNet(p.Frame()); ret != actShot {
				t.Fatalf("verdict %d, want drop", ret)
			}
		})
	})
	t.Run("to the node", func(t *testing.T) {
		in := udp(fabric, host{nicIP, nicMAC}).Frame()
		f.expectCounted(loader.DatapathStatReasonPASS_VNET_TO_HOST, func() {
			ret, out := f.fromVNet(in)
			if ret != actOK || !bytes.Equal(in, out) {
				t.Fatalf("verdict %d (want pass), frame changed: %v", ret, !bytes.Equal(in, out))
			}
		})
	})
	t.Run("ARP request for a container is answered with the NIC MAC", func(t *testing.T) {
		req := testutils.ARP{SrcMAC: neighMAC, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: neighMAC, SPA: remoteIP, TPA: f.b.ip}
		var ret uint32
		var out []byte
		f.expectCounted(loader.DatapathStatReasonARP_REPLY, func() { ret, out = f.fromVNet(req.Frame()) })
		want := testutils.ARP{SrcMAC: nicMAC, DstMAC: neighMAC, Op: layers.ARPReply, SHA: nicMAC, SPA: f.b.ip, THA: neighMAC, TPA: remoteIP}.Frame()
		if ret != actRedirect || !bytes.Equal(out, want) {
			t.Fatalf("verdict %d\n got % x\nwant % x", ret, out, want)
		}
	})
	for name, frame := range map[string][]byte{
		"ARP request for the node": testutils.ARP{SrcMAC: neighMAC, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: neighMAC, SPA: remoteIP, TPA: nicIP}.Frame(),
		"ARP reply":                testutils.ARP{SrcMAC: neighMAC, DstMAC: nicMAC, Op: layers.ARPReply, SHA: neighMAC, SPA: remoteIP, THA: nicMAC, TPA: nicIP}.Frame(),
		"IPv6":                     ethOnly(neighMAC, 0x86dd, 60),
	} {
		t.Run(name, func(t *testing.T) {
			f.expectCounted(loader.DatapathStatReasonPASS_VNET_TO_HOST, func() {
				if ret, out := f.fromVNet(frame); ret != actOK || !bytes.Equal(out, frame) {
					t.Fatalf("verdict %d, want an untouched pass", ret)
				}
			})
		})
	}
	for name, frame := range malformedFrames(f) {
		t.Run("malformed: "+name, func(t *testing.T) {
			f.expectCounted(loader.DatapathStatReasonPASS_VNET_TO_HOST, func() {
				if ret, out := f.fromVNet(frame); ret != actOK || !bytes.Equal(out, frame) {
					t.Fatalf("verdict %d, want an untouched pass", ret)
				}
			})
		})
	}
}

func TestDropEvents(t *testing.T) {
	f := newFixture(t)
	rd, err := f.m.NewEventReader()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	spoofed := testutils.IPv4{SrcMAC: f.a.mac, DstMAC: f.a.hostMAC, Src: netip.MustParseAddr("10.0.0.99"), Dst: f.b.ip, SrcPort: 1234, DstPort: 80}
	if ret, _ := f.fromContainer(f.a, spoofed.Frame()); ret != actShot {
		t.Fatalf("verdict %d, want drop", ret)
	}
	rd.SetDeadline(time.Now().Add(2 * time.Second))
	ev, err := rd.Read()
	if err != nil {
		t.Fatalf("read drop event: %v", err)
	}
	if r := maps.EventReason(ev); r != loader.DatapathStatReasonDROP_SPOOFED_IP {
		t.Errorf("reason %s, want DROP_SPOOFED_IP", loader.ReasonName(r))
	}
	if maps.EventSource(ev) != spoofed.Src || maps.EventDestination(ev) != spoofed.Dst ||
		ev.Sport != 1234 || ev.Dport != 80 || ev.Protocol != 17 || int(ev.Ifindex) != f.a.hostIfindex ||
		!bytes.Equal(maps.EventSourceMAC(ev), f.a.mac) || ev.Ethertype != 0x0800 {
		t.Errorf("event %+v does not describe the dropped packet", ev)
	}
}

// TestRandomFrames feeds mutated and random frames to both programs: they must never fail to
// run, must answer only with a known verdict, and from_container must never forward a frame
// whose source is not the sending container's own address and MAC.
func TestRandomFrames(t *testing.T) {
	f := newFixture(t)
	rng := rand.New(rand.NewPCG(1, 2))
	seeds := [][]byte{
		udp(f.a, f.b).Frame(),
		udp(f.a, host{remoteIP, nil}).Frame(),
		testutils.ARP{SrcMAC: f.a.mac, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: f.a.mac, SPA: f.a.ip, TPA: gatewayIP}.Frame(),
	}
	n := 3000
	if testing.Short() {
		n = 300
	}
	for i := 0; i < n; i++ {
		var frame []byte
		if i%10 == 0 {
			frame = make([]byte, 14+rng.IntN(80))
			for j := range frame {
				frame[j] = byte(rng.UintN(256))
			}
		} else {
			frame = bytes.Clone(seeds[rng.IntN(len(seeds))])
			for k := 1 + rng.IntN(4); k > 0; k-- {
				frame[rng.IntN(len(frame))] = byte(rng.UintN(256))
			}
			frame = frame[:14+rng.IntN(len(frame)-13)]
		}
		for _, prog := range []*ebpf.Program{f.dp.Objects.FromContainer, f.dp.Objects.FromVnet} {
			ifindex := f.a.hostIfindex
			if prog == f.dp.Objects.FromVnet {
				ifindex = f.nicIdx
			}
			ret, _, err := f.tryRun(prog, ifindex, frame)
			if err != nil && testRunRefuses(frame) {
				continue
			}
			if err != nil {
				t.Fatalf("frame % x: %v", frame, err)
			}
			if ret != actOK && ret != actShot && ret != actRedirect {
				t.Fatalf("frame % x: verdict %d", frame, ret)
			}
			if prog == f.dp.Objects.FromContainer && ret != actShot && !sentByA(f, frame) {
				t.Fatalf("from_container let through (verdict %d) a frame not sent by A: % x", ret, frame)
			}
		}
	}
}

// sentByA reports whether frame carries A's own source MAC and (for IPv4 or ARP) address.
func sentByA(f *fixture, frame []byte) bool {
	if !bytes.Equal(frame[6:12], f.a.mac) {
		return false
	}
	switch {
	case frame[12] == 0x08 && frame[13] == 0x00 && len(frame) >= 14+20:
		return bytes.Equal(frame[14+12:14+16], f.a.ip.AsSlice())
	case frame[12] == 0x08 && frame[13] == 0x06 && len(frame) >= 14+28:
		return bytes.Equal(frame[14+14:14+18], f.a.ip.AsSlice()) && bytes.Equal(frame[14+8:14+14], f.a.mac)
	}
	return false
}
