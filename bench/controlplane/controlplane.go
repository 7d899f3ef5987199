// Package controlplane measures what a container runtime and an operator see of vnetbpf's
// control plane, against ptp with host-local IPAM through the same libcni calls: CNI ADD and
// DEL latency one by one and in concurrent batches, the agent's resident memory, how long it
// takes to become ready with endpoints to restore, and how many packets a 1 ms ping loses
// while the agent restarts or the datapath programs are replaced.
package controlplane

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/bench/stats"
	"github.com/vnetbpf/vnetbpf/bench/traffic"
	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// Config sets the sizes.
type Config struct {
	// Containers is how many containers each run adds and deletes.
	Containers int
	// Batch is how many ADDs (or DELs) run at once in the batched runs.
	Batch int
	// Restarts is how many times the agent is killed and started to time its start.
	Restarts int
	// PingCount is the pings (1 ms apart) sent across each restart or upgrade.
	PingCount int
	// Events is how many restarts and how many upgrades are done under ping.
	Events int

	Reg        *resources.Registry
	WorkDir    string
	PluginsDir string
	Progress   func(format string, args ...any)
}

// Latencies summarises one run of ADDs or DELs, in milliseconds.
type Latencies struct {
	P50          float64   `json:"p50Ms"`
	P90          float64   `json:"p90Ms"`
	P99          float64   `json:"p99Ms"`
	Max          float64   `json:"maxMs"`
	TotalSeconds float64   `json:"totalSeconds"`
	Samples      []float64 `json:"samplesMs"`
	// PluginCPUMs is the CPU time (user and system) of the plugin processes libcni ran,
	// per call: for ptp, ptp's and host-local's. The agent's is not in it.
	PluginCPUMs float64 `json:"pluginCpuMsPerCall"`
	// Busy is the share of all the machine's CPUs that was busy during the run.
	Busy float64 `json:"machineBusy"`
}

func summarize(ms []float64, total time.Duration) Latencies {
	l := Latencies{Samples: ms, TotalSeconds: total.Seconds()}
	l.P50, l.P90, l.P99 = stats.Percentile(ms, 50), stats.Percentile(ms, 90), stats.Percentile(ms, 99)
	l.Max = stats.Percentile(ms, 100)
	return l
}

// PluginResult is one plugin's CNI latencies.
type PluginResult struct {
	Plugin   string    `json:"plugin"`
	SeqAdd   Latencies `json:"sequentialAdd"`
	SeqDel   Latencies `json:"sequentialDel"`
	BatchAdd Latencies `json:"batchAdd"`
	BatchDel Latencies `json:"batchDel"`
}

// Loss is one ping run across an event.
type Loss struct {
	Event    string  `json:"event"`
	Target   string  `json:"target"`
	Sent     int     `json:"sent"`
	Received int     `json:"received"`
	Lost     int     `json:"lost"`
	EventMs  float64 `json:"eventMs"` // how long the restart or upgrade took
}

// Result is the whole control-plane measurement.
type Result struct {
	Containers int            `json:"containers"`
	Batch      int            `json:"batch"`
	Plugins    []PluginResult `json:"plugins"`
	// Agent resident memory (VmRSS) in MB (10^6 bytes): after start with no endpoint, with
	// Containers endpoints, and after a restart with them.
	RSSIdleMB      float64 `json:"rssIdleMB"`
	RSSLoadedMB    float64 `json:"rssLoadedMB"`
	RSSRestartMB   float64 `json:"rssRestartMB"`
	EndpointsAtRSS int     `json:"endpointsAtRSS"`
	// StartToReadyMs is exec to the first ready status, polled every 20 ms (e2e.Agent);
	// StartupLoggedMs is the agent's own "startup" in its ready log line.
	StartToReadyMs  []float64 `json:"startToReadyMs"`
	StartupLoggedMs []float64 `json:"startupLoggedMs"`
	Losses          []Loss    `json:"losses"`
	// AgentAPI is the agent's own time per API call during vnetbpf's ADDs one by one (its
	// request-duration histogram): what of an ADD is the agent's, the rest being the plugin
	// process.
	AgentAPI []APIRoute `json:"agentAPIDuringSequentialAdd"`
}

// APIRoute is the agent's time for one route of its API.
type APIRoute struct {
	Method string  `json:"method"`
	Route  string  `json:"route"`
	Calls  float64 `json:"calls"`
	MeanMs float64 `json:"meanMs"`
}

