// Package topology builds the setups the datapath comparison runs in, all at once and side
// by side on one machine, each on a simulated Azure VNet (test/e2e): a fabric namespace and
// two node namespaces whose eth0 plug into it, with containers A and B on node1 and C on
// node2, wired by
//
//   - vnetbpf: the agent and the CNI plugin, through libcni;
//   - ptp: containernetworking/plugins ptp with host-local IPAM, through libcni: a veth per
//     container, host routes and the kernel's IP forwarding (Azure CNI's transparent mode);
//   - bridge: the bridge plugin with host-local IPAM, through libcni: a Linux bridge with
//     the gateway address (Azure CNI's bridge mode);
//
// and two references without any plugin:
//
//   - direct: one veth pair between two namespaces, the floor no plugin can go below;
//   - fabric: node1 to node2 through the fabric, with no container: the fabric's own hop.
package topology

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// Scope says whether traffic stays on one node.
type Scope string

// Scopes.
const (
	SameNode    Scope = "same node"
	AcrossNodes Scope = "across nodes"
)

// Mode is how the two ends are connected.
type Mode string

// Modes.
const (
	VNetBPF Mode = "vnetbpf"
	PTP     Mode = "ptp"
	Bridge  Mode = "bridge"
	Direct  Mode = "direct"
	Fabric  Mode = "fabric"
)

// Endpoint is one end of a measurement: a namespace and the address a server there listens on.
type Endpoint struct {
	Name string
	NS   ns.NetNS
	IP   netip.Addr
}

// Pair is a client and a server between which traffic is measured.
type Pair struct {
	Mode   Mode
	Scope  Scope
	Client Endpoint
	Server Endpoint
}

// Label names the pair in progress lines.
func (p Pair) Label() string { return fmt.Sprintf("%s, %s", p.Mode, p.Scope) }

// Options configure Build.
type Options struct {
	Reg *resources.Registry
	// WorkDir holds agent state, CNI caches and host-local's leases.
	WorkDir string
	// PluginsDir holds ptp, bridge, host-local and loopback (UpstreamPlugins).
	PluginsDir string
	// Progress is told about each step.
	Progress func(format string, args ...any)
}

// Env is every setup, built.
type Env struct {
	Pairs    []Pair
	clusters []*Cluster
	reg      *resources.Registry
}

// Cluster is one plugin's simulated VNet: a fabric, two nodes, containers A, B (node1) and
// C (node2).
type Cluster struct {
	Mode    Mode
	Fabric  *e2e.Fabric
	Nodes   [2]*e2e.Node
	CNI     [2]*e2e.CNI
	Agents  [2]*e2e.Agent // vnetbpf only
	A, B, C Endpoint
	reg     *resources.Registry
}

var vnetPrefix = netip.MustParsePrefix("10.0.0.0/16")

// Build creates every setup and checks that each pair reaches its server.
func Build(ctx context.Context, opts Options) (*Env, error) {
	env := &Env{reg: opts.Reg}
	if err := env.build(ctx, opts); err != nil {
		env.Close()
		return nil, err
	}
	return env, nil
}

