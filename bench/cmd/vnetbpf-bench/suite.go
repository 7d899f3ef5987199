package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vnetbpf/vnetbpf/bench/controlplane"
	"github.com/vnetbpf/vnetbpf/bench/progcost"
	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/bench/topology"
	"github.com/vnetbpf/vnetbpf/bench/traffic"
	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// settings are the sizes of a run.
type settings struct {
	Quick bool `json:"quick"`
	CPU   int  `json:"cpu"`
	// Per-packet cost.
	ProgRounds int    `json:"progRounds"`
	ProgCalls  int    `json:"progCalls"`
	ProgRepeat uint32 `json:"progRepeat"`
	MapSizes   []int  `json:"mapSizes"`
	// Datapath.
	Reps          int `json:"reps"`
	RRSeconds     int `json:"rrSeconds"`
	StreamSeconds int `json:"streamSeconds"`
	UDPSeconds    int `json:"udpSeconds"`
	// Control plane.
	Containers int `json:"containers"`
	Batch      int `json:"batch"`
	Restarts   int `json:"restarts"`
	Events     int `json:"events"`
	Pings      int `json:"pings"`
}

func newSettings(quick bool, cpu, maxEndpoints int) settings {
	s := settings{
		Quick: quick, CPU: cpu,
		ProgRounds: 21, ProgCalls: 200, ProgRepeat: 200, MapSizes: []int{2, 1024, maxEndpoints},
		Reps: 7, RRSeconds: 2, StreamSeconds: 2, UDPSeconds: 2,
		Containers: 250, Batch: 10, Restarts: 5, Events: 3, Pings: 2000,
	}
	if quick {
		s.ProgRounds, s.ProgCalls = 5, 50
		s.Reps, s.RRSeconds, s.StreamSeconds, s.UDPSeconds = 2, 1, 1, 1
		s.Containers, s.Restarts, s.Events, s.Pings = 50, 2, 1, 1000
	}
	return s
}

// report is everything a run measured; it is written as JSON.
type report struct {
	Machine      machine              `json:"machine"`
	Settings     settings             `json:"settings"`
	Prog         *progcost.Result     `json:"prog,omitempty"`
	Datapath     *datapathResult      `json:"datapath,omitempty"`
	ControlPlane *controlplane.Result `json:"controlPlane,omitempty"`
	Targets      []target             `json:"targets"`
}

type machine struct {
	Nproc           int        `json:"nproc"`
	Kernel          string     `json:"kernel"`
	CPUModel        string     `json:"cpuModel"`
	GoVersion       string     `json:"goVersion"`
	Commit          string     `json:"commit"`
	BPFStatsEnabled string     `json:"bpfStatsEnabled"`
	LoadBefore      string     `json:"loadBefore"`
	LoadAfter       string     `json:"loadAfter"`
	StartedAt       time.Time  `json:"startedAt"`
	Seconds         float64    `json:"seconds"`
	Tools           [][]string `json:"tools"`
}