// env is the control plane's own simulated VNet: node cp1 runs the vnetbpf agent, node cp2
// is where ptp runs, and the container namespaces are created once and reused by every run.
type env struct {
	cfg     Config
	fabric  *e2e.Fabric
	nodes   map[string]*e2e.Node
	agent   *e2e.Agent
	cnis    map[string]*e2e.CNI
	netns   []ns.NetNS
	say     func(string, ...any)
	results map[string]*PluginResult
}

// Run measures everything and removes what it created, except what cfg.Reg holds.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	e := &env{cfg: cfg, say: cfg.Progress, nodes: map[string]*e2e.Node{}, cnis: map[string]*e2e.CNI{}, results: map[string]*PluginResult{}}
	if e.say == nil {
		e.say = func(string, ...any) {}
	}
	defer e.close()
	if err := e.build(); err != nil {
		return nil, err
	}
	res := &Result{Containers: cfg.Containers, Batch: cfg.Batch}
	var err error
	if res.RSSIdleMB, err = rssMB(e.agent.PID()); err != nil {
		return nil, err
	}

	e.say("creating %d container namespaces", cfg.Containers)
	for range cfg.Containers {
		n, err := cfg.Reg.NewNS()
		if err != nil {
			return nil, err
		}
		e.netns = append(e.netns, n)
	}

	plugins := []string{"vnetbpf", "ptp"}
	for _, p := range plugins {
		e.results[p] = &PluginResult{Plugin: p}
	}
	// Sequential, then batched; the plugins alternate so drift hits both alike.
	for _, p := range plugins {
		e.say("CNI ADD of %d containers one by one: %s", cfg.Containers, p)
		var before map[apiKey][2]float64
		if p == "vnetbpf" {
			if before, err = e.scrapeAPI(); err != nil {
				return nil, err
			}
		}
		l, err := e.run(ctx, p, "seq", true, 1)
		if err != nil {
			return nil, err
		}
		if p == "vnetbpf" {
			after, err := e.scrapeAPI()
			if err != nil {
				return nil, err
			}
			res.AgentAPI = apiDelta(before, after)
		}
		e.results[p].SeqAdd = l
		if p == "vnetbpf" {
			if err := e.agentUnderLoad(ctx, res); err != nil {
				return nil, err
			}
		}
		e.say("CNI DEL of %d containers one by one: %s", cfg.Containers, p)
		if e.results[p].SeqDel, err = e.run(ctx, p, "seq", false, 1); err != nil {
			return nil, err
		}
	}
	for _, p := range plugins {
		e.say("CNI ADD of %d containers, %d at a time: %s", cfg.Containers, cfg.Batch, p)
		l, err := e.run(ctx, p, "batch", true, cfg.Batch)
		if err != nil {
			return nil, err
		}
		e.results[p].BatchAdd = l
		e.say("CNI DEL of %d containers, %d at a time: %s", cfg.Containers, cfg.Batch, p)
		if e.results[p].BatchDel, err = e.run(ctx, p, "batch", false, cfg.Batch); err != nil {
			return nil, err
		}
	}
	for _, p := range plugins {
		res.Plugins = append(res.Plugins, *e.results[p])
	}
	return res, nil
}