func (env *Env) build(ctx context.Context, opts Options) error {
	say := opts.Progress
	if say == nil {
		say = func(string, ...any) {}
	}
	for _, mode := range []Mode{VNetBPF, PTP, Bridge} {
		say("building %s: a fabric, two nodes, containers A and B on node1, C on node2", mode)
		c, err := NewCluster(ctx, mode, opts)
		if c != nil {
			env.clusters = append(env.clusters, c)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
	}
	say("building direct: one veth pair between two namespaces")
	da, db, err := directPair(opts.Reg)
	if err != nil {
		return fmt.Errorf("direct: %w", err)
	}
	say("building fabric: two bare nodes on a fabric of their own")
	fabric, n1, n2, err := bareNodes(opts.Reg)
	if fabric != nil {
		env.clusters = append(env.clusters, &Cluster{Mode: Fabric, Fabric: fabric, reg: opts.Reg})
	}
	if err != nil {
		return fmt.Errorf("fabric: %w", err)
	}
	for _, scope := range []Scope{SameNode, AcrossNodes} {
		for _, c := range env.clusters[:3] {
			server := c.B
			if scope == AcrossNodes {
				server = c.C
			}
			env.Pairs = append(env.Pairs, Pair{Mode: c.Mode, Scope: scope, Client: c.A, Server: server})
		}
		env.Pairs = append(env.Pairs, Pair{Mode: Direct, Scope: scope, Client: da, Server: db})
	}
	env.Pairs = append(env.Pairs, Pair{Mode: Fabric, Scope: AcrossNodes, Client: n1, Server: n2})

	say("checking that every pair reaches its server (ping)")
	for _, p := range env.Pairs {
		got, err := e2e.Ping(p.Client.NS, p.Server.IP, 3, 20*time.Millisecond, 2*time.Second)
		if err != nil {
			return fmt.Errorf("ping %s: %w", p.Label(), err)
		}
		if got != 3 {
			return fmt.Errorf("%s: %s -> %s answered %d of 3 pings", p.Label(), p.Client.Name, p.Server.IP, got)
		}
	}
	return nil
}

// Cluster returns the cluster of mode, or nil.
func (e *Env) Cluster(mode Mode) *Cluster {
	for _, c := range e.clusters {
		if c.Mode == mode {
			return c
		}
	}
	return nil
}

// Close removes every setup: agents, containers, nodes and fabrics.
func (e *Env) Close() error {
	var errs []error
	for _, c := range e.clusters {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// NewCluster builds mode's fabric, nodes and the three containers.
func NewCluster(ctx context.Context, mode Mode, opts Options) (*Cluster, error) {
	c := &Cluster{Mode: mode, reg: opts.Reg}
	f, err := e2e.NewFabric(vnetPrefix)
	if err != nil {
		return nil, err
	}
	opts.Reg.TrackNS(f.NS)
	c.Fabric = f
	for i := range 2 {
		mac, _ := net.ParseMAC(fmt.Sprintf("02:00:0a:00:00:%02x", 4+i))
		n, err := f.AddNode(fmt.Sprintf("node%d", i+1), mac, netip.AddrFrom4([4]byte{10, 0, 0, byte(4 + i)}))
		if err != nil {
			return c, err
		}
		opts.Reg.TrackNS(n.NS)
		c.Nodes[i] = n
		dir, err := opts.Reg.NewDir(opts.WorkDir, fmt.Sprintf("%s-node%d", mode, i+1))
		if err != nil {
			return c, err
		}
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(1 + i), 0}), 24)
		if err := c.setUpNode(i, dir, subnet, opts); err != nil {
			return c, err
		}
	}
	for _, x := range []struct {
		dst  *Endpoint
		name string
		node int
	}{{&c.A, "A", 0}, {&c.B, "B", 0}, {&c.C, "C", 1}} {
		ep, err := c.AddContainer(ctx, x.node, fmt.Sprintf("%s-%s", mode, x.name))
		if err != nil {
			return c, fmt.Errorf("container %s: %w", x.name, err)
		}
		*x.dst = ep
	}
	if mode == VNetBPF {
		// Measure the datapath a node settles into: the agent moves new endpoints from
		// their cls_bpf filter to TCX once no CNI request runs.
		for _, a := range c.Agents {
			if err := waitSettled(ctx, a, 10*time.Second); err != nil {
				return c, err
			}
		}
	}
	return c, nil
}

