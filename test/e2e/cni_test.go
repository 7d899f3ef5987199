package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/agent"
	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// cluster is a fabric, one node with a real agent on a static pool, and libcni set up to run
// the vnetbpf plugin in that node.
type cluster struct {
	t      *testing.T
	fabric *Fabric
	node   *Node
	agent  *Agent
	dir    string
	bin    string
	pool   netip.Prefix
}

func newCluster(t *testing.T, pool string) *cluster {
	return newClusterWith(t, pool, func(*agent.Config) {})
}

// newClusterWith is newCluster with the agent's configuration adjusted by configure before the
// agent starts (a cooldown, a metrics address).
func newClusterWith(t *testing.T, pool string, configure func(*agent.Config)) *cluster {
	testutils.RequireRoot(t)
	bin, err := Binaries()
	if err != nil {
		t.Fatal(err)
	}
	f, node := newFabricNode(t)
	c := &cluster{t: t, fabric: f, node: node, dir: t.TempDir(), bin: bin, pool: netip.MustParsePrefix(pool)}
	// A static pool is what the 2017 write-up set up by hand: IP configurations that already
	// exist on the NIC, so the fabric routes them to this node.
	for ip := c.pool.Addr().Next(); c.pool.Contains(ip.Next()); ip = ip.Next() {
		must(t, f.AddIPConfig(node, ip))
	}
	cfg := NewAgentConfig(node, c.dir, []string{pool})
	cfg.IPAM.Cooldown.Duration = 0
	configure(&cfg)
	a, err := StartAgent(node, c.dir, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Cleanup)
	c.agent = a
	return c
}

// newFabricNode is the VNet 10.0.0.0/16 with one node, node1 at 10.0.0.4, removed when t ends.
func newFabricNode(t *testing.T) (*Fabric, *Node) {
	f, err := NewFabric(netip.MustParsePrefix("10.0.0.0/16"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	node, err := f.AddNode("node1", mac("02:00:0a:00:00:04"), netip.MustParseAddr("10.0.0.4"))
	if err != nil {
		t.Fatal(err)
	}
	return f, node
}

func (c *cluster) conflist(cniVersion string, chained ...string) []byte {
	plugins := fmt.Sprintf(`{"type":"vnetbpf","agentSocket":%q,"logFile":%q,"logLevel":"debug"}`,
		c.agent.Config.Socket, filepath.Join(c.dir, "cni.log"))
	for _, p := range chained {
		plugins += "," + p
	}
	return []byte(fmt.Sprintf(`{"cniVersion":%q,"name":"vnet","plugins":[%s]}`, cniVersion, plugins))
}

func (c *cluster) cni(cniVersion string, binDirs ...string) *CNI {
	cni, err := NewCNI(c.node, c.conflist(cniVersion), filepath.Join(c.dir, "cni-cache"), append([]string{c.bin}, binDirs...)...)
	if err != nil {
		c.t.Fatal(err)
	}
	return cni
}

// container is a container namespace added through CNI.
type container struct {
	id string
	ns ns.NetNS
	rt *libcni.RuntimeConf
	ip netip.Addr
}

func (c *cluster) newNetns() ns.NetNS {
	return testutils.NewNS(c.t)
}

func (c *cluster) add(cni *CNI, id string) (*container, error) {
	n := c.newNetns()
	ctr := &container{id: id, ns: n, rt: Runtime(id, n.Path(), "eth0", "default", "pod-"+id)}
	res, err := cni.Add(context.Background(), ctr.rt)
	if err != nil {
		return ctr, err
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return ctr, err
	}
	if len(r.IPs) != 1 {
		return ctr, fmt.Errorf("result has %d IPs, want 1", len(r.IPs))
	}
	ctr.ip, _ = netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
	return ctr, nil
}

func (c *cluster) mustAdd(cni *CNI, id string) *container {
	c.t.Helper()
	ctr, err := c.add(cni, id)
	if err != nil {
		c.t.Fatalf("ADD %s: %v\nagent log:\n%s", id, err, c.agent.Tail(20))
	}
	return ctr
}

func (c *cluster) maps() *maps.Maps {
	m, err := maps.Open(c.agent.Config.BPFRoot)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { m.Close() })
	return m
}

func hostVethExists(t *testing.T, node *Node, name string) bool {
	var exists bool
	testutils.Do(t, node.NS, func() error {
		_, err := netlink.LinkByName(name)
		exists = err == nil
		return nil
	})
	return exists
}

// TestAgentNextHops: the agent gives each VNet prefix the next hop the node's routes give it,
// so that from_container skips the FIB: the node's /16 is on the NIC's link, a prefix behind
// the default route goes through its gateway. Containers reach both through those entries.
func TestAgentNextHops(t *testing.T) {
	beyond := netip.MustParsePrefix("10.9.0.0/16") // another VNet prefix, routed by the gateway
	far := netip.MustParseAddr("10.9.0.1")
	c := newClusterWith(t, "10.0.1.0/29", func(cfg *agent.Config) {
		cfg.VNetCIDRs = append(cfg.VNetCIDRs, beyond.String())
	})
	// The fabric answers for far itself, as a VM in a peered VNet would.
	testutils.Do(t, c.fabric.NS, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: far.AsSlice(), Mask: net.CIDRMask(32, 32)}})
	})
	got, err := c.maps().ListVNetCIDRs()
	must(t, err)
	for _, want := range []maps.VNetCIDR{
		{Prefix: c.fabric.Prefix, OnLink: true},
		{Prefix: beyond, Via: c.fabric.Gateway},
		{Prefix: netip.PrefixFrom(c.node.Primary, 32), Host: true},
		{Prefix: netip.MustParsePrefix("10.0.255.255/32"), Host: true}, // the subnet's broadcast
	} {
		if !slices.Contains(got, want) {
			t.Errorf("vnet_cidrs %+v: want %+v among them", got, want)
		}
	}
	a := c.mustAdd(c.cni("1.1.0"), "a")
	toVNet := func() uint64 {
		s, err := c.maps().ReadStats()
		must(t, err)
		return s[loader.DatapathStatReasonFWD_TO_VNET].Packets
	}
	before := toVNet()
	expectPing(t, "a -> fabric gateway (on link)", a.ns, c.fabric.Gateway)
	expectPing(t, "a -> a VM behind the gateway", a.ns, far)
	if n := toVNet() - before; n < 2 {
		t.Errorf("FWD_TO_VNET moved by %d, want the pings' requests counted", n)
	}

	// With a policy rule the main table no longer says how a packet is routed: after a
	// restart no prefix has a next hop, and the FIB path still carries the packets.
	rule := netlink.NewRule()
	rule.Priority, rule.Table = 100, 100
	testutils.Do(t, c.node.NS, func() error { return netlink.RuleAdd(rule) })
	must(t, c.agent.Stop())
	must(t, c.agent.Start())
	got, err = c.maps().ListVNetCIDRs()
	must(t, err)
	for _, e := range got {
		if e.OnLink || e.Via.IsValid() {
			t.Errorf("with a policy rule, vnet_cidrs has %+v: want no next hop", e)
		}
	}
	expectPing(t, "a -> a VM behind the gateway, through the FIB", a.ns, far)
}