func (e *env) build() error {
	e.say("control plane: a fabric with node cp1 (vnetbpf agent, static pool 10.0.16.0/23) and node cp2 (ptp + host-local 10.0.32.0/23)")
	f, err := e2e.NewFabric(netip.MustParsePrefix("10.0.0.0/16"))
	if err != nil {
		return err
	}
	e.cfg.Reg.TrackNS(f.NS)
	e.fabric = f
	for i, name := range []string{"cp1", "cp2"} {
		mac, _ := net.ParseMAC(fmt.Sprintf("02:00:0a:00:01:%02x", 4+i))
		n, err := f.AddNode(name, mac, netip.AddrFrom4([4]byte{10, 0, 0, byte(4 + i)}))
		if err != nil {
			return err
		}
		e.cfg.Reg.TrackNS(n.NS)
		e.nodes[name] = n
	}
	dir, err := e.cfg.Reg.NewDir(e.cfg.WorkDir, "controlplane")
	if err != nil {
		return err
	}
	agentDir := filepath.Join(dir, "agent")
	if err := os.MkdirAll(agentDir, 0o700); err != nil {
		return err
	}
	cfg := e2e.NewAgentConfig(e.nodes["cp1"], agentDir, []string{"10.0.16.0/23"})
	if cfg.BPFRoot, err = e.cfg.Reg.NewBPFRoot("vnetbpf-bench-cp"); err != nil {
		return err
	}
	cfg.LogLevel = "info"
	cfg.IPAM.Cooldown.Duration = 0
	cfg.MetricsAddr = metricsAddr // cp1's own loopback
	a, err := e2e.StartAgent(e.nodes["cp1"], agentDir, cfg)
	if a != nil {
		e.agent = a
		e.cfg.Reg.TrackPID(a.PID())
	}
	if err != nil {
		return err
	}
	bin, err := e2e.Binaries()
	if err != nil {
		return err
	}
	vconf := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"vnet","plugins":[{"type":"vnetbpf","agentSocket":%q}]}`, cfg.Socket)
	if e.cnis["vnetbpf"], err = e2e.NewCNI(e.nodes["cp1"], []byte(vconf), filepath.Join(dir, "cache-vnetbpf"), bin, e.cfg.PluginsDir); err != nil {
		return err
	}
	pconf := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"ptp","plugins":[{"type":"ptp","ipMasq":false,"mtu":1500,
		"ipam":{"type":"host-local","ranges":[[{"subnet":"10.0.32.0/23"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":%q}}]}`, filepath.Join(dir, "host-local"))
	if e.cnis["ptp"], err = e2e.NewCNI(e.nodes["cp2"], []byte(pconf), filepath.Join(dir, "cache-ptp"), e.cfg.PluginsDir); err != nil {
		return err
	}
	return nil
}

func (e *env) close() {
	if e.agent != nil {
		e.agent.Stop()
		e.cfg.Reg.ForgetPID(e.agent.PID())
	}
	for _, n := range e.netns {
		e.cfg.Reg.RemoveNS(n)
	}
	if e.fabric != nil {
		e.fabric.Close()
	}
}

func containerID(plugin, run string, i int) string {
	return fmt.Sprintf("bench-%s-%s-%03d", plugin, run, i)
}

// run adds (or deletes) every container through plugin, concurrency at a time, and returns
// each call's latency. It fails on the first error: a benchmark of failing calls is no
// benchmark.
func (e *env) run(ctx context.Context, plugin, run string, add bool, concurrency int) (Latencies, error) {
	cni := e.cnis[plugin]
	ms := make([]float64, len(e.netns))
	// The plugin processes are this process's children, reaped by libcni as each call ends.
	var before, after unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_CHILDREN, &before); err != nil {
		return Latencies{}, err
	}
	busyBefore, err := traffic.MachineBusy()
	if err != nil {
		return Latencies{}, err
	}
	start := time.Now()
	for first := 0; first < len(e.netns); first += concurrency {
		var wg sync.WaitGroup
		errs := make([]error, len(e.netns))
		for i := first; i < min(first+concurrency, len(e.netns)); i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := containerID(plugin, run, i)
				rt := e2e.Runtime(id, e.netns[i].Path(), "eth0", "bench", id)
				t0 := time.Now()
				if add {
					_, errs[i] = cni.Add(ctx, rt)
				} else {
					errs[i] = cni.Del(ctx, rt)
				}
				ms[i] = float64(time.Since(t0).Microseconds()) / 1000
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				what := "DEL"
				if add {
					what = "ADD"
				}
				return Latencies{}, fmt.Errorf("%s CNI %s of container %d: %w", plugin, what, i, err)
			}
		}
	}
	wall := time.Since(start)
	if err := unix.Getrusage(unix.RUSAGE_CHILDREN, &after); err != nil {
		return Latencies{}, err
	}
	busyAfter, err := traffic.MachineBusy()
	if err != nil {
		return Latencies{}, err
	}
	l := summarize(ms, wall)
	cpu := time.Duration(after.Utime.Nano() + after.Stime.Nano() - before.Utime.Nano() - before.Stime.Nano())
	l.PluginCPUMs = float64(cpu.Microseconds()) / 1000 / float64(len(e.netns))
	l.Busy = (busyAfter - busyBefore) / (wall.Seconds() * float64(runtime.NumCPU()))
	return l, nil
}

