package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// events collects what `vnetbpf-agent monitor` would print.
type events struct {
	mu  sync.Mutex
	got []api.DropEvent
}

func (e *events) watch(t *testing.T, client *api.Client) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go client.Events(ctx, func(ev api.DropEvent) error {
		e.mu.Lock()
		e.got = append(e.got, ev)
		e.mu.Unlock()
		return nil
	})
}

func (e *events) expect(t *testing.T, reason string, match func(api.DropEvent) bool) {
	t.Helper()
	testutils.Eventually(t, 3*time.Second, "a "+reason+" event in the monitor stream", func() error {
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, ev := range e.got {
			if ev.Reason == reason && match(ev) {
				return nil
			}
		}
		return fmt.Errorf("%d events, none matches", len(e.got))
	})
}

func (c *cluster) counts() map[string]uint64 {
	s, err := c.maps().ReadStats()
	must(c.t, err)
	out := map[string]uint64{}
	for r, v := range s {
		out[loader.ReasonName(r)] = v.Packets
	}
	return out
}

func delta(before, after map[string]uint64, reason string) uint64 {
	return after[reason] - before[reason]
}

// TestHostileContainer plays the attacker from inside a container: each attack is dropped or
// answered by its stated rule, counted, visible in the monitor stream, and reaches neither
// another container nor the fabric nor the node.
func TestHostileContainer(t *testing.T) {
	c := newCluster(t, "10.0.1.0/28")
	cni := c.cni("1.1.0")
	evil, victim := c.mustAdd(cni, "evil"), c.mustAdd(cni, "victim")
	var evs events
	evs.watch(t, c.agent.Client())
	evilMAC := api.ContainerMAC(api.Key{ContainerID: evil.id, IfName: "eth0"})
	evilHost := api.HostMAC(api.Key{ContainerID: evil.id, IfName: "eth0"})

	t.Run("spoofed source MAC", func(t *testing.T) {
		atVictim, err := ListenUDP(victim.ns, 9999)
		must(t, err)
		defer atVictim.Close()
		before := c.counts()
		frame := testutils.IPv4{SrcMAC: net.HardwareAddr{2, 0xde, 0xad, 0, 0, 1}, DstMAC: evilHost, Src: evil.ip, Dst: victim.ip, SrcPort: 1, DstPort: 9999, Payload: []byte("x")}.Frame()
		must(t, SendFrame(evil.ns, "eth0", frame))
		if err := ExpectNothing(atVictim, 300*time.Millisecond); err != nil {
			t.Error(err)
		}
		if d := delta(before, c.counts(), "DROP_SPOOFED_MAC"); d != 1 {
			t.Errorf("DROP_SPOOFED_MAC counted %d, want 1", d)
		}
		evs.expect(t, "DROP_SPOOFED_MAC", func(ev api.DropEvent) bool { return ev.Dst == victim.ip && ev.DstPort == 9999 })
	})

	t.Run("gratuitous ARP claiming the victim and the node", func(t *testing.T) {
		before := c.counts()
		for _, claim := range []netip.Addr{victim.ip, c.node.Primary} {
			for _, op := range []uint16{layers.ARPRequest, layers.ARPReply} {
				frame := testutils.ARP{SrcMAC: evilMAC, DstMAC: layers.EthernetBroadcast, Op: op, SHA: evilMAC, SPA: claim, TPA: claim}.Frame()
				must(t, SendFrame(evil.ns, "eth0", frame))
			}
		}
		if d := delta(before, c.counts(), "DROP_ARP_SPOOFED"); d != 4 {
			t.Errorf("DROP_ARP_SPOOFED counted %d, want 4", d)
		}
		if d := delta(before, c.counts(), "ARP_TO_STACK"); d != 0 {
			t.Errorf("%d forged ARP packets reached the node's stack", d)
		}
		// The node's neighbour table must not learn evil's MAC for anyone.
		testutils.Do(t, c.node.NS, func() error {
			neighs, err := netlink.NeighList(0, netlink.FAMILY_V4)
			if err != nil {
				return err
			}
			for _, n := range neighs {
				if bytes.Equal(n.HardwareAddr, evilMAC) && !n.IP.Equal(evil.ip.AsSlice()) {
					t.Errorf("node learnt %s is at the attacker's MAC", n.IP)
				}
			}
			return nil
		})
		evs.expect(t, "DROP_ARP_SPOOFED", func(ev api.DropEvent) bool { return ev.SrcMAC == evilMAC.String() })
		expectPing(t, "node -> victim after the forged ARP", c.node.NS, victim.ip)
	})

	t.Run("ARP request flood is answered in BPF, never reaching the host", func(t *testing.T) {
		before := c.counts()
		victimRx := rxPackets(t, victim.ns, "eth0")
		const n = 2000
		req := testutils.ARP{SrcMAC: evilMAC, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: evilMAC, SPA: evil.ip, TPA: api.GatewayIP}.Frame()
		must(t, sendFrames(evil.ns, "eth0", req, n))
		after := c.counts()
		if d := delta(before, after, "ARP_REPLY"); d != n {
			t.Errorf("ARP_REPLY counted %d of %d requests", d, n)
		}
		if d := delta(before, after, "ARP_TO_STACK") + delta(before, after, "PASS_TO_STACK"); d != 0 {
			t.Errorf("%d packets of the flood reached the node's stack", d)
		}
		if got := rxPackets(t, victim.ns, "eth0") - victimRx; got > 5 {
			t.Errorf("the victim received %d packets during the flood", got)
		}
	})

	t.Run("IMDS is blocked", func(t *testing.T) {
		before := c.counts()
		must(t, SendSpoofedUDP(evil.ns, evil.ip, netip.MustParseAddr("169.254.169.254"), 80))
		if d := delta(before, c.counts(), "DROP_IMDS"); d != 1 {
			t.Errorf("DROP_IMDS counted %d, want 1", d)
		}
		evs.expect(t, "DROP_IMDS", func(ev api.DropEvent) bool { return ev.Src == evil.ip && ev.DstPort == 80 })
	})

	t.Run("fragments and IP options are forwarded under the same source checks", func(t *testing.T) {
		atVictim, err := ListenUDP(victim.ns, 9998)
		must(t, err)
		defer atVictim.Close()
		before := c.counts()
		// 4000 bytes over a 1500-byte MTU: the kernel sends three fragments.
		payload := bytes.Repeat([]byte("f"), 4000)
		must(t, sendUDP(evil.ns, victim.ip, 9998, payload, nil))
		// Record-route option (type 7), as some tools send.
		must(t, sendUDP(evil.ns, victim.ip, 9998, []byte("with options"), []byte{7, 7, 4, 0, 0, 0, 0, 0}))
		atVictim.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 9000)
		for _, want := range [][]byte{payload, []byte("with options")} {
			n, _, err := atVictim.ReadFrom(buf)
			if err != nil || !bytes.Equal(buf[:n], want) {
				t.Fatalf("victim got %d bytes (%v), want %d", n, err, len(want))
			}
		}
		if d := delta(before, c.counts(), "FWD_LOCAL"); d < 4 {
			t.Errorf("FWD_LOCAL counted %d, want the 3 fragments and the datagram with options", d)
		}
	})
}