// waitSettled waits until agent a has no endpoint left on cls_bpf.
func waitSettled(ctx context.Context, a *e2e.Agent, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		s, err := a.Client().Status(ctx)
		if err == nil && s.EndpointsOnClsBPF == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent's endpoints not moved to TCX after %s: %+v (%v)", timeout, s, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// setUpNode starts what the plugin needs on node i and loads its CNI configuration. subnet
// is the node's container range: a static pool for vnetbpf (its addresses are IP
// configurations of the node's NIC), host-local's range for ptp and bridge.
func (c *Cluster) setUpNode(i int, dir string, subnet netip.Prefix, opts Options) error {
	node := c.Nodes[i]
	var conflist string
	binDirs := []string{opts.PluginsDir}
	switch c.Mode {
	case VNetBPF:
		pool := netip.PrefixFrom(subnet.Addr(), 28)
		for ip := pool.Addr().Next(); pool.Contains(ip.Next()); ip = ip.Next() {
			if err := c.Fabric.AddIPConfig(node, ip); err != nil {
				return err
			}
		}
		cfg := e2e.NewAgentConfig(node, dir, []string{pool.String()})
		root, err := opts.Reg.NewBPFRoot("vnetbpf-bench-agent")
		if err != nil {
			return err
		}
		cfg.BPFRoot = root
		cfg.LogLevel = "info"
		cfg.IPAM.Cooldown.Duration = 0
		a, err := e2e.StartAgent(node, dir, cfg)
		if a != nil {
			c.Agents[i] = a
			opts.Reg.TrackPID(a.PID())
		}
		if err != nil {
			return err
		}
		bin, err := e2e.Binaries()
		if err != nil {
			return err
		}
		binDirs = append([]string{bin}, binDirs...)
		conflist = fmt.Sprintf(`{"cniVersion":"1.1.0","name":"vnet","plugins":[{"type":"vnetbpf","agentSocket":%q}]}`, cfg.Socket)
	case PTP:
		conflist = fmt.Sprintf(`{"cniVersion":"1.1.0","name":"ptp","plugins":[{"type":"ptp","ipMasq":false,"mtu":1500,
			"ipam":{"type":"host-local","ranges":[[{"subnet":%q}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":%q}}]}`, subnet, filepath.Join(dir, "host-local"))
	case Bridge:
		conflist = fmt.Sprintf(`{"cniVersion":"1.1.0","name":"bridge","plugins":[{"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,"mtu":1500,
			"ipam":{"type":"host-local","ranges":[[{"subnet":%q}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":%q}}]}`, subnet, filepath.Join(dir, "host-local"))
	default:
		return fmt.Errorf("mode %s has no CNI plugin", c.Mode)
	}
	cni, err := e2e.NewCNI(node, []byte(conflist), filepath.Join(dir, "cni-cache"), binDirs...)
	if err != nil {
		return err
	}
	c.CNI[i] = cni
	return nil
}

// AddContainer creates a namespace and runs CNI ADD for it on node i. For ptp and bridge it
// then makes the address routable to the node, as Azure does for an IP configuration of the
// NIC; vnetbpf's static pool is routable already.
func (c *Cluster) AddContainer(ctx context.Context, i int, id string) (Endpoint, error) {
	n, err := c.reg.NewNS()
	if err != nil {
		return Endpoint{}, err
	}
	rt := e2e.Runtime(id, n.Path(), "eth0", "bench", id)
	res, err := c.CNI[i].Add(ctx, rt)
	if err != nil {
		return Endpoint{}, fmt.Errorf("CNI ADD: %w", err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return Endpoint{}, err
	}
	if len(r.IPs) != 1 {
		return Endpoint{}, fmt.Errorf("CNI result has %d addresses, want 1", len(r.IPs))
	}
	ip, _ := netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
	if c.Mode != VNetBPF {
		if err := c.Fabric.AddIPConfig(c.Nodes[i], ip); err != nil {
			return Endpoint{}, err
		}
	}
	return Endpoint{Name: id, NS: n, IP: ip}, nil
}

// Close stops the agents and removes the fabric and nodes; the registry removes the rest.
func (c *Cluster) Close() error {
	var errs []error
	for _, a := range c.Agents {
		if a != nil {
			a.Stop()
			c.reg.ForgetPID(a.PID())
		}
	}
	if c.Fabric != nil {
		errs = append(errs, c.Fabric.Close())
	}
	return errors.Join(errs...)
}

// directPair is two namespaces joined by one veth pair, 192.168.250.1 and .2.
func directPair(reg *resources.Registry) (Endpoint, Endpoint, error) {
	a, err := reg.NewNS()
	if err != nil {
		return Endpoint{}, Endpoint{}, err
	}
	b, err := reg.NewNS()
	if err != nil {
		return Endpoint{}, Endpoint{}, err
	}
	ipA, ipB := netip.MustParseAddr("192.168.250.1"), netip.MustParseAddr("192.168.250.2")
	err = a.Do(func(ns.NetNS) error {
		la := netlink.NewLinkAttrs()
		la.Name = "eth0"
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(b.Fd()))}); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		return configure(ipA)
	})
	if err != nil {
		return Endpoint{}, Endpoint{}, err
	}
	if err := b.Do(func(ns.NetNS) error { return configure(ipB) }); err != nil {
		return Endpoint{}, Endpoint{}, err
	}
	return Endpoint{Name: "direct-a", NS: a, IP: ipA}, Endpoint{Name: "direct-b", NS: b, IP: ipB}, nil
}

func configure(ip netip.Addr) error {
	for _, dev := range []string{"lo", "eth0"} {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
	}
	l, _ := netlink.LinkByName("eth0")
	return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(24, 32)}})
}

// bareNodes is a fabric with two nodes and nothing on them.
func bareNodes(reg *resources.Registry) (*e2e.Fabric, Endpoint, Endpoint, error) {
	f, err := e2e.NewFabric(vnetPrefix)
	if err != nil {
		return nil, Endpoint{}, Endpoint{}, err
	}
	reg.TrackNS(f.NS)
	var eps [2]Endpoint
	for i := range 2 {
		mac, _ := net.ParseMAC(fmt.Sprintf("02:00:0a:00:00:%02x", 4+i))
		ip := netip.AddrFrom4([4]byte{10, 0, 0, byte(4 + i)})
		n, err := f.AddNode(fmt.Sprintf("node%d", i+1), mac, ip)
		if err != nil {
			return f, Endpoint{}, Endpoint{}, err
		}
		reg.TrackNS(n.NS)
		eps[i] = Endpoint{Name: fmt.Sprintf("bare-node%d", i+1), NS: n.NS, IP: ip}
	}
	return f, eps[0], eps[1], nil
}
