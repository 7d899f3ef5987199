package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

func mac(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// datapathNode is one simulated node with two containers wired by the test, and the datapath
// loaded and attached through pkg/loader and filled through pkg/maps.
type datapathNode struct {
	fabric *Fabric
	node   *Node
	a, b   *Container
	root   string
	dp     *loader.Datapath
	m      *maps.Maps
}

func newDatapathNode(t *testing.T, mode loader.Mode) *datapathNode {
	testutils.RequireRoot(t)
	f, node := newFabricNode(t)
	d := &datapathNode{fabric: f, node: node, root: testutils.BPFRoot(t)}
	for _, c := range []struct {
		dst     **Container
		dev     string
		ip      string
		mac     string
		hostMAC string
	}{
		{&d.a, "vnbtesta", "10.0.0.10", "02:aa:00:00:00:10", "02:bb:00:00:00:10"},
		{&d.b, "vnbtestb", "10.0.0.11", "02:aa:00:00:00:11", "02:bb:00:00:00:11"},
	} {
		ip := netip.MustParseAddr(c.ip)
		ctr, err := WireContainer(node, c.dev, ip, mac(c.mac), mac(c.hostMAC))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ctr.Close(node) })
		if err := f.AddIPConfig(node, ip); err != nil {
			t.Fatal(err)
		}
		*c.dst = ctr
	}

	dp, err := loader.Load(loader.Options{Root: d.root, Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	d.dp = dp
	d.m = maps.FromObjects(&dp.Objects)
	for id, c := range []*Container{d.a, d.b} {
		cm, _ := maps.MAC(c.MAC)
		hm, _ := maps.MAC(c.HostMAC)
		if err := d.m.PutEndpoint(c.IP, maps.Endpoint{Ifindex: uint32(c.HostIdx), Id: uint32(id + 1), Mac: cm, HostMac: hm}); err != nil {
			t.Fatal(err)
		}
	}
	must(t, d.m.AddVNetCIDR(f.Prefix))
	must(t, d.m.AddHostAddress(node.Primary))
	testutils.Do(t, node.NS, func() error {
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		nm, _ := maps.MAC(eth0.Attrs().HardwareAddr)
		return d.m.SetConfig(maps.NodeConfig{NicIfindex: uint32(eth0.Attrs().Index), NicMac: nm})
	})
	d.attach(t)
	return d
}

func (d *datapathNode) attach(t *testing.T) {
	t.Helper()
	testutils.Do(t, d.node.NS, func() error {
		if err := d.dp.Attach("eth0", loader.FromVNet); err != nil {
			return err
		}
		for _, c := range []*Container{d.a, d.b} {
			if err := d.dp.Attach(c.HostDev, loader.FromContainer); err != nil {
				return err
			}
		}
		return nil
	})
}

func (d *datapathNode) detach(t *testing.T) {
	t.Helper()
	testutils.Do(t, d.node.NS, func() error {
		for _, dev := range []string{"eth0", d.a.HostDev, d.b.HostDev} {
			if err := d.dp.Detach(dev); err != nil {
				return err
			}
		}
		return nil
	})
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func expectPing(t *testing.T, what string, from ns.NetNS, dst netip.Addr) {
	t.Helper()
	got, err := Ping(from, dst, 3, 20*time.Millisecond, time.Second)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if got != 3 {
		t.Errorf("%s: %d of 3 echo replies", what, got)
	}
}

func expectNoPing(t *testing.T, what string, from ns.NetNS, dst netip.Addr) {
	t.Helper()
	got, err := Ping(from, dst, 2, 20*time.Millisecond, 300*time.Millisecond)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if got != 0 {
		t.Errorf("%s: %d echo replies, want none", what, got)
	}
}

func (d *datapathNode) counts(t *testing.T) map[maps.Reason]uint64 {
	t.Helper()
	s, err := d.m.ReadStats()
	must(t, err)
	out := make(map[maps.Reason]uint64)
	for r, v := range s {
		out[r] = v.Packets
	}
	return out
}

// TestDatapath proves in real namespaces, with IP forwarding off and no proxy ARP on the
// node, that the programs and nothing else move the packets, for every attach mode.
func TestDatapath(t *testing.T) {
	for _, mode := range []loader.Mode{loader.ModeTCX, loader.ModeTC, loader.ModeAuto} {
		t.Run(string(mode), func(t *testing.T) { testDatapath(t, mode) })
	}
}

func testDatapath(t *testing.T, mode loader.Mode) {
	d := newDatapathNode(t, mode)
	// auto: the NIC through TCX (this kernel has it), the veths through cls_bpf, whose
	// attach costs no RCU grace period.
	wantNIC, wantVeth := mode, mode
	if mode == loader.ModeAuto {
		wantNIC, wantVeth = loader.ModeTCX, loader.ModeTC // until moved to TCX
	}
	if got, gotVeth := d.dp.Mode(), d.dp.EndpointMode(); got != wantNIC || gotVeth != mode {
		t.Fatalf("attach modes %s (NIC), %s (endpoints); want %s, %s", got, gotVeth, wantNIC, mode)
	}
	checkAttached := func(dev string, want loader.Mode) {
		t.Helper()
		tcx, tc := progIDs(t, d.node, dev)
		if (want == loader.ModeTCX) != (tcx != 0) || (want == loader.ModeTC) != (tc != 0) {
			t.Errorf("%s: TCX program %d, cls_bpf program %d; want it attached with %s only", dev, tcx, tc, want)
		}
	}
	checkAttached("eth0", wantNIC)
	checkAttached(d.a.HostDev, wantVeth)
	if mode == loader.ModeAuto {
		// AttachEndpoint(veth, true) moves a veth to TCX and takes the filter and the empty
		// clsact away; a later attach (an upgrade) keeps TCX.
		testutils.Do(t, d.node.NS, func() error {
			_, err := d.dp.AttachEndpoint(d.a.HostDev, true)
			return err
		})
		checkAttached(d.a.HostDev, loader.ModeTCX)
		if q := qdiscs(t, d.node, d.a.HostDev); slices.Contains(q, "clsact") {
			t.Errorf("%s keeps an empty clsact qdisc after the move to TCX: %v", d.a.HostDev, q)
		}
		testutils.Do(t, d.node.NS, func() error {
			m, err := d.dp.AttachEndpoint(d.a.HostDev, false)
			if err == nil && m != loader.ModeTCX {
				t.Errorf("AttachEndpoint on a settled veth used %s, want tcx", m)
			}
			return err
		})
		checkAttached(d.a.HostDev, loader.ModeTCX)
		checkAttached(d.b.HostDev, loader.ModeTC)
	}
	testutils.Do(t, d.node.NS, func() error {
		for _, k := range []string{"ip_forward", "conf/all/proxy_arp", "conf/eth0/proxy_arp"} {
			b, err := os.ReadFile("/proc/sys/net/ipv4/" + k)
			if err != nil {
				return err
			}
			if strings.TrimSpace(string(b)) != "0" {
				t.Fatalf("node has net.ipv4.%s=%s; the test needs 0", k, b)
			}
		}
		return nil
	})
	gw := d.fabric.Gateway
	before := d.counts(t)

	t.Run("ping", func(t *testing.T) {
		expectPing(t, "container A -> container B", d.a.NS, d.b.IP)
		expectPing(t, "container B -> container A", d.b.NS, d.a.IP)
		expectPing(t, "container A -> fabric gateway", d.a.NS, gw)
		expectPing(t, "fabric -> container B", d.fabric.NS, d.b.IP)
		expectPing(t, "node -> container A", d.node.NS, d.a.IP)
		expectPing(t, "container A -> node", d.a.NS, d.node.Primary)
	})
	t.Run("tcp", func(t *testing.T) {
		for _, c := range []struct {
			what           string
			server, client ns.NetNS
			dst            netip.Addr
		}{
			{"A -> B", d.b.NS, d.a.NS, d.b.IP},
			{"B -> A", d.a.NS, d.b.NS, d.a.IP},
			{"A -> fabric", d.fabric.NS, d.a.NS, gw},
			{"fabric -> B", d.b.NS, d.fabric.NS, d.b.IP},
			{"node -> A", d.a.NS, d.node.NS, d.a.IP},
		} {
			if err := TCPExchange(c.server, c.client, c.dst, 8080, 5*time.Second); err != nil {
				t.Errorf("%s: %v", c.what, err)
			}
		}
	})
	after := d.counts(t)
	for _, r := range []maps.Reason{loader.DatapathStatReasonFWD_LOCAL, loader.DatapathStatReasonFWD_TO_VNET, loader.DatapathStatReasonFWD_FROM_VNET} {
		if after[r] <= before[r] {
			t.Errorf("%s did not count the traffic (%d before, %d after)", loader.ReasonName(r), before[r], after[r])
		}
	}

	t.Run("spoofed source is dropped and counted", func(t *testing.T) {
		atB, err := ListenUDP(d.b.NS, 9999)
		must(t, err)
		defer atB.Close()
		atFabric, err := ListenUDP(d.fabric.NS, 9999)
		must(t, err)
		defer atFabric.Close()
		c0 := d.counts(t)
		for _, s := range []struct{ src, dst netip.Addr }{
			{netip.MustParseAddr("10.0.0.99"), d.b.IP}, // an address of nobody
			{d.b.IP, gw}, // container B's address, from A
			{netip.MustParseAddr("10.0.0.99"), gw},
		} {
			must(t, SendSpoofedUDP(d.a.NS, s.src, s.dst, 9999))
		}
		if err := ExpectNothing(atB, 300*time.Millisecond); err != nil {
			t.Errorf("container B got a spoofed datagram: %v", err)
		}
		if err := ExpectNothing(atFabric, 100*time.Millisecond); err != nil {
			t.Errorf("the fabric got a spoofed datagram: %v", err)
		}
		if got := d.counts(t)[loader.DatapathStatReasonDROP_SPOOFED_IP] - c0[loader.DatapathStatReasonDROP_SPOOFED_IP]; got != 3 {
			t.Errorf("DROP_SPOOFED_IP counted %d, want 3", got)
		}
	})
	t.Run("truncated IPv4 is dropped as malformed", func(t *testing.T) {
		// BPF_PROG_TEST_RUN refuses these, so they are sent for real.
		c0 := d.counts(t)
		for _, n := range []int{0, 10, 19} {
			frame := make([]byte, 14+n)
			copy(frame[0:6], d.b.HostMAC)
			copy(frame[6:12], d.a.MAC)
			frame[12], frame[13] = 0x08, 0x00
			if n > 0 {
				frame[14] = 0x45
			}
			must(t, SendFrame(d.a.NS, "eth0", frame))
		}
		testutils.Eventually(t, time.Second, "3 malformed frames counted", func() error {
			if got := d.counts(t)[loader.DatapathStatReasonDROP_MALFORMED] - c0[loader.DatapathStatReasonDROP_MALFORMED]; got != 3 {
				return fmt.Errorf("DROP_MALFORMED counted %d, want 3", got)
			}
			return nil
		})
	})

	t.Run("reload keeps the maps and replaces the programs without loss", func(t *testing.T) {
		dp2, err := loader.Load(loader.Options{Root: d.root, Mode: mode})
		must(t, err)
		defer dp2.Close()
		m2 := maps.FromObjects(&dp2.Objects)
		eps, err := m2.ListEndpoints()
		must(t, err)
		if len(eps) != 2 {
			t.Fatalf("reloaded endpoints map has %d entries, want the 2 pinned ones", len(eps))
		}
		oldID := d.attachedProgID(t, d.a.HostDev)

		var wg sync.WaitGroup
		var got int
		var perr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, perr = Ping(d.a.NS, d.b.IP, 300, 2*time.Millisecond, time.Second)
		}()
		time.Sleep(200 * time.Millisecond) // let the ping run before, during and after the swap
		testutils.Do(t, d.node.NS, func() error {
			for _, dev := range []string{"eth0", d.a.HostDev, d.b.HostDev} {
				p := loader.FromContainer
				if dev == "eth0" {
					p = loader.FromVNet
				}
				if err := dp2.Attach(dev, p); err != nil {
					return err
				}
			}
			return nil
		})
		wg.Wait()
		must(t, perr)
		if got != 300 {
			t.Errorf("ping across the program swap: %d of 300 replies", got)
		}
		newInfo, err := dp2.Objects.FromContainer.Info()
		must(t, err)
		newID, _ := newInfo.ID()
		if id := d.attachedProgID(t, d.a.HostDev); id == oldID || id != uint32(newID) {
			t.Errorf("attached program id %d after reload, want the new program %d (old %d)", id, newID, oldID)
		}
	})

	t.Run("without the programs nothing is forwarded", func(t *testing.T) {
		d.detach(t)
		if id := d.attachedProgID(t, d.a.HostDev); id != 0 {
			t.Fatalf("program %d still attached after detach", id)
		}
		if pins, _ := loader.LinkPins(d.root); len(pins) != 0 {
			t.Errorf("link pins left after detach: %v", pins)
		}
		expectNoPing(t, "container A -> container B", d.a.NS, d.b.IP)
		expectNoPing(t, "container A -> fabric gateway", d.a.NS, gw)
		expectNoPing(t, "fabric -> container B", d.fabric.NS, d.b.IP)
		// Attaching again brings forwarding back: the failure above was the programs' absence.
		d.attach(t)
		expectPing(t, "container A -> container B after re-attach", d.a.NS, d.b.IP)
	})
	t.Run("switching the attach mode leaves one attachment", func(t *testing.T) { testModeSwitch(t, d, mode) })
}

// testModeSwitch: an agent restarted in the other attach mode replaces the old attachment;
// the program of the old mode must not keep running in front of, or instead of, the new one.
func testModeSwitch(t *testing.T, d *datapathNode, from loader.Mode) {
	to := loader.ModeTCX // from tc, and from auto, whose veths are cls_bpf
	if from == loader.ModeTCX {
		to = loader.ModeTC
	}
	dp, err := loader.Load(loader.Options{Root: d.root, Mode: to})
	must(t, err)
	defer dp.Close()
	testutils.Do(t, d.node.NS, func() error { return dp.Attach(d.a.HostDev, loader.FromContainer) })
	tcx, tc := progIDs(t, d.node, d.a.HostDev)
	info, _ := dp.Objects.FromContainer.Info()
	want, _ := info.ID()
	got, leftover := tcx, tc
	if to == loader.ModeTC {
		got, leftover = tc, tcx
	}
	if got != uint32(want) || leftover != 0 {
		t.Errorf("after switching %s -> %s: %s has program %d (want %d) and leftover %s program %d",
			from, to, d.a.HostDev, got, want, from, leftover)
	}
	expectPing(t, "container A -> container B after the mode switch", d.a.NS, d.b.IP)
}

// progIDs is the program attached to dev's ingress in node through TCX and through clsact.
func progIDs(t *testing.T, node *Node, dev string) (tcx, tc uint32) {
	t.Helper()
	testutils.Do(t, node.NS, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		for _, p := range res.Programs {
			tcx = uint32(p.ID)
		}
		filters, err := netlink.FilterList(l, netlink.HANDLE_MIN_INGRESS)
		if err != nil {
			return err
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				tc = uint32(bf.Id)
			}
		}
		return nil
	})
	return tcx, tc
}

// attachedProgID is the ID of the program of ours on dev's ingress, 0 if none.
func (d *datapathNode) attachedProgID(t *testing.T, dev string) uint32 {
	t.Helper()
	tcx, tc := progIDs(t, d.node, dev)
	if tcx != 0 {
		return tcx
	}
	return tc
}