// TestEndpointsSettleToTCX: in attachMode auto an ADD leaves the veth on a cls_bpf filter
// (fast to attach), and the agent moves it to TCX (cheaper per packet) once no CNI request
// runs; a DEL's TCX link is closed once the plugin has deleted the veth. Forwarding holds
// throughout.
func TestEndpointsSettleToTCX(t *testing.T) {
	c := newCluster(t, "10.0.1.0/29")
	cni := c.cni("1.1.0")
	a, b := c.mustAdd(cni, "a"), c.mustAdd(cni, "b")
	expectPing(t, "a -> b right after the ADDs", a.ns, b.ip)
	testutils.Eventually(t, 10*time.Second, "every endpoint on TCX", func() error {
		s, err := c.agent.Client().Status(t.Context())
		if err != nil {
			return err
		}
		if s.EndpointAttachMode != "auto" || s.EndpointsOnClsBPF != 0 {
			return fmt.Errorf("endpoint attach mode %s, %d endpoints on cls_bpf", s.EndpointAttachMode, s.EndpointsOnClsBPF)
		}
		return nil
	})
	for _, ctr := range []*container{a, b} {
		veth := api.HostVethName(api.Key{ContainerID: ctr.id, IfName: "eth0"})
		tcx, tc := progIDs(t, c.node, veth)
		if tcx == 0 || tc != 0 {
			t.Errorf("%s: TCX program %d, cls_bpf program %d; want TCX only", veth, tcx, tc)
		}
		if q := qdiscs(t, c.node, veth); slices.Contains(q, "clsact") {
			t.Errorf("%s keeps an empty clsact qdisc: %v", veth, q)
		}
	}
	expectPing(t, "a -> b on TCX", a.ns, b.ip)
	expectPing(t, "fabric -> a on TCX", c.fabric.NS, a.ip)

	// A restart swaps the program on the TCX links in place and leaves nothing to settle.
	must(t, c.agent.Stop())
	must(t, c.agent.Start())
	if s, err := c.agent.Client().Status(t.Context()); err != nil || s.EndpointsOnClsBPF != 0 {
		t.Errorf("after a restart: %+v (%v), want no endpoint back on cls_bpf", s, err)
	}

	must(t, cni.Del(t.Context(), a.rt))
	pin := filepath.Join(c.agent.Config.BPFRoot, "links", api.HostVethName(api.Key{ContainerID: a.id, IfName: "eth0"}))
	testutils.Eventually(t, 5*time.Second, "the deleted endpoint's link pin to go", func() error {
		if _, err := os.Stat(pin); err == nil {
			return fmt.Errorf("%s still pinned", pin)
		}
		return nil
	})
	expectPing(t, "fabric -> b after a's DEL", c.fabric.NS, b.ip)
}