// agentUnderLoad runs with every container added through vnetbpf: the agent's memory, its
// start with that many endpoints to restore, and ping loss across restarts and upgrades.
func (e *env) agentUnderLoad(ctx context.Context, res *Result) error {
	var err error
	eps, err := e.agent.Client().Endpoints(ctx)
	if err != nil {
		return err
	}
	res.EndpointsAtRSS = len(eps)
	if res.RSSLoadedMB, err = rssMB(e.agent.PID()); err != nil {
		return err
	}
	e.say("agent: %.1f MB resident idle, %.1f MB with %d endpoints", res.RSSIdleMB, res.RSSLoadedMB, len(eps))

	for i := range e.cfg.Restarts {
		d, logged, err := e.restartAgent()
		if err != nil {
			return err
		}
		res.StartToReadyMs = append(res.StartToReadyMs, d)
		res.StartupLoggedMs = append(res.StartupLoggedMs, logged)
		e.say("agent restart %d of %d with %d endpoints to restore: ready %.0f ms after exec (its log: startup %.0f ms)", i+1, e.cfg.Restarts, len(eps), d, logged)
	}
	if res.RSSRestartMB, err = rssMB(e.agent.PID()); err != nil {
		return err
	}

	// Ping targets: container 0 to container 1 (local delivery) and container 0 to the
	// fabric's gateway (out of the NIC and back in through from_vnet).
	src, local, err := e.pingPair(ctx, eps)
	if err != nil {
		return err
	}
	targets := map[string]netip.Addr{"container on the node": local, "VNet gateway": e.fabric.Gateway}
	for i := range e.cfg.Events {
		for _, event := range []string{"agent restart (SIGKILL, start)", "program upgrade (load, re-attach)"} {
			e.say("%s %d of %d under a 1 ms ping to a local container and to the VNet", event, i+1, e.cfg.Events)
			losses, err := e.underPing(src, targets, event, func() error {
				if strings.HasPrefix(event, "agent restart") {
					_, _, err := e.restartAgent()
					return err
				}
				return e.upgrade()
			})
			if err != nil {
				return err
			}
			res.Losses = append(res.Losses, losses...)
		}
	}
	return nil
}

// pingPair finds container 0's namespace and the address of another container.
func (e *env) pingPair(ctx context.Context, eps []api.Endpoint) (ns.NetNS, netip.Addr, error) {
	byID := map[string]netip.Addr{}
	for _, ep := range eps {
		byID[ep.ContainerID] = ep.IP
	}
	ip0, ok0 := byID[containerID("vnetbpf", "seq", 0)]
	ip1, ok1 := byID[containerID("vnetbpf", "seq", 1)]
	if !ok0 || !ok1 {
		return nil, netip.Addr{}, fmt.Errorf("the agent does not list containers 0 and 1")
	}
	// The fabric must route container 0's address back to cp1, as Azure does for an IP
	// configuration of the NIC.
	if err := e.fabric.AddIPConfig(e.nodes["cp1"], ip0); err != nil {
		return nil, netip.Addr{}, err
	}
	return e.netns[0], ip1, nil
}

// underPing pings every target from src every millisecond while event runs (after 200 ms
// of pings), and counts the replies that never came.
func (e *env) underPing(src ns.NetNS, targets map[string]netip.Addr, event string, fn func() error) ([]Loss, error) {
	type result struct {
		name string
		got  int
		err  error
	}
	results := make(chan result, len(targets))
	for name, ip := range targets {
		go func() {
			got, err := e2e.Ping(src, ip, e.cfg.PingCount, time.Millisecond, 2*time.Second)
			results <- result{name, got, err}
		}()
	}
	time.Sleep(200 * time.Millisecond) // pings before the event, so the loss window is inside the run
	t0 := time.Now()
	ferr := fn()
	took := time.Since(t0)
	var out []Loss
	for range targets {
		r := <-results
		if r.err != nil {
			return nil, fmt.Errorf("ping %s: %w", r.name, r.err)
		}
		out = append(out, Loss{Event: event, Target: r.name, Sent: e.cfg.PingCount, Received: r.got, Lost: e.cfg.PingCount - r.got,
			EventMs: float64(took.Microseconds()) / 1000})
	}
	if ferr != nil {
		return nil, fmt.Errorf("%s: %w", event, ferr)
	}
	return out, nil
}

// restartAgent kills the agent as a crash would and starts it again; it returns the time from
// exec to ready and the startup the agent logged.
func (e *env) restartAgent() (float64, float64, error) {
	old := e.agent.PID()
	if err := e.agent.Kill(); err != nil {
		return 0, 0, err
	}
	e.cfg.Reg.ForgetPID(old)
	t0 := time.Now()
	err := e.agent.Start()
	d := float64(time.Since(t0).Microseconds()) / 1000
	e.cfg.Reg.TrackPID(e.agent.PID())
	if err != nil {
		return 0, 0, err
	}
	logged, err := lastStartup(e.agent.Log)
	if err != nil {
		return 0, 0, err
	}
	return d, logged, nil
}

