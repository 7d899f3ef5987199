package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/test/e2e/azurefake"
)

// azureNode is a simulated VM with a real agent on the azure provider.
type azureNode struct {
	*AzureNode
	agent *Agent
	cni   *CNI
	dir   string
}

type azureCluster struct {
	t     *testing.T
	sim   *AzureSim
	nodes []*azureNode
}

func newAzureCluster(t *testing.T, n int) *azureCluster {
	testutils.RequireRoot(t)
	bin, err := Binaries()
	must(t, err)
	sim, err := NewAzureSim(t.TempDir(), netip.MustParsePrefix("10.0.0.0/16"))
	must(t, err)
	t.Cleanup(func() { sim.Close() })
	c := &azureCluster{t: t, sim: sim}
	// Every VM's NIC exists before any agent asks ARM for addresses, as on Azure: the
	// primaries are taken first.
	var vms []*AzureNode
	for i := 0; i < n; i++ {
		an, err := sim.AddNode(fmt.Sprintf("node%d", i+1), mac(fmt.Sprintf("02:00:0a:00:00:%02x", 4+i)), netip.AddrFrom4([4]byte{10, 0, 0, byte(4 + i)}))
		must(t, err)
		vms = append(vms, an)
	}
	for _, an := range vms {
		dir := t.TempDir()
		a, err := StartAgent(an.Node, dir, sim.AgentConfig(an, dir))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("%s agent log:\n%s", an.Name, a.Tail(40))
			}
			a.Cleanup()
		})
		conf := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"vnet","plugins":[{"type":"vnetbpf","agentSocket":%q}]}`, a.Config.Socket)
		cni, err := NewCNI(an.Node, []byte(conf), filepath.Join(dir, "cni-cache"), bin)
		must(t, err)
		c.nodes = append(c.nodes, &azureNode{AzureNode: an, agent: a, cni: cni, dir: dir})
	}
	return c
}

func (c *azureCluster) add(n *azureNode, id string) *container {
	c.t.Helper()
	netns := testutils.NewNS(c.t)
	ctr := &container{id: id, ns: netns, rt: Runtime(id, netns.Path(), "eth0", "default", id)}
	res, err := n.cni.Add(context.Background(), ctr.rt)
	if err != nil {
		c.t.Fatalf("ADD %s on %s: %v\nagent log:\n%s", id, n.Name, err, n.agent.Tail(15))
	}
	r, err := resultIP(res)
	must(c.t, err)
	ctr.ip = r
	return ctr
}

// nicAddresses is what ARM shows on node's NIC, primary excluded.
func (c *azureCluster) nicAddresses(n *azureNode) []netip.Addr {
	st, ok := c.sim.ARM.NIC(SimSubscription, SimResourceGroup, n.NICName)
	if !ok {
		c.t.Fatalf("ARM has no NIC %s", n.NICName)
	}
	return st.Addresses()[1:]
}

// checkPoolMatchesNIC: the agent's pool holds exactly the NIC's secondary addresses — none
// handed out that the NIC lacks, none of the agent's own configurations left without an owner.
func (c *azureCluster) checkPoolMatchesNIC(n *azureNode) error {
	p, err := n.agent.Client().Pool(context.Background())
	if err != nil {
		return err
	}
	var pool []netip.Addr
	for _, a := range p.Addresses {
		pool = append(pool, a.IP)
	}
	slices.SortFunc(pool, netip.Addr.Compare)
	nic := c.nicAddresses(n)
	slices.SortFunc(nic, netip.Addr.Compare)
	if !slices.Equal(pool, nic) {
		return fmt.Errorf("%s: pool %v, NIC %v", n.Name, pool, nic)
	}
	return nil
}

// TestAzureMultiNode: from pools of only the primary address, containers on two nodes get
// addresses the agents obtained through ARM, reach each other across the fabric, and the
// pools shrink back when they are deleted.
func TestAzureMultiNode(t *testing.T) {
	c := newAzureCluster(t, 2)
	n1, n2 := c.nodes[0], c.nodes[1]

	// The agents warm their pools by themselves: minFree 2, batch 4.
	for _, n := range c.nodes {
		testutils.Eventually(t, 20*time.Second, n.Name+"'s pool to grow through ARM", func() error {
			if got := len(c.nicAddresses(n)); got < 2 {
				return fmt.Errorf("%d secondary addresses on the NIC", got)
			}
			return c.checkPoolMatchesNIC(n)
		})
	}

	// More containers than one batch: the pools grow again while ADDs wait.
	var on1, on2 []*container
	for i := 0; i < 5; i++ {
		on1 = append(on1, c.add(n1, fmt.Sprintf("n1-c%d", i)))
		on2 = append(on2, c.add(n2, fmt.Sprintf("n2-c%d", i)))
	}
	seen := map[netip.Addr]string{}
	for _, ctr := range append(slices.Clone(on1), on2...) {
		if other, dup := seen[ctr.ip]; dup {
			t.Fatalf("%s and %s both have %s", other, ctr.id, ctr.ip)
		}
		seen[ctr.ip] = ctr.id
	}
	for _, pair := range []struct {
		n    *azureNode
		ctrs []*container
	}{{n1, on1}, {n2, on2}} {
		nic := c.nicAddresses(pair.n)
		for _, ctr := range pair.ctrs {
			if !slices.Contains(nic, ctr.ip) {
				t.Errorf("%s got %s, which ARM does not show on %s's NIC %v", ctr.id, ctr.ip, pair.n.Name, nic)
			}
		}
	}

	t.Run("connectivity", func(t *testing.T) {
		expectPing(t, "node1 container -> node1 container", on1[0].ns, on1[1].ip)
		expectPing(t, "node1 container -> node2 container", on1[0].ns, on2[0].ip)
		expectPing(t, "node2 container -> node1 container", on2[4].ns, on1[4].ip)
		expectPing(t, "node1 container -> node2", on1[2].ns, n2.Primary)
		expectPing(t, "node2 -> node1 container", n2.NS, on1[3].ip)
		expectPing(t, "node1 -> its container", n1.NS, on1[0].ip)
		for _, x := range []struct {
			what           string
			server, client *container
		}{
			{"tcp node1 container -> node2 container", on2[1], on1[1]},
			{"tcp node2 container -> node1 container", on1[2], on2[2]},
			{"tcp node1 container -> node1 container", on1[3], on1[4]},
		} {
			if err := TCPExchange(x.server.ns, x.client.ns, x.server.ip, 8080, 5*time.Second); err != nil {
				t.Errorf("%s: %v", x.what, err)
			}
		}
		if err := TCPExchange(on1[0].ns, n2.NS, on1[0].ip, 8081, 5*time.Second); err != nil {
			t.Errorf("tcp node2 -> node1 container: %v", err)
		}
		if err := TCPExchange(n1.NS, on2[3].ns, n1.Primary, 8082, 5*time.Second); err != nil {
			t.Errorf("tcp node2 container -> node1: %v", err)
		}
	})

	// Delete everything: after the 1 s cooldown the pools give back all but maxFree (4).
	for _, x := range []struct {
		n    *azureNode
		ctrs []*container
	}{{n1, on1}, {n2, on2}} {
		for _, ctr := range x.ctrs {
			must(t, x.n.cni.Del(context.Background(), ctr.rt))
		}
	}
	for _, n := range c.nodes {
		testutils.Eventually(t, 30*time.Second, n.Name+"'s pool to shrink back to maxFree", func() error {
			if got := len(c.nicAddresses(n)); got > 4 {
				return fmt.Errorf("%d secondary addresses still on the NIC", got)
			}
			return c.checkPoolMatchesNIC(n)
		})
	}
	for _, n := range c.nodes {
		if routed := c.sim.Routed(n.AzureNode); len(routed) != 1+len(c.nicAddresses(n)) {
			t.Errorf("fabric routes %d addresses to %s; ARM shows %d plus the primary", len(routed), n.Name, len(c.nicAddresses(n)))
		}
	}
}

// TestAzureFaults: an ARM outage delays an ADD but never corrupts the pool, and ADDs succeed
// once ARM is back; throttling, a failed and a half-way operation, and another writer on the
// NIC leave no address handed out that the NIC lacks and none of ours unowned.
func TestAzureFaults(t *testing.T) {
	c := newAzureCluster(t, 1)
	n := c.nodes[0]
	testutils.Eventually(t, 20*time.Second, "the warm pool", func() error {
		if got := len(c.nicAddresses(n)); got < 2 {
			return fmt.Errorf("%d secondary addresses on the NIC", got)
		}
		return c.checkPoolMatchesNIC(n)
	})

	t.Run("outage delays an ADD until ARM is back", func(t *testing.T) {
		c.sim.ARM.Outage(true)
		defer c.sim.ARM.Outage(false) // also when the subtest fails half way
		var ctrs []*container
		// Use up what is free; the next ADD must wait for growth.
		free := len(c.nicAddresses(n))
		for i := 0; i < free; i++ {
			ctrs = append(ctrs, c.add(n, fmt.Sprintf("outage-%d", i)))
		}
		var wg sync.WaitGroup
		var waited *container
		start := time.Now()
		wg.Add(1)
		go func() {
			defer wg.Done()
			waited = c.add(n, "outage-waits")
		}()
		testutils.Eventually(t, 30*time.Second, "the agent to report the outage", func() error {
			p, err := n.agent.Client().Pool(context.Background())
			if err != nil {
				return err
			}
			if p.LastError == "" {
				return fmt.Errorf("no provider error yet (free %d)", p.Free)
			}
			return nil
		})
		c.sim.ARM.Outage(false)
		wg.Wait()
		if waited == nil || !slices.Contains(c.nicAddresses(n), waited.ip) {
			t.Fatalf("the ADD that waited through the outage got %v, not an address on the NIC", waited)
		}
		t.Logf("ADD waited %s through the outage", time.Since(start).Round(100*time.Millisecond))
		expectPing(t, "container added after the outage -> gateway", waited.ns, c.sim.Fabric.Gateway)
		for _, ctr := range append(ctrs, waited) {
			must(t, n.cni.Del(context.Background(), ctr.rt))
		}
	})

	t.Run("throttling, failed operations and another writer converge", func(t *testing.T) {
		c.sim.ARM.Throttle(3, 200*time.Millisecond)
		c.sim.ARM.FailNextOperation(azurefake.FailWhole)
		c.sim.ARM.FailNextOperation(azurefake.FailHalfway)
		_, err := c.sim.ARM.AddIPConfig(SimSubscription, SimResourceGroup, n.NICName, "added-by-hand", netip.Addr{})
		must(t, err)
		var ctrs []*container
		for i := 0; i < 8; i++ {
			ctrs = append(ctrs, c.add(n, fmt.Sprintf("faults-%d", i)))
		}
		nic := c.nicAddresses(n)
		for _, ctr := range ctrs {
			if !slices.Contains(nic, ctr.ip) {
				t.Errorf("%s got %s, which is not on the NIC", ctr.id, ctr.ip)
			}
		}
		testutils.Eventually(t, 20*time.Second, "pool and NIC to agree", func() error { return c.checkPoolMatchesNIC(n) })
		st, _ := c.sim.ARM.NIC(SimSubscription, SimResourceGroup, n.NICName)
		var byHand bool
		for _, ipc := range st.IPConfigurations {
			byHand = byHand || ipc.Name == "added-by-hand"
			if !ipc.Primary && ipc.Name != "added-by-hand" && !strings.HasPrefix(ipc.Name, "vnetbpf-") {
				t.Errorf("IP configuration %s: neither ours nor the other writer's", ipc.Name)
			}
		}
		if !byHand {
			t.Error("the other writer's IP configuration was overwritten")
		}
		if got := c.sim.ARM.Count("", 429); got < 3 {
			t.Errorf("ARM answered 429 %d times, want the 3 injected", got)
		}
		for _, ctr := range ctrs {
			must(t, n.cni.Del(context.Background(), ctr.rt))
		}
	})
}

func resultIP(res types.Result) (netip.Addr, error) {
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return netip.Addr{}, err
	}
	if len(r.IPs) != 1 {
		return netip.Addr{}, fmt.Errorf("result has %d IPs, want 1", len(r.IPs))
	}
	ip, _ := netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
	return ip, nil
}