// sendFrames writes frame n times out of dev in namespace netns.
func sendFrames(netns ns.NetNS, dev string, frame []byte, n int) error {
	return netns.Do(func(ns.NetNS) error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6}
		copy(sa.Addr[:], frame[0:6])
		for i := 0; i < n; i++ {
			if err := unix.Sendto(fd, frame, 0, sa); err != nil {
				return err
			}
		}
		return nil
	})
}

// sendUDP sends one datagram from netns to dst:port, with raw IP options if given.
func sendUDP(netns ns.NetNS, dst netip.Addr, port int, payload, options []byte) error {
	return netns.Do(func(ns.NetNS) error {
		conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: dst.AsSlice(), Port: port})
		if err != nil {
			return err
		}
		defer conn.Close()
		if options != nil {
			raw, err := conn.SyscallConn()
			if err != nil {
				return err
			}
			var serr error
			raw.Control(func(fd uintptr) {
				serr = unix.SetsockoptString(int(fd), unix.IPPROTO_IP, unix.IP_OPTIONS, string(options))
			})
			if serr != nil {
				return fmt.Errorf("set IP options: %w", serr)
			}
		}
		_, err = conn.Write(payload)
		return err
	})
}

func rxPackets(t *testing.T, netns ns.NetNS, dev string) uint64 {
	t.Helper()
	var rx uint64
	testutils.Do(t, netns, func() error {
		l, err := netlink.LinkByName(dev)
		if err == nil {
			rx = l.Attrs().Statistics.RxPackets
		}
		return err
	})
	return rx
}
