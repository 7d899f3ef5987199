// Command demo runs vnetbpf on a simulated Azure VNet: a fabric namespace, a node with a real
// vnetbpf-agent, and four containers added through libcni with the real CNI plugin. It prints
// the endpoints, a connectivity matrix it measures, what bpftool and the agent show, and
// then removes everything. `demo -down` removes what an interrupted run left behind.
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

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	cnitestutils "github.com/containernetworking/plugins/pkg/testutils"

	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// workDir holds the demo's agent state and the list of what to remove.
const workDir = "/run/vnetbpf-demo"

// resources is what a run created, written as it goes so that -down can remove it.
type resources struct {
	Netns    []string `json:"netns"`
	AgentPID int      `json:"agentPID"`
	BPFRoot  string   `json:"bpfRoot"`
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

	step("creating the simulated VNet 10.0.0.0/16 (gateway 10.0.0.1) and node1 (eth0 10.0.0.4)")
	fabric, err := e2e.NewFabric(netip.MustParsePrefix("10.0.0.0/16"))
	if err != nil {
		return err
	}
	res.Netns = append(res.Netns, fabric.NS.Path())
	res.save()
	mac, _ := net.ParseMAC("02:00:0a:00:00:04")
	node, err := fabric.AddNode("node1", mac, netip.MustParseAddr("10.0.0.4"))
	if err != nil {
		return err
	}
	res.Netns = append(res.Netns, node.NS.Path())
	res.save()

	pool := netip.MustParsePrefix("10.0.1.0/28")
	step("giving node1's NIC the IP configurations of the static pool %s", pool)
	for ip := pool.Addr().Next(); pool.Contains(ip.Next()); ip = ip.Next() {
		if err := fabric.AddIPConfig(node, ip); err != nil {
			return err
		}
	}

	step("starting vnetbpf-agent in node1")
	cfg := e2e.NewAgentConfig(node, workDir, []string{pool.String()})
	cfg.BPFRoot = "/sys/fs/bpf/vnetbpf-demo"
	res.BPFRoot = cfg.BPFRoot
	res.save()
	agent, err := e2e.StartAgent(node, workDir, cfg)
	if err != nil {
		return err
	}
	res.AgentPID = agent.PID()
	res.save()
	step("agent ready (datapath loaded, from_vnet attached to eth0)")

	conflist := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"vnet","plugins":[{"type":"vnetbpf","agentSocket":%q}]}`, cfg.Socket)
	cni, err := e2e.NewCNI(node, []byte(conflist), filepath.Join(workDir, "cni-cache"), bin)
	if err != nil {
		return err
	}
	var ctrs []*ctr
	for i := 1; i <= 4; i++ {
		n, err := cnitestutils.NewNS()
		if err != nil {
			return err
		}
		res.Netns = append(res.Netns, n.Path())
		res.save()
		c := &ctr{name: fmt.Sprintf("c%d", i), ns: n}
		rt := e2e.Runtime("demo-"+c.name, n.Path(), "eth0", "demo", c.name)
		start := time.Now()
		r, err := cni.Add(ctx, rt)
		if err != nil {
			return fmt.Errorf("CNI ADD %s: %w", c.name, err)
		}
		cr, err := current.NewResultFromResult(r)
		if err != nil {
			return err
		}
		c.ip, _ = netip.AddrFromSlice(cr.IPs[0].Address.IP.To4())
		step("CNI ADD %s -> %s (%s)", c.name, c.ip, time.Since(start).Round(100*time.Microsecond))
		ctrs = append(ctrs, c)
		defer cni.Del(context.Background(), rt)
	}

	fmt.Println("\n== vnetbpf-agent endpoints list")
	show(exec.Command(filepath.Join(bin, "vnetbpf-agent"), "--socket", cfg.Socket, "endpoints", "list"))

	step("measuring connectivity: 3 pings per pair, node ip_forward=0, so only the eBPF programs forward")
	if err := matrix(ctx, fabric, node, ctrs); err != nil {
		return err
	}

	fmt.Println("\n== vnetbpf-agent endpoints list (packet counts after the matrix)")
	show(exec.Command(filepath.Join(bin, "vnetbpf-agent"), "--socket", cfg.Socket, "endpoints", "list"))
	fmt.Println("\n== vnetbpf-agent ipam show")
	show(exec.Command(filepath.Join(bin, "vnetbpf-agent"), "--socket", cfg.Socket, "ipam", "show"))
	fmt.Printf("\n== bpftool map dump pinned %s/endpoints (first entry)\n", cfg.BPFRoot)
	if _, err := exec.LookPath("bpftool"); err == nil {
		out, _ := exec.Command("bpftool", "map", "dump", "pinned", cfg.BPFRoot+"/endpoints").CombinedOutput()
		fmt.Println(firstEntry(string(out)))
		fmt.Printf("\n== bpftool map dump pinned %s/stats (summed per reason by the agent's /metrics)\n", cfg.BPFRoot)
		out, _ = exec.Command("bpftool", "map", "dump", "pinned", cfg.BPFRoot+"/stats").CombinedOutput()
		fmt.Println(firstEntry(string(out)))
	} else {
		fmt.Println("(bpftool is not installed: apt-get install bpftool)")
	}
	fmt.Println()
	return nil
}

// matrix pings every destination from every source and prints what it measured.
func matrix(ctx context.Context, fabric *e2e.Fabric, node *e2e.Node, ctrs []*ctr) error {
	type end struct {
		name string
		ns   ns.NetNS
		ip   netip.Addr
	}
	var srcs, dsts []end
	for _, c := range ctrs {
		srcs = append(srcs, end{c.name + " " + c.ip.String(), c.ns, c.ip})
	}
	srcs = append(srcs, end{"node1 " + node.Primary.String(), node.NS, node.Primary}, end{"fabric " + fabric.Gateway.String(), fabric.NS, fabric.Gateway})
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
	fmt.Println("\nevery pair answered: container<->container (redirect_peer), container<->fabric (fib + redirect out of eth0), node<->container (host route)")
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
	if res.AgentPID > 0 {
		if p, err := os.FindProcess(res.AgentPID); err == nil {
			p.Signal(syscall.SIGTERM)
			waitGone(res.AgentPID, 5*time.Second)
		}
	}
	// Containers first: their veths go with their namespaces.
	for i := len(res.Netns) - 1; i >= 0; i-- {
		path := res.Netns[i]
		syscall.Unmount(path, syscall.MNT_DETACH)
		os.Remove(path)
	}
	if res.BPFRoot != "" {
		os.RemoveAll(res.BPFRoot)
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
