package e2e

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/agent"
	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// nftRuleset is `nft list ruleset` in node's namespace.
func nftRuleset(t *testing.T, node *Node) string {
	t.Helper()
	out, err := exec.Command("nsenter", "--net="+node.NS.Path(), "--", "nft", "list", "ruleset").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset: %v\n%s", err, out)
	}
	return string(out)
}

// linksOfType lists the names of node's links of a kind ("ifb", "veth").
func linksOfType(t *testing.T, node *Node, kind string) []string {
	t.Helper()
	var names []string
	testutils.Do(t, node.NS, func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if l.Type() == kind {
				names = append(names, l.Attrs().Name)
			}
		}
		return nil
	})
	return names
}

// qdiscs lists the qdisc kinds on dev in node's namespace.
func qdiscs(t *testing.T, node *Node, dev string) []string {
	t.Helper()
	var kinds []string
	testutils.Do(t, node.NS, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		qs, err := netlink.QdiscList(l)
		if err != nil {
			return err
		}
		for _, q := range qs {
			kinds = append(kinds, q.Type())
		}
		return nil
	})
	return kinds
}

// qdiscPackets is how many packets the first qdisc of kind on dev in node's namespace has
// sent.
func qdiscPackets(t *testing.T, node *Node, dev, kind string) uint64 {
	t.Helper()
	var n uint64
	found := false
	testutils.Do(t, node.NS, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		qs, err := netlink.QdiscList(l)
		if err != nil {
			return err
		}
		for _, q := range qs {
			if q.Type() == kind && !found {
				found = true
				if st := q.Attrs().Statistics; st != nil && st.Basic != nil {
					n = uint64(st.Basic.Packets)
				}
			}
		}
		return nil
	})
	if !found {
		t.Fatalf("no %s qdisc on %s", kind, dev)
	}
	return n
}