// TestCNILifecycle runs ADD, CHECK and DEL through libcni for every supported spec version
// against a real agent, with traffic between the containers, the fabric and the node.
func TestCNILifecycle(t *testing.T) {
	c := newCluster(t, "10.0.1.0/28")
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			cni := c.cni(v)
			a := c.mustAdd(cni, "a-"+v)
			b := c.mustAdd(cni, "b-"+v)
			if a.ip == b.ip || !c.pool.Contains(a.ip) || !c.pool.Contains(b.ip) {
				t.Fatalf("addresses %s and %s: want two distinct ones from %s", a.ip, b.ip, c.pool)
			}
			expectPing(t, "a -> b", a.ns, b.ip)
			expectPing(t, "b -> fabric gateway", b.ns, c.fabric.Gateway)
			expectPing(t, "fabric -> a", c.fabric.NS, a.ip)
			expectPing(t, "node -> a", c.node.NS, a.ip)
			if err := TCPExchange(b.ns, a.ns, b.ip, 8080, 5*time.Second); err != nil {
				t.Errorf("tcp a -> b: %v", err)
			}

			m := c.maps()
			ep, err := m.Endpoint(a.ip)
			if err != nil {
				t.Fatalf("endpoint %s not in the pinned map: %v", a.ip, err)
			}
			eps, err := c.agent.Client().Endpoints(context.Background())
			must(t, err)
			var got *api.Endpoint
			for i := range eps {
				if eps[i].ContainerID == a.id {
					got = &eps[i]
				}
			}
			if got == nil || got.IP != a.ip || got.PodName != "pod-"+a.id || got.PodNamespace != "default" ||
				uint32(got.HostIfIndex) != ep.Ifindex || got.TxPackets == 0 {
				b, _ := json.Marshal(got) // %+v would print only the embedded Key's String()
				t.Errorf("agent endpoint %s does not match container %s (%s) and map entry %+v", b, a.id, a.ip, ep)
			}

			if v != "0.3.1" { // CHECK came with 0.4.0
				for _, ctr := range []*container{a, b} {
					if err := cni.Check(context.Background(), ctr.rt); err != nil {
						t.Errorf("CHECK %s: %v", ctr.id, err)
					}
				}
			}
			for _, ctr := range []*container{a, b} {
				if err := cni.Del(context.Background(), ctr.rt); err != nil {
					t.Fatalf("DEL %s: %v", ctr.id, err)
				}
				if err := cni.Del(context.Background(), ctr.rt); err != nil {
					t.Errorf("second DEL %s: %v", ctr.id, err)
				}
				if _, err := m.Endpoint(ctr.ip); err == nil {
					t.Errorf("endpoint %s still in the map after DEL", ctr.ip)
				}
			}
			if hostVethExists(t, c.node, got.HostIfName) {
				t.Errorf("host veth %s still exists after DEL", got.HostIfName)
			}
			p, err := c.agent.Client().Pool(context.Background())
			must(t, err)
			if p.Used != 0 {
				t.Errorf("pool has %d addresses in use after DEL, want 0", p.Used)
			}
		})
	}
}

// TestCNIConcurrentAdds adds 50 containers at once: 50 distinct addresses, all forwarding.
func TestCNIConcurrentAdds(t *testing.T) {
	c := newCluster(t, "10.0.1.0/26")
	cni := c.cni("1.1.0")
	const n = 50
	ctrs := make([]*container, n)
	nss := make([]ns.NetNS, n)
	for i := range nss {
		nss[i] = c.newNetns()
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			id := fmt.Sprintf("conc-%02d", i)
			ctr := &container{id: id, ns: nss[i], rt: Runtime(id, nss[i].Path(), "eth0", "default", id)}
			res, err := cni.Add(context.Background(), ctr.rt)
			if err == nil {
				var r *current.Result
				if r, err = current.NewResultFromResult(res); err == nil {
					ctr.ip, _ = netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
				}
			}
			ctrs[i], errs[i] = ctr, err
		}(i)
	}
	wg.Wait()
	seen := make(map[netip.Addr]string)
	for i, ctr := range ctrs {
		if errs[i] != nil {
			t.Fatalf("ADD %s: %v", ctr.id, errs[i])
		}
		if other, dup := seen[ctr.ip]; dup {
			t.Fatalf("%s and %s both got %s", other, ctr.id, ctr.ip)
		}
		seen[ctr.ip] = ctr.id
	}
	for _, ctr := range ctrs {
		if got, err := Ping(c.fabric.NS, ctr.ip, 1, 0, time.Second); err != nil || got != 1 {
			t.Errorf("fabric -> %s (%s): %d replies, %v", ctr.id, ctr.ip, got, err)
		}
	}
	expectPing(t, "first -> last container", ctrs[0].ns, ctrs[n-1].ip)
}