// upgrade loads the datapath again, as a new agent version would, and swaps the programs on
// the NIC and on every endpoint's host veth in place (Attach replaces atomically, through
// the pinned TCX link or the cls_bpf filter).
func (e *env) upgrade() error {
	root := e.agent.Config.BPFRoot
	dp, err := loader.Load(loader.Options{Root: root, Mode: e.agent.Config.AttachMode})
	if err != nil {
		return err
	}
	defer dp.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	eps, err := e.agent.Client().Endpoints(ctx)
	if err != nil {
		return err
	}
	devs := []string{e.agent.Config.NIC}
	for _, ep := range eps {
		devs = append(devs, ep.HostIfName)
	}
	info, err := dp.Objects.FromVnet.Info()
	if err != nil {
		return err
	}
	newID, _ := info.ID()
	return e.nodes["cp1"].NS.Do(func(ns.NetNS) error {
		for _, dev := range devs {
			p := loader.FromContainer
			if dev == e.agent.Config.NIC {
				p = loader.FromVNet
			}
			if err := dp.Attach(dev, p); err != nil {
				return err
			}
		}
		// The swap must really have happened, or "no loss" would prove nothing.
		if dp.Mode() != loader.ModeTCX {
			return nil
		}
		nic, err := netlink.LinkByName(e.agent.Config.NIC)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: nic.Attrs().Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		for _, p := range res.Programs {
			if p.ID == newID {
				return nil
			}
		}
		return fmt.Errorf("after the upgrade %s runs %v, not the new program %d", e.agent.Config.NIC, res.Programs, newID)
	})
}

const metricsAddr = "127.0.0.1:9962"

type apiKey struct{ method, route string }

var apiLineRE = regexp.MustCompile(`^vnetbpf_api_request_duration_seconds_(sum|count)\{(.*)\} ([0-9.e+-]+)$`)
var labelRE = regexp.MustCompile(`(\w+)="([^"]*)"`)

// scrapeAPI reads the agent's request-duration sums and counts (seconds, calls) by method
// and route, from inside cp1 where its metrics listen.
func (e *env) scrapeAPI() (map[apiKey][2]float64, error) {
	// The socket must be made on the locked thread inside cp1; http.Client would dial from
	// another goroutine, in another namespace. So: dial here, speak HTTP/1.0 by hand.
	var conn net.Conn
	err := e.nodes["cp1"].NS.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp4", metricsAddr, 5*time.Second)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("scrape the agent's metrics: %w", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n"); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return nil, fmt.Errorf("scrape the agent's metrics: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := map[apiKey][2]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		m := apiLineRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		labels := map[string]string{}
		for _, l := range labelRE.FindAllStringSubmatch(m[2], -1) {
			labels[l[1]] = l[2]
		}
		k := apiKey{labels["method"], labels["route"]}
		v, _ := strconv.ParseFloat(m[3], 64)
		cur := out[k]
		if m[1] == "sum" {
			cur[0] += v
		} else {
			cur[1] += v
		}
		out[k] = cur
	}
	return out, nil
}

func apiDelta(before, after map[apiKey][2]float64) []APIRoute {
	var out []APIRoute
	for k, a := range after {
		b := before[k]
		calls := a[1] - b[1]
		if calls <= 0 {
			continue
		}
		out = append(out, APIRoute{Method: k.method, Route: k.route, Calls: calls, MeanMs: (a[0] - b[0]) / calls * 1000})
	}
	slices.SortFunc(out, func(x, y APIRoute) int { return strings.Compare(x.Route+x.Method, y.Route+y.Method) })
	return out
}

var startupRE = regexp.MustCompile(`msg="agent ready".*startup=([0-9.]+)(ms|s|µs)`)

// lastStartup reads the "startup" of the last "agent ready" line of the agent's log.
func lastStartup(log string) (float64, error) {
	f, err := os.Open(log)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var last []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if m := startupRE.FindStringSubmatch(sc.Text()); m != nil {
			last = m
		}
	}
	if last == nil {
		return 0, fmt.Errorf("no 'agent ready ... startup=' line in %s", log)
	}
	v, _ := strconv.ParseFloat(last[1], 64)
	switch last[2] {
	case "s":
		v *= 1000
	case "µs":
		v /= 1000
	}
	return v, nil
}

// rssMiB is a process's resident set size (VmRSS) in MiB.
func rssMB(pid int) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			if err != nil {
				return 0, err
			}
			return kb * 1024 / 1e6, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}
