package e2e

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf/asm"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// expectState checks that the agent, its pool and the pinned map agree on exactly the given
// containers: each holds its address, no address is held twice, nothing else is allocated.
func expectState(t *testing.T, c *cluster, live []*container) {
	t.Helper()
	ctx := context.Background()
	eps, err := c.agent.Client().Endpoints(ctx)
	must(t, err)
	pool, err := c.agent.Client().Pool(ctx)
	must(t, err)
	m := c.maps()
	inMap, err := m.ListEndpoints()
	must(t, err)

	byIP := map[netip.Addr]string{}
	for _, a := range pool.Addresses {
		if a.State != "allocated" {
			continue
		}
		if other, dup := byIP[a.IP]; dup {
			t.Errorf("%s allocated twice: %s and %s", a.IP, other, a.Owner.ContainerID)
		}
		byIP[a.IP] = a.Owner.ContainerID
	}
	want := map[string]netip.Addr{}
	for _, ctr := range live {
		want[ctr.id] = ctr.ip
		if byIP[ctr.ip] != ctr.id {
			t.Errorf("pool: %s is held by %q, want container %s", ctr.ip, byIP[ctr.ip], ctr.id)
		}
		if _, ok := inMap[ctr.ip]; !ok {
			t.Errorf("endpoints map has no entry for %s (%s)", ctr.ip, ctr.id)
		}
	}
	if pool.Used != len(live) {
		t.Errorf("pool has %d allocations, want the %d live containers' (leaked: %v)", pool.Used, len(live), leaked(byIP, want))
	}
	if len(eps) != len(live) || len(inMap) != len(live) {
		t.Errorf("%d endpoints in the agent, %d in the map; want %d", len(eps), len(inMap), len(live))
	}
	for _, ep := range eps {
		if want[ep.ContainerID] != ep.IP {
			t.Errorf("agent endpoint %s has %s, want %v", ep.ContainerID, ep.IP, want[ep.ContainerID])
		}
	}
}

func leaked(byIP map[netip.Addr]string, want map[string]netip.Addr) []string {
	var out []string
	for ip, id := range byIP {
		if want[id] != ip {
			out = append(out, id+"="+ip.String())
		}
	}
	sort.Strings(out)
	return out
}

// TestStateFileLoss: a missing, truncated or garbage state file does not stop the node. The
// agent rebuilds allocations and endpoints from the pinned map and the live veths, keeps the
// broken file aside, and hands out no address twice.
func TestStateFileLoss(t *testing.T) {
	garbage := func(path string) error { return os.WriteFile(path, []byte("\x00not a bbolt file\xff"), 0o600) }
	truncate := func(path string) error { return os.Truncate(path, 100) }
	zero := func(path string) error {
		b := make([]byte, 32768)
		return os.WriteFile(path, b, 0o600)
	}
	for _, tc := range []struct {
		name    string
		damage  map[string]func(string) error
		movedTo bool
	}{
		{"address store missing", map[string]func(string) error{"state.db": os.Remove}, false},
		{"address store truncated", map[string]func(string) error{"state.db": truncate}, true},
		{"address store zeroed", map[string]func(string) error{"state.db": zero}, true},
		{"both stores garbage", map[string]func(string) error{"state.db": garbage, "endpoints.db": garbage}, true},
		{"both stores missing", map[string]func(string) error{"state.db": os.Remove, "endpoints.db": os.Remove}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, "10.0.1.0/28")
			cni := c.cni("1.1.0")
			a, b := c.mustAdd(cni, "a"), c.mustAdd(cni, "b")
			must(t, c.agent.Kill())
			for file, damage := range tc.damage {
				must(t, damage(filepath.Join(c.agent.Config.StateDir, file)))
			}
			expectPing(t, "a -> b with the agent down and its state damaged", a.ns, b.ip)
			must(t, c.agent.Start())
			expectState(t, c, []*container{a, b})
			moved, _ := filepath.Glob(filepath.Join(c.agent.Config.StateDir, "*.broken-*"))
			if tc.movedTo && len(moved) == 0 {
				t.Errorf("the damaged file was not kept aside")
			}
			d := c.mustAdd(cni, "d")
			expectState(t, c, []*container{a, b, d})
			expectPing(t, "new container -> a", d.ns, a.ip)
			must(t, cni.Del(context.Background(), a.rt))
			expectState(t, c, []*container{b, d})
		})
	}
}