// TestChainPortmapBandwidth runs vnetbpf first in a conflist followed by the upstream portmap
// (nftables) and bandwidth plugins, through libcni with the capability arguments a runtime
// passes for a pod's hostPort and bandwidth annotations: both accept vnetbpf's result, set
// up their part, pass CHECK, and DEL takes everything away again.
//
// portmap's DNAT is exercised only for connections the node itself opens: those are NATed
// in the output hook and need no forwarding. A connection from the VNet or another container
// to node:hostPort cannot work with this datapath: the node does not forward (ip_forward=0),
// so the DNATed packet is dropped, and even with forwarding on, the container's reply is
// redirected by from_container straight to the peer, so the host's conntrack never reverses
// the DNAT and the client gets an answer from an address it did not call.
func TestChainPortmapBandwidth(t *testing.T) {
	tools := upstreamTools(t)
	c := newClusterWith(t, "10.0.1.0/29", func(cfg *agent.Config) {})
	const hostPort, ctrPort = 18080, 8080
	// vnetbpf declares the bandwidth capability too: with an egress limit it asks for TCX at
	// once, since bandwidth's ingress qdisc cannot live beside the clsact of attachMode
	// auto's ADD-time cls_bpf filter.
	list := []byte(fmt.Sprintf(`{"cniVersion":"1.1.0","name":"vnet","plugins":[`+
		`{"type":"vnetbpf","agentSocket":%q,"logFile":%q,"logLevel":"debug","capabilities":{"bandwidth":true}},`+
		`{"type":"portmap","backend":"nftables","capabilities":{"portMappings":true}},`+
		`{"type":"bandwidth","capabilities":{"bandwidth":true}}]}`,
		c.agent.Config.Socket, filepath.Join(c.dir, "cni.log")))
	chain, err := NewCNI(c.node, list, filepath.Join(c.dir, "chain-cache"), c.bin, tools.PluginsDir)
	must(t, err)
	peer := c.mustAdd(c.cni("1.1.0"), "peer") // a plain vnetbpf container to talk to

	ctrNS := c.newNetns()
	const id = "shaped"
	rt := Runtime(id, ctrNS.Path(), "eth0", "default", "web-0")
	rt.CapabilityArgs = map[string]any{
		"portMappings": []map[string]any{{"hostPort": hostPort, "containerPort": ctrPort, "protocol": "tcp"}},
		"bandwidth": map[string]any{
			"ingressRate": 100_000_000, "ingressBurst": 10_000_000,
			"egressRate": 100_000_000, "egressBurst": 10_000_000,
		},
	}
	res, err := chain.Add(t.Context(), rt)
	if err != nil {
		t.Fatalf("chained ADD: %v\nagent log:\n%s", err, c.agent.Tail(20))
	}
	r, err := current.NewResultFromResult(res)
	if err != nil || len(r.IPs) != 1 {
		t.Fatalf("chained result %v (%v), want vnetbpf's one address", res, err)
	}
	ip, _ := netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
	if !c.pool.Contains(ip) || ip == peer.ip {
		t.Fatalf("chained ADD gave %s, want a free address of %s", ip, c.pool)
	}
	hostVeth := api.HostVethName(api.Key{ContainerID: id, IfName: "eth0"})
	if tcx, tc := progIDs(t, c.node, hostVeth); tcx == 0 || tc != 0 {
		t.Errorf("%s: TCX program %d, cls_bpf program %d; want TCX from the ADD on", hostVeth, tcx, tc)
	}

	// bandwidth: a tbf on the host veth shapes what enters the container; what leaves it is
	// mirrored to an ifb of its own with another tbf.
	if q := qdiscs(t, c.node, hostVeth); !slices.Contains(q, "tbf") {
		t.Errorf("qdiscs on host veth %s: %v, want bandwidth's tbf", hostVeth, q)
	}
	ifbs := linksOfType(t, c.node, "ifb")
	if len(ifbs) != 1 || !strings.HasPrefix(ifbs[0], "bwp") {
		t.Errorf("ifb devices %v, want bandwidth's one for egress", ifbs)
	} else if q := qdiscs(t, c.node, ifbs[0]); !slices.Contains(q, "tbf") {
		t.Errorf("qdiscs on %s: %v, want a tbf", ifbs[0], q)
	}
	// portmap: the DNAT rule for the pod's port, tagged with its container ID.
	dnat := fmt.Sprintf("tcp dport %d dnat to %s:%d comment %q", hostPort, ip, ctrPort, id)
	if rules := nftRuleset(t, c.node); !strings.Contains(rules, "table ip cni_hostport") || !strings.Contains(rules, dnat) {
		t.Errorf("nft ruleset lacks portmap's %q:\n%s", dnat, rules)
	}

	expectPing(t, "container -> peer", ctrNS, peer.ip)
	expectPing(t, "peer -> container", peer.ns, ip)
	expectPing(t, "container -> fabric gateway", ctrNS, c.fabric.Gateway)
	if err := TCPExchange(ctrNS, peer.ns, ip, ctrPort, 5*time.Second); err != nil {
		t.Errorf("tcp peer -> container: %v", err)
	}
	if err := TCPExchange(ctrNS, c.fabric.NS, ip, ctrPort, 5*time.Second); err != nil {
		t.Errorf("tcp fabric -> container: %v", err)
	}
	for _, dst := range []netip.Addr{c.node.Primary, netip.MustParseAddr("127.0.0.1")} {
		src, err := portmapExchange(ctrNS, c.node.NS, dst, hostPort, ctrPort)
		if err != nil {
			t.Errorf("tcp node -> %s:%d (portmap to %s:%d): %v", dst, hostPort, ip, ctrPort, err)
		} else if src != c.node.Primary {
			t.Errorf("tcp node -> %s:%d arrived from %s, want the node's %s", dst, hostPort, src, c.node.Primary)
		}
	}
	// What the node sends to the container goes through the host veth, hence its tbf.
	before := qdiscPackets(t, c.node, hostVeth, "tbf")
	if n, err := Ping(c.node.NS, ip, 10, time.Millisecond, time.Second); err != nil || n != 10 {
		t.Errorf("node -> container: %d of 10 replies (%v)", n, err)
	}
	if after := qdiscPackets(t, c.node, hostVeth, "tbf"); after < before+10 {
		t.Errorf("bandwidth's tbf on %s sent %d packets for 10 pings from the node, want >= 10", hostVeth, after-before)
	}

	if err := chain.Check(t.Context(), rt); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if err := chain.Del(t.Context(), rt); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if hostVethExists(t, c.node, hostVeth) {
		t.Errorf("host veth %s still exists after DEL", hostVeth)
	}
	if ifbs := linksOfType(t, c.node, "ifb"); len(ifbs) != 0 {
		t.Errorf("ifb devices %v left after DEL", ifbs)
	}
	if rules := nftRuleset(t, c.node); strings.Contains(rules, fmt.Sprintf("dport %d", hostPort)) || strings.Contains(rules, fmt.Sprintf("%q", id)) {
		t.Errorf("nft rules of %s left after DEL:\n%s", id, rules)
	}
	if ep := agentEndpoint(t, c.agent, id); ep != nil {
		t.Errorf("agent endpoint left after DEL: %s", describe(ep))
	}
	if err := chain.Del(t.Context(), rt); err != nil {
		t.Errorf("second DEL: %v", err)
	}
	expectPing(t, "peer -> fabric gateway after the chained DEL", peer.ns, c.fabric.Gateway)
}

// portmapExchange listens on ctrPort in server and connects from client to dst:hostPort; it
// returns the source address the server saw, or why the echo failed.
func portmapExchange(server ns.NetNS, client ns.NetNS, dst netip.Addr, hostPort, ctrPort int) (netip.Addr, error) {
	var ln net.Listener
	err := server.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", ctrPort))
		return err
	})
	if err != nil {
		return netip.Addr{}, err
	}
	defer ln.Close()
	seen := make(chan netip.Addr, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		seen <- conn.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		io.Copy(conn, conn)
	}()
	var conn net.Conn
	err = client.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp4", netip.AddrPortFrom(dst, uint16(hostPort)).String(), 2*time.Second)
		return err
	})
	if err != nil {
		return netip.Addr{}, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	msg := []byte("through portmap")
	if _, err := conn.Write(msg); err != nil {
		return netip.Addr{}, err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil {
		return netip.Addr{}, fmt.Errorf("read echo: %w", err)
	}
	if string(got) != string(msg) {
		return netip.Addr{}, fmt.Errorf("echo %q, want %q", got, msg)
	}
	return <-seen, nil
}
