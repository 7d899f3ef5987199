package main

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vnetbpf/vnetbpf/bench/progcost"
	"github.com/vnetbpf/vnetbpf/bench/resources"
)

func profileCommand(opts *options) *cobra.Command {
	var match string
	var endpoints int
	var seconds float64
	cmd := &cobra.Command{
		Use:   "profile",
		Short: "Show where each datapath branch spends its time: kernel symbols and bpf/datapath.c lines (perf, cpu-clock)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			reg := resources.New("")
			defer reg.Teardown()
			f, err := progcost.NewFixture(reg, []int{endpoints})
			if err != nil {
				return err
			}
			defer f.Close()
			var profiles []*progcost.Profile
			for _, p := range progcost.Paths() {
				if !strings.Contains(strings.ToLower(p.Label()), strings.ToLower(match)) {
					continue
				}
				step("profiling %s for %.1fs on CPU %d", p.Label(), seconds, opts.cpu)
				prof, err := f.ProfilePath(f.Instances[0], p, time.Duration(seconds*float64(time.Second)), opts.cpu)
				if err != nil {
					return err
				}
				printProfile(prof)
				profiles = append(profiles, prof)
			}
			if len(profiles) == 0 {
				return fmt.Errorf("no path matches %q", match)
			}
			return writeJSON(opts.out, "profile", profiles)
		},
	}
	cmd.Flags().StringVar(&match, "path", "", "profile only the paths whose name contains this (case-insensitive)")
	cmd.Flags().IntVar(&endpoints, "endpoints", 2, "entries in the endpoints map")
	cmd.Flags().Float64Var(&seconds, "seconds", 2, "how long to sample each path")
	return cmd
}

func printProfile(p *progcost.Profile) {
	fmt.Printf("\n%s — %d endpoints, %.1f ns per run (%.1f while sampled), %d samples; ns = share x %.1f\n",
		p.Path, p.Endpoints, p.NsPerRun, p.NsPerRunSampled, p.Samples, p.NsPerRun)
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "share\tns\t  kernel symbol\t")
	for i, s := range p.Symbols {
		if i == 12 || s.Percent < 0.5 {
			break
		}
		fmt.Fprintf(w, "%.1f%%\t%.1f\t  %s\t\n", s.Percent, s.Percent/100*p.NsPerRun, s.Name)
	}
	w.Flush()
	if len(p.Lines) == 0 {
		return
	}
	w = tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "share\tns\t  inside the program: source line (a sample falls just after the costly instruction)\t")
	for i, s := range p.Lines {
		if i == 15 || s.Percent < 0.5 {
			break
		}
		fmt.Fprintf(w, "%.1f%%\t%.1f\t  %s\t\n", s.Percent, s.Percent/100*p.NsPerRun, s.Name)
	}
	w.Flush()
}