// TestBPFFSWiped: pins gone (a reboot, someone's rm -rf) while containers live: the agent
// rebuilds the maps from its store and the live veths and attaches again. What the wipe
// stops depends on how each device is attached: the NIC's TCX link goes with its pin, the
// endpoints' cls_bpf filters are not pinned and keep forwarding between containers.
func TestBPFFSWiped(t *testing.T) {
	c := newCluster(t, "10.0.1.0/28")
	cni := c.cni("1.1.0")
	a, b := c.mustAdd(cni, "a"), c.mustAdd(cni, "b")
	must(t, c.agent.Kill())
	must(t, os.RemoveAll(c.agent.Config.BPFRoot))
	// Unpinning detaches the NIC's program once the kernel frees the link, a moment later.
	testutils.Eventually(t, 5*time.Second, "the NIC's program to detach with its pin", func() error {
		if id := attachedTCX(t, c.node, c.node.NIC); id != 0 {
			return fmt.Errorf("program %d still attached", id)
		}
		return nil
	})
	veth := api.HostVethName(api.Key{ContainerID: a.id, IfName: "eth0"})
	old := attachedProg(t, c.node, veth)
	if old == 0 {
		t.Fatalf("no program on %s after the wipe: its cls_bpf filter has no pin to lose", veth)
	}
	expectNoPing(t, "fabric -> b without from_vnet", c.fabric.NS, b.ip)
	expectPing(t, "a -> b on the unpinned filters, their maps held by the programs", a.ns, b.ip)
	must(t, c.agent.Start())
	expectState(t, c, []*container{a, b})
	if now := attachedProg(t, c.node, veth); now == old || now == 0 {
		t.Errorf("program on %s is %d after the rebuild, was %d: want the new one, on the new maps", veth, now, old)
	}
	expectPing(t, "a -> b after the agent rebuilt the datapath", a.ns, b.ip)
	expectPing(t, "fabric -> b", c.fabric.NS, b.ip)
}

// TestAgentDown: with the agent stopped, running containers keep forwarding, ADD fails fast
// with code 11 naming the socket, and DEL succeeds; the address is back once the agent is.
func TestAgentDown(t *testing.T) {
	c := newCluster(t, "10.0.1.0/28")
	cni := c.cni("1.1.0")
	a, b := c.mustAdd(cni, "a"), c.mustAdd(cni, "b")
	must(t, c.agent.Stop())
	expectPing(t, "a -> b with the agent stopped", a.ns, b.ip)

	start := time.Now()
	_, err := c.add(cni, "while-down")
	var cerr *types.Error
	if !errors.As(err, &cerr) || cerr.Code != api.CodeTryAgainLater || !strings.Contains(cerr.Msg+cerr.Details, c.agent.Config.Socket) {
		t.Errorf("ADD with the agent down: %v; want code 11 naming %s", err, c.agent.Config.Socket)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("ADD with the agent down took %s to fail", d)
	}
	must(t, cni.Del(context.Background(), a.rt))
	must(t, c.agent.Start())
	expectState(t, c, []*container{b})
}

// TestNoLossAcrossRestartsAndUpgrade: a 1 ms ping between containers loses nothing while the
// agent is stopped with SIGTERM and started, killed with SIGKILL and started, and while the
// programs are replaced by changed ones.
func TestNoLossAcrossRestartsAndUpgrade(t *testing.T) {
	c := newCluster(t, "10.0.1.0/28")
	cni := c.cni("1.1.0")
	a, b := c.mustAdd(cni, "a"), c.mustAdd(cni, "b")
	for _, step := range []struct {
		name string
		do   func() error
	}{
		{"SIGTERM and start", func() error {
			if err := c.agent.Stop(); err != nil {
				return err
			}
			return c.agent.Start()
		}},
		{"SIGKILL and start", func() error {
			if err := c.agent.Kill(); err != nil {
				return err
			}
			return c.agent.Start()
		}},
		{"upgrade to a changed program", func() error {
			veth := api.HostVethName(api.Key{ContainerID: a.id, IfName: "eth0"})
			before := attachedProg(t, c.node, veth)
			if err := upgradePrograms(c); err != nil {
				return err
			}
			if after := attachedProg(t, c.node, veth); after == before || after == 0 {
				return fmt.Errorf("program on %s is %d after the upgrade, was %d: not replaced", veth, after, before)
			}
			return nil
		}},
	} {
		t.Run(step.name, func(t *testing.T) {
			var got int
			var perr error
			done := make(chan struct{})
			go func() {
				defer close(done)
				got, perr = Ping(a.ns, b.ip, 800, time.Millisecond, time.Second)
			}()
			time.Sleep(150 * time.Millisecond) // the step happens mid-stream
			if err := step.do(); err != nil {
				t.Error(err)
			}
			<-done
			must(t, perr)
			if got != 800 {
				t.Errorf("%d of 800 pings answered (lost %d)", got, 800-got)
			}
		})
	}
}

