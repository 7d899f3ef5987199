package main

import (
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/bench/topology"
	"github.com/vnetbpf/vnetbpf/bench/traffic"
	"github.com/vnetbpf/vnetbpf/test/e2e"
)

func profileDatapathCommand(opts *options) *cobra.Command {
	var seconds int
	var across bool
	cmd := &cobra.Command{
		Use:   "profile-datapath",
		Short: "Show where a request/response transaction spends CPU time in each mode, and what vnetbpf, ptp and bridge add over direct (perf)",
		RunE: func(cmd *cobra.Command, _ []string) (err error) {
			if err := traffic.CheckTools(); err != nil {
				return err
			}
			if err := os.MkdirAll(stateDir, 0o700); err != nil {
				return err
			}
			reg := resources.New(filepath.Join(stateDir, "resources.json"))
			defer func() {
				if terr := reg.Teardown(); terr != nil && err == nil {
					err = terr
				}
				os.Remove(stateDir) // only if empty
			}()
			workDir, err := reg.NewDir(stateDir, "work")
			if err != nil {
				return err
			}
			bin, err := e2e.Binaries()
			if err != nil {
				return err
			}
			reg.TrackDir(bin)
			plugins, err := topology.UpstreamPlugins()
			if err != nil {
				return err
			}
			env, err := topology.Build(cmd.Context(), topology.Options{Reg: reg, WorkDir: workDir, PluginsDir: plugins, Progress: step})
			if err != nil {
				return err
			}
			defer env.Close()
			scope := topology.SameNode
			if across {
				scope = topology.AcrossNodes
			}
			profiles := map[topology.Mode]*traffic.RRProfile{}
			var order []topology.Mode
			for _, p := range env.Pairs {
				if p.Scope != scope {
					continue
				}
				sv, err := traffic.StartServer(reg, p.Server, p.Client, opts.cpu)
				if err != nil {
					return err
				}
				step("profiling request/response, %s, for %d s", p.Label(), seconds)
				prof, err := traffic.ProfileRR(cmd.Context(), p, opts.cpu, time.Duration(seconds)*time.Second)
				sv.Stop()
				if err != nil {
					return err
				}
				profiles[p.Mode] = prof
				order = append(order, p.Mode)
				fmt.Printf("\n%s: %.0f transactions, %.0f ns of CPU per transaction in qperf and ksoftirqd\n", prof.Pair, prof.Transactions, prof.NsTotal)
				w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
				for i, s := range prof.Symbols {
					if i == 15 {
						break
					}
					fmt.Fprintf(w, "%.0f ns\t  %s\t\n", s.Ns, s.Symbol)
				}
				w.Flush()
			}
			direct := profiles[topology.Direct]
			for _, m := range order {
				if m == topology.Direct || direct == nil {
					continue
				}
				prof := profiles[m]
				fmt.Printf("\n%s over direct: %+.0f ns per transaction; the symbols that cost more (and less)\n", prof.Pair, prof.NsTotal-direct.NsTotal)
				d := traffic.Diff(prof, direct)
				w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
				for i, s := range d {
					if i < 20 || i >= len(d)-5 {
						fmt.Fprintf(w, "%+.0f ns\t  %s\t\n", s.Ns, s.Symbol)
					}
				}
				w.Flush()
			}
			return writeJSON(opts.out, "profile-datapath", profiles)
		},
	}
	cmd.Flags().IntVar(&seconds, "seconds", 3, "how long to sample each mode")
	cmd.Flags().BoolVar(&across, "across", false, "profile the pairs across nodes instead of on one node")
	return cmd
}
