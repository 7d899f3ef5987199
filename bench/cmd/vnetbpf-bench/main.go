// Command vnetbpf-bench measures vnetbpf against the CNI plugins people use today, on this
// machine, in one run: what each datapath branch costs per packet, container traffic through
// vnetbpf, ptp, bridge and a bare veth pair on one node and across two, and the control
// plane (CNI ADD/DEL latency, agent memory, restart and upgrade without loss). It prints
// progress and one table, and writes every raw number as JSON under out/bench.
//
//	vnetbpf-bench            the full suite (under 15 minutes)
//	vnetbpf-bench --quick    a smoke run of about 2 minutes (also BENCH_QUICK=1)
//	vnetbpf-bench profile    where each branch spends its time (perf)
//	vnetbpf-bench down       remove what a killed run left behind
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/spf13/cobra"
)

// stateDir holds the list of what a run created, for `down`.
const stateDir = "/run/vnetbpf-bench"

type options struct {
	quick  bool
	out    string
	cpu    int
	only   []string
	strict bool

	pluginsDir string // set once the upstream plugins are built
}

var started = time.Now()

// step prints one line of progress with the time since the start.
func step(format string, args ...any) {
	fmt.Printf("[%6.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
}

func main() {
	// Piped into head or less that quits early, keep running to the end so the teardown
	// still happens: a write to a closed pipe is then an error, not a silent death.
	signal.Ignore(syscall.SIGPIPE)
	opts := &options{quick: os.Getenv("BENCH_QUICK") == "1" || os.Getenv("BENCH_QUICK") == "true"}
	root := &cobra.Command{
		Use:           "vnetbpf-bench",
		Short:         "Measure vnetbpf against ptp, bridge and a bare veth pair on this machine",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return fmt.Errorf("vnetbpf-bench needs root (BPF, network namespaces)")
			}
			if opts.cpu < 0 || opts.cpu >= runtime.NumCPU() {
				return fmt.Errorf("--cpu %d: this machine has CPUs 0..%d", opts.cpu, runtime.NumCPU()-1)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error { return runSuite(cmd.Context(), opts) },
	}
	root.PersistentFlags().StringVar(&opts.out, "out", "out/bench", "directory for the JSON results")
	root.PersistentFlags().IntVar(&opts.cpu, "cpu", runtime.NumCPU()-1, "the CPU that senders, receivers and test runs are pinned to")
	root.Flags().BoolVar(&opts.quick, "quick", opts.quick, "smoke run: fewer repetitions, shorter runs, 50 containers (default from BENCH_QUICK=1)")
	root.Flags().StringSliceVar(&opts.only, "only", nil, "run only these parts: prog, datapath, controlplane")
	root.Flags().BoolVar(&opts.strict, "strict", false, "exit 1 when a target is missed (by default a miss is reported, not fatal)")
	root.AddCommand(profileCommand(opts), profileDatapathCommand(opts), downCommand())
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "vnetbpf-bench:", err)
		os.Exit(1)
	}
}

// writeJSON writes v to dir/<kind>-<timestamp>.json and dir/<kind>-latest.json.
func writeJSON(dir, kind string, v any) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	name := filepath.Join(dir, fmt.Sprintf("%s-%s.json", kind, started.UTC().Format("20060102T150405Z")))
	if err := os.WriteFile(name, append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, kind+"-latest.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	step("raw numbers: %s", name)
	return nil
}