// upgradePrograms loads a changed datapath (an extra instruction at the head of each
// program) over the pinned maps and swaps it onto every attached device, as a new agent
// version does.
func upgradePrograms(c *cluster) error {
	spec, err := loader.LoadDatapath()
	if err != nil {
		return err
	}
	for _, p := range spec.Programs {
		// The new head takes over the old one's metadata: its symbol and BTF function info,
		// which the kernel wants on the first instruction.
		head := p.Instructions[0]
		nop := asm.Mov.Reg(asm.R1, asm.R1)
		nop.Metadata = head.Metadata
		p.Instructions[0].Metadata = asm.Metadata{}
		p.Instructions = append(asm.Instructions{nop}, p.Instructions...)
	}
	dp, err := loader.Load(loader.Options{Root: c.agent.Config.BPFRoot, Spec: spec})
	if err != nil {
		return err
	}
	defer dp.Close()
	return c.node.NS.Do(func(ns.NetNS) error {
		if err := dp.Attach(c.node.NIC, loader.FromVNet); err != nil {
			return err
		}
		// Every endpoint's host veth, however it is attached (a TCX link pin or a filter).
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if !strings.HasPrefix(l.Attrs().Name, api.HostVethPrefix) {
				continue
			}
			if err := dp.Attach(l.Attrs().Name, loader.FromContainer); err != nil {
				return err
			}
		}
		return nil
	})
}

// TestCrashStorm runs concurrent ADD/DEL through libcni while the agent is killed with
// SIGKILL at random moments. Afterwards nothing is allocated twice, every live container's
// address is in the store, the map and the pool alike, every removed container's address is
// free again, and every live container forwards.
func TestCrashStorm(t *testing.T) {
	c := newCluster(t, "10.0.1.0/26")
	cni := c.cni("1.1.0")
	const workers, opsWanted = 6, 300
	var ops, kills, addFailed atomic.Int64
	var mu sync.Mutex
	live := map[string]*container{}

	stop := make(chan struct{})
	killerDone := make(chan struct{})
	go func() {
		defer close(killerDone)
		rng := rand.New(rand.NewPCG(7, 11))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(150+rng.IntN(350)) * time.Millisecond):
			}
			c.agent.Kill()
			kills.Add(1)
			time.Sleep(time.Duration(rng.IntN(80)) * time.Millisecond) // down for a while
			if err := c.agent.Start(); err != nil {
				t.Errorf("restart %d: %v", kills.Load(), err)
				return
			}
		}
	}()

	del := func(ctr *container) {
		// A runtime retries DEL until it succeeds.
		for {
			if err := cni.Del(context.Background(), ctr.rt); err == nil {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			var mine []*container
			for i := 0; ops.Load() < opsWanted; i++ {
				ops.Add(1)
				if len(mine) < 2 || (len(mine) < 6 && rng.IntN(2) == 0) {
					netns := testutils.NewNS(t)
					id := fmt.Sprintf("storm-%d-%d", w, i)
					ctr := &container{id: id, ns: netns, rt: Runtime(id, netns.Path(), "eth0", "storm", id)}
					res, err := cni.Add(context.Background(), ctr.rt)
					if err == nil {
						ctr.ip, err = resultIP(res)
					}
					if err != nil {
						addFailed.Add(1)
						del(ctr) // as a runtime does after a failed ADD
						continue
					}
					mine = append(mine, ctr)
					mu.Lock()
					live[id] = ctr
					mu.Unlock()
					continue
				}
				j := rng.IntN(len(mine))
				ctr := mine[j]
				mine = append(mine[:j], mine[j+1:]...)
				del(ctr)
				mu.Lock()
				delete(live, ctr.id)
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()
	close(stop)
	<-killerDone
	must(t, c.agent.Kill())
	must(t, c.agent.Start())
	t.Logf("%d CNI operations (%d ADDs failed while the agent was down), %d SIGKILLs; %d containers live",
		ops.Load(), addFailed.Load(), kills.Load(), len(live))
	if kills.Load() < 3 {
		t.Errorf("only %d kills happened during the storm", kills.Load())
	}

	var lives []*container
	for _, ctr := range live {
		lives = append(lives, ctr)
	}
	expectState(t, c, lives)
	for _, ctr := range lives {
		if got, err := Ping(ctr.ns, c.fabric.Gateway, 1, 0, time.Second); err != nil || got != 1 {
			t.Errorf("live container %s (%s) does not forward: %d replies, %v", ctr.id, ctr.ip, got, err)
		}
	}
}

// attachedProg is the ID of the program of ours on dev's ingress in node, TCX or cls_bpf,
// 0 if none.
func attachedProg(t *testing.T, node *Node, dev string) uint32 {
	t.Helper()
	tcx, tc := progIDs(t, node, dev)
	if tcx != 0 {
		return tcx
	}
	return tc
}

// attachedTCX is the ID of the program on dev's TCX ingress in node, 0 if none.
func attachedTCX(t *testing.T, node *Node, dev string) uint32 {
	t.Helper()
	tcx, _ := progIDs(t, node, dev)
	return tcx
}
