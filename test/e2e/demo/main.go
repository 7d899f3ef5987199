// Command demo runs vnetbpf on a simulated Azure: a VNet fabric namespace, a fake ARM and
// IMDS, two nodes each with a real vnetbpf-agent on the azure provider, and six containers
// added through libcni with the real CNI plugin. The pools start with only the primary
// address and grow through ARM; the demo prints that growth, a connectivity matrix it
// measures, what the agent and bpftool show, and the pools shrinking back, then removes
// everything. `demo -down` removes what an interrupted run left behind.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	cnitestutils "github.com/containernetworking/plugins/pkg/testutils"

	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// workDir holds the demo's agent state and the list of what to remove.
const workDir = "/run/vnetbpf-demo"

// resources is what a run created, written as it goes so that -down can remove it.
type resources struct {
	Netns     []string `json:"netns"`
	AgentPIDs []int    `json:"agentPIDs"`
	BPFRoots  []string `json:"bpfRoots"`
}

func (r *resources) save() {
	b, _ := json.Marshal(r)
	os.WriteFile(filepath.Join(workDir, "resources.json"), b, 0o600)
}

func main() {
	down := flag.Bool("down", false, "remove what an earlier demo run left behind, and exit")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "the demo needs root (BPF, network namespaces): run 'sudo make demo'")
		os.Exit(1)
	}
	if *down {
		if err := teardown(); err != nil {
			fmt.Fprintln(os.Stderr, "demo-down:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err := run(ctx)
	step("tearing down")
	if derr := teardown(); derr != nil {
		fmt.Fprintln(os.Stderr, "teardown:", derr)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
	fmt.Println("\ndone: every namespace, veth, pin and process of the demo is gone.")
}

var started = time.Now()

func step(format string, args ...any) {
	fmt.Printf("[%5.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
}

type ctr struct {
	name string
	ns   ns.NetNS
	ip   netip.Addr
	node *demoNode
	rt   *libcni.RuntimeConf
}

func run(ctx context.Context) error {
	if err := teardown(); err != nil {
		return fmt.Errorf("remove an earlier run: %w", err)
	}
	if err := os.MkdirAll(workDir, 0o700); err != nil {
		return err
	}
	res := &resources{}

	step("building vnetbpf-agent and the vnetbpf CNI plugin")
	bin, err := e2e.Binaries()
	if err != nil {
		return err
	}
	defer os.RemoveAll(bin)

	step("creating a simulated Azure: VNet 10.0.0.0/16 (gateway 10.0.0.1), a fake ARM and a fake IMDS")
	sim, err := e2e.NewAzureSim(workDir, netip.MustParsePrefix("10.0.0.0/16"))
	if err != nil {
		return err
	}
	defer sim.ARM.Close()
	res.Netns = append(res.Netns, sim.Fabric.NS.Path())
	res.save()
	var nodes []*demoNode
	for i, name := range []string{"node1", "node2"} {
		mac, _ := net.ParseMAC(fmt.Sprintf("02:00:0a:00:00:%02x", 4+i))
		an, err := sim.AddNode(name, mac, netip.AddrFrom4([4]byte{10, 0, 0, byte(4 + i)}))
		if err != nil {
			return err
		}
		res.Netns = append(res.Netns, an.NS.Path())
		res.save()
		nodes = append(nodes, &demoNode{AzureNode: an})
		step("%s: VM with NIC %s, primary address %s and no other IP configuration", name, an.NICName, an.Primary)
	}

	for _, n := range nodes {
		dir := filepath.Join(workDir, n.Name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		cfg := sim.AgentConfig(n.AzureNode, dir)
		cfg.BPFRoot = "/sys/fs/bpf/vnetbpf-demo-" + n.Name
		cfg.IPAM.Cooldown.Duration = 2 * time.Second
		res.BPFRoots = append(res.BPFRoots, cfg.BPFRoot)
		res.save()
		a, err := e2e.StartAgent(n.Node, dir, cfg)
		if err != nil {
			return err
		}
		n.agent = a
		res.AgentPIDs = append(res.AgentPIDs, a.PID())
		res.save()
		conflist := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"vnet","plugins":[{"type":"vnetbpf","agentSocket":%q}]}`, cfg.Socket)
		if n.cni, err = e2e.NewCNI(n.Node, []byte(conflist), filepath.Join(dir, "cni-cache"), bin); err != nil {
			return err
		}
		step("%s: vnetbpf-agent ready (ipam.provider azure: minFree %d, batch %d, maxFree %d)", n.Name,
			cfg.IPAM.Azure.MinFree, cfg.IPAM.Azure.Batch, cfg.IPAM.Azure.MaxFree)
	}
	if err := waitPools(ctx, sim, nodes, "the agents warm their pools through ARM", func(secondaries int) bool { return secondaries >= 2 }); err != nil {
		return err
	}

	var ctrs []*ctr
	for i := 1; i <= 6; i++ {
		n := nodes[(i-1)/3]
		netns, err := cnitestutils.NewNS()
		if err != nil {
			return err
		}
		res.Netns = append(res.Netns, netns.Path())
		res.save()
		c := &ctr{name: fmt.Sprintf("c%d", i), ns: netns, node: n}
		rt := e2e.Runtime("demo-"+c.name, netns.Path(), "eth0", "demo", c.name)
		start := time.Now()
		r, err := n.cni.Add(ctx, rt)
		if err != nil {
			return fmt.Errorf("CNI ADD %s on %s: %w", c.name, n.Name, err)
		}
		cr, err := current.NewResultFromResult(r)
		if err != nil {
			return err
		}
		c.ip, _ = netip.AddrFromSlice(cr.IPs[0].Address.IP.To4())
		step("CNI ADD %s on %s -> %s (%s); %s's NIC now has %d IP configurations", c.name, n.Name, c.ip,
			time.Since(start).Round(time.Millisecond), n.Name, nicConfigs(sim, n))
		ctrs = append(ctrs, c)
		c.rt = rt
	}

	fmt.Println("\n== vnetbpf-agent ipam show (node1)")
	show(exec.Command(filepath.Join(bin, "vnetbpf-agent"), "--socket", nodes[0].agent.Config.Socket, "ipam", "show"))

	step("measuring connectivity: 3 pings per pair; nodes run with ip_forward=0, so only the eBPF programs forward")
	if err := matrix(ctx, sim.Fabric, nodes, ctrs); err != nil {
		return err
	}

	fmt.Println("\n== vnetbpf-agent endpoints list (node1, packet counts after the matrix)")
	show(exec.Command(filepath.Join(bin, "vnetbpf-agent"), "--socket", nodes[0].agent.Config.Socket, "endpoints", "list"))
	root := nodes[0].agent.Config.BPFRoot
	fmt.Printf("\n== bpftool map dump pinned %s/endpoints (first entry)\n", root)
	if _, err := exec.LookPath("bpftool"); err == nil {
		out, _ := exec.Command("bpftool", "map", "dump", "pinned", root+"/endpoints").CombinedOutput()
		fmt.Println(firstEntry(string(out)))
	} else {
		fmt.Println("(bpftool is not installed: apt-get install bpftool)")
	}
	fmt.Println()

	for _, c := range ctrs {
		if err := c.node.cni.Del(ctx, c.rt); err != nil {
			return fmt.Errorf("CNI DEL %s: %w", c.name, err)
		}
	}
	step("CNI DEL of all six containers; their addresses cool down for 2 s, then the pools give the surplus back")
	return waitPools(ctx, sim, nodes, "the pools shrink back to maxFree", func(secondaries int) bool { return secondaries <= 4 })
}

type demoNode struct {
	*e2e.AzureNode
	agent *e2e.Agent
	cni   *e2e.CNI
}

func nicConfigs(sim *e2e.AzureSim, n *demoNode) int {
	st, _ := sim.ARM.NIC(e2e.SimSubscription, e2e.SimResourceGroup, n.NICName)
	return len(st.IPConfigurations)
}

// waitPools shows each NIC's IP configurations, as ARM has them, until ok holds for every
// node's secondary count.
func waitPools(ctx context.Context, sim *e2e.AzureSim, nodes []*demoNode, what string, ok func(secondaries int) bool) error {
	deadline := time.Now().Add(60 * time.Second)
	last := ""
	for {
		var parts []string
		done := true
		for _, n := range nodes {
			c := nicConfigs(sim, n)
			p, err := n.agent.Client().Pool(ctx)
			if err != nil {
				return err
			}
			parts = append(parts, fmt.Sprintf("%s: %d IP configurations, pool %d free/%d used/%d cooling", n.Name, c, p.Free, p.Used, p.Cooling))
			done = done && ok(c-1)
		}
		if line := strings.Join(parts, "; "); line != last {
			step("%s: %s", what, line)
			last = line
		}
		if done {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out: %s", what)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// matrix pings every destination from every source and prints what it measured.
func matrix(ctx context.Context, fabric *e2e.Fabric, nodes []*demoNode, ctrs []*ctr) error {
	type end struct {
		name string
		ns   ns.NetNS
		ip   netip.Addr
	}
	var srcs, dsts []end
	for _, c := range ctrs {
		srcs = append(srcs, end{c.name + " " + c.ip.String() + " (" + c.node.Name + ")", c.ns, c.ip})
	}
	for _, n := range nodes {
		srcs = append(srcs, end{n.Name + " " + n.Primary.String(), n.NS, n.Primary})
	}
	srcs = append(srcs, end{"fabric " + fabric.Gateway.String(), fabric.NS, fabric.Gateway})
	dsts = srcs
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprint(w, "\nfrom \\ to")
	for _, d := range dsts {
		fmt.Fprintf(w, "\t%s", strings.Fields(d.name)[0])
	}
	fmt.Fprintln(w)
	failed := 0
	for _, s := range srcs {
		fmt.Fprint(w, s.name)
		for _, d := range dsts {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if s.ip == d.ip {
				fmt.Fprint(w, "\t-")
				continue
			}
			got, err := e2e.Ping(s.ns, d.ip, 3, 10*time.Millisecond, time.Second)
			cell := fmt.Sprintf("%d/3", got)
			if err != nil || got != 3 {
				cell += " FAIL"
				failed++
			}
			fmt.Fprintf(w, "\t%s", cell)
		}
		fmt.Fprintln(w)
	}
	w.Flush()
	if failed > 0 {
		return fmt.Errorf("%d pairs did not connect", failed)
	}
	fmt.Println("\nevery pair answered: containers on one node (redirect_peer), across nodes and to the fabric (out of eth0 with the NIC's MAC, then the fabric's route for the IP configuration ARM created), node<->container (host route)")
	return nil
}

func show(cmd *exec.Cmd) {
	out, err := cmd.CombinedOutput()
	fmt.Print(string(out))
	if err != nil {
		fmt.Println("error:", err)
	}
}

func firstEntry(dump string) string {
	// bpftool prints a JSON array of entries; show the first one.
	var entries []json.RawMessage
	if err := json.Unmarshal([]byte(dump), &entries); err != nil || len(entries) == 0 {
		return strings.TrimSpace(dump)
	}
	var v any
	json.Unmarshal(entries[0], &v)
	b, _ := json.Marshal(v)
	return string(b)
}

// teardown removes what resources.json lists: the agent, the namespaces (with them their
// veths) and the pins.
func teardown() error {
	b, err := os.ReadFile(filepath.Join(workDir, "resources.json"))
	if errors.Is(err, os.ErrNotExist) {
		return os.RemoveAll(workDir)
	}
	if err != nil {
		return err
	}
	var res resources
	if err := json.Unmarshal(b, &res); err != nil {
		return fmt.Errorf("%s/resources.json: %w", workDir, err)
	}
	for _, pid := range res.AgentPIDs {
		if p, err := os.FindProcess(pid); err == nil {
			p.Signal(syscall.SIGTERM)
			waitGone(pid, 5*time.Second)
		}
	}
	// Containers first: their veths go with their namespaces.
	for i := len(res.Netns) - 1; i >= 0; i-- {
		path := res.Netns[i]
		syscall.Unmount(path, syscall.MNT_DETACH)
		os.Remove(path)
	}
	for _, root := range res.BPFRoots {
		os.RemoveAll(root)
	}
	return os.RemoveAll(workDir)
}

func waitGone(pid int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(pid, 0); err != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
}