func describeMachine() machine {
	m := machine{Nproc: runtime.NumCPU(), GoVersion: runtime.Version(), StartedAt: started.UTC()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	m.LoadBefore = loadavg()
	m.BPFStatsEnabled = readTrim("/proc/sys/kernel/bpf_stats_enabled")
	if out, err := exec.Command("git", "-C", e2e.RepoRoot(), "describe", "--always", "--dirty").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	for _, t := range [][]string{{"qperf", "--version"}, {"iperf3", "--version"}} {
		out, _ := exec.Command(t[0], t[1]).CombinedOutput()
		first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		m.Tools = append(m.Tools, []string{t[0], first})
	}
	return m
}

func readTrim(p string) string {
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}

func loadavg() string {
	f := strings.Fields(readTrim("/proc/loadavg"))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func (o *options) wants(part string) bool { return len(o.only) == 0 || slices.Contains(o.only, part) }

// runSuite runs the parts, prints the table and writes the JSON. Everything it creates is
// removed on return, on error and on Ctrl-C.
func runSuite(parent context.Context, opts *options) (err error) {
	for _, p := range opts.only {
		if p != "prog" && p != "datapath" && p != "controlplane" {
			return fmt.Errorf("--only %s: want prog, datapath or controlplane", p)
		}
	}
	ctx, stop := signal.NotifyContext(parent, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return err
	}
	// A run killed before it could clean up left its list behind: remove that first.
	if old, err := resources.Load(filepath.Join(stateDir, "resources.json")); err == nil && len(old.Netns)+len(old.PIDs)+len(old.BPFRoots) > 0 {
		step("removing what an earlier, interrupted run left behind")
		if err := old.Teardown(); err != nil {
			return fmt.Errorf("remove an earlier run's leftovers (try 'vnetbpf-bench down'): %w", err)
		}
	}
	reg := resources.New(filepath.Join(stateDir, "resources.json"))
	defer func() {
		step("removing every namespace, pin and process the run created")
		if terr := reg.Teardown(); terr != nil {
			err = errors.Join(err, fmt.Errorf("teardown: %w", terr))
			return
		}
		os.Remove(stateDir) // only if empty: a list of leftovers keeps it
	}()
	workDir, err := reg.NewDir(stateDir, "work")
	if err != nil {
		return err
	}

	maxEndpoints, err := progcost.MaxEndpoints()
	if err != nil {
		return err
	}
	rep := &report{Machine: describeMachine(), Settings: newSettings(opts.quick, opts.cpu, maxEndpoints)}
	s := rep.Settings
	mode := "full run"
	if s.Quick {
		mode = "smoke run (BENCH_QUICK=1): fewer repetitions and shorter runs; the numbers are not judged"
	}
	step("vnetbpf-bench, %s, on %d CPUs (%s, kernel %s); load average %s; pinned work on CPU %d",
		mode, rep.Machine.Nproc, rep.Machine.CPUModel, rep.Machine.Kernel, rep.Machine.LoadBefore, s.CPU)
	if rep.Machine.BPFStatsEnabled == "1" {
		step("warning: kernel.bpf_stats_enabled=1 adds two clock reads to every program run; the per-packet costs include them")
	}

	if opts.wants("datapath") || opts.wants("controlplane") {
		if err := traffic.CheckTools(); err != nil && opts.wants("datapath") {
			return err
		}
		step("building vnetbpf-agent and the vnetbpf CNI plugin")
		bin, err := e2e.Binaries()
		if err != nil {
			return err
		}
		reg.TrackDir(bin)
		step("building the upstream CNI plugins ptp, bridge, host-local and loopback %s (cached in %s)", e2e.PluginsVersion, e2e.ToolsCacheDir())
		if opts.pluginsDir, err = topology.UpstreamPlugins(); err != nil {
			return err
		}
	}

	if opts.wants("prog") {
		if rep.Prog, err = runProg(ctx, reg, s); err != nil {
			return fmt.Errorf("per-packet cost: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// The control plane runs before the datapath part, not after the removal of that part's
	// namespaces and devices, whose cleanup the kernel finishes in the background under the
	// RTNL lock: one run after it measured vnetbpf's 10-at-a-time ADD p99 at 90 ms, against
	// 50 to 56 ms in three runs of the control plane alone, and vnetbpf goes first.
	if opts.wants("controlplane") {
		step("control plane")
		rep.ControlPlane, err = controlplane.Run(ctx, controlplane.Config{
			Containers: s.Containers, Batch: s.Batch, Restarts: s.Restarts, PingCount: s.Pings, Events: s.Events,
			Reg: reg, WorkDir: workDir, PluginsDir: opts.pluginsDir, Progress: step,
		})
		if err != nil {
			return fmt.Errorf("control plane: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if opts.wants("datapath") {
		if rep.Datapath, err = runDatapath(ctx, reg, workDir, opts.pluginsDir, s); err != nil {
			return fmt.Errorf("datapath: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	rep.Machine.LoadAfter = loadavg()
	rep.Machine.Seconds = time.Since(started).Seconds()
	rep.Targets = evaluate(rep)
	printReport(os.Stdout, rep)
	if err := writeJSON(opts.out, "bench", rep); err != nil {
		return err
	}
	if opts.strict && !s.Quick {
		var missed []string
		for _, t := range rep.Targets {
			if !t.Met {
				missed = append(missed, t.Name)
			}
		}
		if len(missed) > 0 {
			return fmt.Errorf("%d targets missed: %s", len(missed), strings.Join(missed, "; "))
		}
	}
	return nil
}

func runProg(ctx context.Context, reg *resources.Registry, s settings) (*progcost.Result, error) {
	step("per-packet cost: loading the datapath %d times (endpoints maps of %v entries) and an empty TC program", len(s.MapSizes), s.MapSizes)
	f, err := progcost.NewFixture(reg, s.MapSizes)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.Run(progcost.Config{
		Rounds: s.ProgRounds, Calls: s.ProgCalls, Repeat: s.ProgRepeat, CPU: s.CPU,
		Progress: step, Context: ctx,
	})
}