// TestCNIAgentRestart kills the agent with SIGKILL while one container pings another: the
// datapath keeps forwarding, and after a restart DEL and new ADDs work.
func TestCNIAgentRestart(t *testing.T) {
	c := newCluster(t, "10.0.1.0/28")
	cni := c.cni("1.1.0")
	a := c.mustAdd(cni, "a")
	b := c.mustAdd(cni, "b")

	var got int
	var perr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		got, perr = Ping(a.ns, b.ip, 1000, time.Millisecond, time.Second)
	}()
	time.Sleep(300 * time.Millisecond)
	must(t, c.agent.Kill())
	_, err := c.add(cni, "while-down")
	var cniErr *types.Error
	if !errors.As(err, &cniErr) || cniErr.Code != api.CodeTryAgainLater {
		t.Errorf("ADD with the agent down: %v, want CNI error code 11", err)
	}
	must(t, c.agent.Start())
	<-done
	must(t, perr)
	if got != 1000 {
		t.Errorf("%d of 1000 pings answered across the agent's SIGKILL and restart", got)
	}

	if err := cni.Del(context.Background(), a.rt); err != nil {
		t.Errorf("DEL after restart: %v", err)
	}
	d := c.mustAdd(cni, "d")
	expectPing(t, "new container -> b", d.ns, b.ip)
}

// TestCNISecondAdd: a second ADD for an attachment in use fails and leaves the first intact.
func TestCNISecondAdd(t *testing.T) {
	c := newCluster(t, "10.0.1.0/28")
	cni := c.cni("1.1.0")
	a := c.mustAdd(cni, "a")
	b := c.mustAdd(cni, "b")
	again := &container{id: a.id, ns: c.newNetns()}
	again.rt = Runtime(a.id, again.ns.Path(), "eth0", "default", "pod-a")
	if _, err := cni.Add(context.Background(), again.rt); err == nil {
		t.Fatal("second ADD for the same container and interface succeeded")
	}
	expectPing(t, "a -> b after the refused ADD", a.ns, b.ip)
	if err := cni.Check(context.Background(), a.rt); err != nil {
		t.Errorf("CHECK of the first attachment: %v", err)
	}
}

// TestCNIStatusAndGC: STATUS says 50 when the pool is empty; GC frees what the runtime forgot.
func TestCNIStatusAndGC(t *testing.T) {
	c := newCluster(t, "10.0.1.0/30") // two usable addresses
	cni := c.cni("1.1.0")
	if err := cni.Status(context.Background()); err != nil {
		t.Fatalf("STATUS with free addresses: %v", err)
	}
	a := c.mustAdd(cni, "a")
	c.mustAdd(cni, "b")
	var cniErr *types.Error
	if err := cni.Status(context.Background()); !errors.As(err, &cniErr) || cniErr.Code != api.CodeNotAvailable {
		t.Errorf("STATUS with the pool used up: %v, want code 50", err)
	}
	if _, err := c.add(cni, "c"); !errors.As(err, &cniErr) || cniErr.Code != api.CodeTryAgainLater {
		t.Errorf("ADD with the pool used up: %v, want code 11", err)
	}
	must(t, cni.GC(context.Background(), []types.GCAttachment{{ContainerID: a.id, IfName: "eth0"}}))
	p, err := c.agent.Client().Pool(context.Background())
	must(t, err)
	if p.Used != 1 {
		t.Errorf("%d addresses in use after GC kept one attachment, want 1", p.Used)
	}
	if err := cni.Status(context.Background()); err != nil {
		t.Errorf("STATUS after GC freed an address: %v", err)
	}
	expectPing(t, "kept container -> gateway", a.ns, c.fabric.Gateway)
}

func TestMain(m *testing.M) {
	code := m.Run()
	if builtDir != "" {
		os.RemoveAll(builtDir)
	}
	os.Exit(code)
}
