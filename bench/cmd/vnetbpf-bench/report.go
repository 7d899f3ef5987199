package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"

	"github.com/vnetbpf/vnetbpf/bench/compare"
	"github.com/vnetbpf/vnetbpf/bench/controlplane"
	"github.com/vnetbpf/vnetbpf/bench/progcost"
	"github.com/vnetbpf/vnetbpf/bench/stats"
)

// target is one of issue 5's targets and what this run measured for it.
type target struct {
	Name string `json:"name"`
	Want string `json:"want"`
	Got  string `json:"got"`
	Met  bool   `json:"met"`
}

func ratio(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "n/a"
	}
	return fmt.Sprintf("%.2fx", v)
}

func num(v float64, digits int) string {
	if math.IsNaN(v) {
		return "n/a"
	}
	return fmt.Sprintf("%.*f", digits, v)
}

// kilo prints a rate in thousands.
func kilo(v float64) string {
	if math.IsNaN(v) {
		return "n/a"
	}
	return fmt.Sprintf("%.1fk", v/1e3)
}

func rangeOf(s stats.Summary, f func(float64) string) string {
	return f(s.Min) + "–" + f(s.Max)
}

func table(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0) }

func printReport(w io.Writer, r *report) {
	m := r.Machine
	fmt.Fprintf(w, "\n==== vnetbpf-bench: %d CPUs, %s, kernel %s, %s; commit %s; load average %s before, %s after; %.0f s",
		m.Nproc, m.CPUModel, m.Kernel, m.GoVersion, m.Commit, m.LoadBefore, m.LoadAfter, m.Seconds)
	if r.Settings.Quick {
		fmt.Fprint(w, "; SMOKE RUN (BENCH_QUICK=1): numbers not judged")
	}
	fmt.Fprintln(w)
	if r.Prog != nil {
		printProg(w, r.Prog)
	}
	if r.Datapath != nil {
		printDatapath(w, r.Datapath)
	}
	if r.ControlPlane != nil {
		printControlPlane(w, r.ControlPlane)
	}
	printTargets(w, r)
}

func printProg(w io.Writer, p *progcost.Result) {
	fmt.Fprintf(w, "\n-- Per-packet program cost: BPF_PROG_TEST_RUN, kernel ns per run (median of %d rounds of %d calls), its ratio to an empty TC program\n", p.Rounds, p.Calls)
	fmt.Fprintf(w, "   run in the same round with the same runs per call, and \"own\": ns above the empty program with the largest map\n")
	t := table(w)
	hdr := "program\tpath\truns/call"
	for _, n := range p.Sizes {
		hdr += fmt.Sprintf("\t%d endpoints\t", n)
	}
	fmt.Fprintln(t, hdr+"\town\tlargest/smallest")
	line := func(prog, name string, repeat uint32, ms []progcost.Measurement, flat string) {
		l := fmt.Sprintf("%s\t%s\t%d", prog, name, repeat)
		own := ""
		for _, m := range ms {
			r := ""
			if m.Ratio.N > 0 {
				r = ratio(m.Ratio.Median)
				own = num(m.Own.Median, 1) + " ns"
			}
			l += fmt.Sprintf("\t%s ns\t%s", num(m.Ns.Median, 1), r)
		}
		fmt.Fprintln(t, l+"\t"+own+"\t"+flat)
	}
	line("empty", "(baseline: mov r0, 0; exit)", p.Repeat, p.Empty, "")
	line("empty", "(baseline, once per call)", 1, p.EmptyOnce, "")
	for _, pr := range p.Paths {
		line(pr.Program, pr.Name, pr.Repeat, pr.BySize, ratio(pr.Flatness))
	}
	t.Flush()
}

func printDatapath(w io.Writer, d *datapathResult) {
	fmt.Fprintf(w, "\n-- Datapath, side by side: client and server pinned to CPU %d; median of %d interleaved repetitions (min–max)\n", d.CPU, d.Reps)
	fmt.Fprintf(w, "   request/response: qperf tcp_lat, 64-byte messages, %d s per run; overhead = µs per transaction more than direct\n", d.RRSeconds)
	t := table(w)
	fmt.Fprintln(t, "scope\tmode\ttransactions/s\tmin–max\tvs ptp\tvs bridge\tvs direct\toverhead µs\tmin–max\tvs ptp\tvs bridge")
	for _, s := range d.Scopes {
		ovh := overheadByMode(s.RROverhead)
		for _, row := range s.Transactions {
			o, ok := ovh[row.Mode]
			ostr := "\t\t\t"
			if ok {
				ostr = fmt.Sprintf("%s\t%s\t%s\t%s", num(o.Us.Median, 2), rangeOf(o.Us, func(v float64) string { return num(v, 2) }), ratio(o.VsPTP), ratio(o.VsBridge))
			}
			fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Scope, row.Mode, kilo(row.Value.Median), rangeOf(row.Value, kilo),
				ratio(row.VsPTP), ratio(row.VsBridge), ratio(row.VsDirect), ostr)
		}
		if len(s.RROverheadFabric) > 0 {
			for _, o := range s.RROverheadFabric {
				fmt.Fprintf(t, "%s\t%s\t(over fabric)\t\t\t\t\t%s\t%s\t%s\t%s\n", s.Scope, o.Mode, num(o.Us.Median, 2),
					rangeOf(o.Us, func(v float64) string { return num(v, 2) }), ratio(o.VsPTP), ratio(o.VsBridge))
			}
		}
	}
	t.Flush()

	fmt.Fprintln(w, "\n   request/response, CPU time of client, server and ksoftirqd per transaction (unaffected by other load on the CPU)")
	t = table(w)
	fmt.Fprintln(t, "scope\tmode\tCPU µs/transaction\tmin–max\tvs ptp\tvs bridge\tvs direct\toverhead µs\tmin–max\tvs ptp\tvs bridge")
	for _, s := range d.Scopes {
		printCostRows(t, s.Scope, s.RRCPU, s.RRCPUOverhead, 2)
	}
	t.Flush()

	fmt.Fprintf(w, "\n   single TCP stream: iperf3, %d s per run; CPU = iperf3 client + server + ksoftirqd, seconds per GB received\n", d.StreamSeconds)
	t = table(w)
	fmt.Fprintln(t, "scope\tmode\tGb/s\tmin–max\tvs ptp\tvs bridge\tvs direct\tCPU s/GB\tmin–max\tvs ptp\tvs bridge\tvs direct")
	for _, s := range d.Scopes {
		cpu := rowByMode(s.CPUPerGB)
		for _, row := range s.Gbps {
			c := cpu[row.Mode]
			fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Scope, row.Mode,
				num(row.Value.Median, 1), rangeOf(row.Value, func(v float64) string { return num(v, 1) }),
				ratio(row.VsPTP), ratio(row.VsBridge), ratio(row.VsDirect),
				num(c.Value.Median, 3), rangeOf(c.Value, func(v float64) string { return num(v, 3) }),
				ratio(c.VsPTP), ratio(c.VsBridge), ratio(c.VsDirect))
		}
	}
	t.Flush()

	fmt.Fprintf(w, "\n   64-byte UDP: qperf udp_bw, %d s per run; datagrams received per second (the sender outruns the receiver on one CPU; drops are at the receiving socket)\n", d.UDPSeconds)
	t = table(w)
	fmt.Fprintln(t, "scope\tmode\treceived/s\tmin–max\tvs ptp\tvs bridge\tvs direct\toverhead µs/pkt\tvs ptp\tvs bridge")
	for _, s := range d.Scopes {
		ovh := overheadByMode(s.UDPOverhead)
		for _, row := range s.UDPReceived {
			o, ok := ovh[row.Mode]
			ostr := "\t\t"
			if ok {
				ostr = fmt.Sprintf("%s\t%s\t%s", num(o.Us.Median, 3), ratio(o.VsPTP), ratio(o.VsBridge))
			}
			fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Scope, row.Mode, kilo(row.Value.Median), rangeOf(row.Value, kilo),
				ratio(row.VsPTP), ratio(row.VsBridge), ratio(row.VsDirect), ostr)
		}
	}
	t.Flush()

	fmt.Fprintln(w, "\n   64-byte UDP, the sender's CPU time (and ksoftirqd's) per datagram sent: the system call and the whole path run in its context")
	t = table(w)
	fmt.Fprintln(t, "scope\tmode\tsender ns/packet\tmin–max\tvs ptp\tvs bridge\tvs direct\toverhead ns\tmin–max\tvs ptp\tvs bridge")
	for _, s := range d.Scopes {
		printCostRows(t, s.Scope, s.UDPSenderNs, s.UDPSenderOverhead, 0)
	}
	t.Flush()
}

// printCostRows prints a cost per transaction or packet and its overhead over direct.
func printCostRows(t io.Writer, scope string, rows []compare.Row, ovh []compare.OverheadRow, digits int) {
	om := overheadByMode(ovh)
	f := func(v float64) string { return num(v, digits) }
	for _, row := range rows {
		ostr := "\t\t\t"
		if o, ok := om[row.Mode]; ok {
			ostr = fmt.Sprintf("%s\t%s\t%s\t%s", f(o.Us.Median), rangeOf(o.Us, f), ratio(o.VsPTP), ratio(o.VsBridge))
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", scope, row.Mode, f(row.Value.Median), rangeOf(row.Value, f),
			ratio(row.VsPTP), ratio(row.VsBridge), ratio(row.VsDirect), ostr)
	}
}

func overheadByMode(rows []compare.OverheadRow) map[string]compare.OverheadRow {
	m := map[string]compare.OverheadRow{}
	for _, r := range rows {
		m[r.Mode] = r
	}
	return m
}

func rowByMode(rows []compare.Row) map[string]compare.Row {
	m := map[string]compare.Row{}
	for _, r := range rows {
		m[r.Mode] = r
	}
	return m
}

func printControlPlane(w io.Writer, c *controlplane.Result) {
	fmt.Fprintf(w, "\n-- Control plane: CNI through libcni, %d containers; batches run %d ADDs (or DELs) at once\n", c.Containers, c.Batch)
	t := table(w)
	fmt.Fprintln(t, "plugin\trun\tp50 ms\tp90 ms\tp99 ms\tmax ms\ttotal s\tplugin CPU ms/call\tCPUs busy")
	for _, p := range c.Plugins {
		for _, x := range []struct {
			name string
			l    controlplane.Latencies
		}{{"ADD one by one", p.SeqAdd}, {"DEL one by one", p.SeqDel}, {fmt.Sprintf("ADD %d at a time", c.Batch), p.BatchAdd}, {fmt.Sprintf("DEL %d at a time", c.Batch), p.BatchDel}} {
			fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.0f%%\n", p.Plugin, x.name, num(x.l.P50, 1), num(x.l.P90, 1), num(x.l.P99, 1), num(x.l.Max, 1), num(x.l.TotalSeconds, 2), num(x.l.PluginCPUMs, 1), 100*x.l.Busy)
		}
	}
	t.Flush()
	if len(c.AgentAPI) > 0 {
		var parts []string
		for _, a := range c.AgentAPI {
			parts = append(parts, fmt.Sprintf("%s %s %.1f ms (%.0f calls)", a.Method, a.Route, a.MeanMs, a.Calls))
		}
		fmt.Fprintf(w, "agent's own time per API call during vnetbpf's ADDs one by one: %s\n", strings.Join(parts, "; "))
	}
	ready := stats.Summarize(c.StartToReadyMs)
	logged := stats.Summarize(c.StartupLoggedMs)
	fmt.Fprintf(w, "agent resident memory: %.1f MB idle, %.1f MB with %d endpoints, %.1f MB after a restart with them\n",
		c.RSSIdleMB, c.RSSLoadedMB, c.EndpointsAtRSS, c.RSSRestartMB)
	fmt.Fprintf(w, "agent start to ready with %d endpoints to restore: %.0f ms median (%.0f–%.0f) from exec, polled every 20 ms; the agent logs %.0f ms (%.0f–%.0f)\n",
		c.EndpointsAtRSS, ready.Median, ready.Min, ready.Max, logged.Median, logged.Min, logged.Max)
	t = table(w)
	fmt.Fprintln(t, "event\tping target (every 1 ms)\tsent\tlost\tevent took")
	for _, l := range c.Losses {
		fmt.Fprintf(t, "%s\t%s\t%d\t%d\t%.0f ms\n", l.Event, l.Target, l.Sent, l.Lost, l.EventMs)
	}
	t.Flush()
}

func printTargets(w io.Writer, r *report) {
	fmt.Fprintln(w, "\n-- Targets (issue 5)")
	t := table(w)
	fmt.Fprintln(t, "target\twant\tmeasured\t")
	for _, x := range r.Targets {
		verdict := "met"
		if !x.Met {
			verdict = "MISSED"
		}
		if r.Settings.Quick {
			verdict = "(smoke run)"
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\n", x.Name, x.Want, x.Got, verdict)
	}
	t.Flush()
}

// evaluate checks the run against issue 5's targets.
func evaluate(r *report) []target {
	var ts []target
	if p := r.Prog; p != nil {
		worst, worstName := 0.0, ""
		flat, flatName := 0.0, ""
		for _, pr := range p.Paths {
			for _, m := range pr.BySize {
				if m.Ratio.Median > worst {
					worst, worstName = m.Ratio.Median, fmt.Sprintf("%s: %s, %d endpoints", pr.Program, pr.Name, m.Endpoints)
				}
			}
			if pr.Flatness > flat {
				flat, flatName = pr.Flatness, fmt.Sprintf("%s: %s", pr.Program, pr.Name)
			}
		}
		ts = append(ts,
			target{"every program path vs the empty program", "<= 1.5x", fmt.Sprintf("worst %s (%s)", ratio(worst), worstName), worst <= 1.5},
			target{fmt.Sprintf("cost from %d to %d endpoints", p.Sizes[0], p.Sizes[len(p.Sizes)-1]), "<= 1.2x", fmt.Sprintf("worst %s (%s)", ratio(flat), flatName), flat <= 1.2})
	}
	if d := r.Datapath; d != nil {
		for _, s := range d.Scopes {
			want := 0.3
			if s.Scope != "same node" {
				want = 0.6
			}
			if o, ok := overheadByMode(s.RROverhead)["vnetbpf"]; ok {
				ts = append(ts, target{"request/response overhead over direct, " + s.Scope + ", vs the better of ptp and bridge",
					fmt.Sprintf("<= %.1fx", want), fmt.Sprintf("%s (%.2f µs vs ptp %s, bridge %s)", ratio(o.VsBetter), o.Us.Median, ratio(o.VsPTP), ratio(o.VsBridge)),
					o.VsBetter <= want})
			}
			if o, ok := overheadByMode(s.RRCPUOverhead)["vnetbpf"]; ok {
				ts = append(ts, target{"  the same from CPU time per transaction", fmt.Sprintf("<= %.1fx", want),
					fmt.Sprintf("%s (%.2f µs vs ptp %s, bridge %s)", ratio(o.VsBetter), o.Us.Median, ratio(o.VsPTP), ratio(o.VsBridge)), o.VsBetter <= want})
			}
			rows := rowByMode(s.Transactions)
			if s.Scope == "same node" {
				v := rows["vnetbpf"]
				ts = append(ts, target{"transactions/s vs direct, same node", ">= 0.9x", ratio(v.VsDirect), v.VsDirect >= 0.9})
			}
			g := rowByMode(s.Gbps)["vnetbpf"]
			ts = append(ts, target{"TCP throughput vs the better of ptp and bridge, " + s.Scope, ">= 1.0x",
				fmt.Sprintf("%s (%.1f Gb/s)", ratio(g.VsBetter), g.Value.Median), g.VsBetter >= 1.0})
			c := rowByMode(s.CPUPerGB)["vnetbpf"]
			ts = append(ts, target{"CPU per GB vs the better of ptp and bridge, " + s.Scope, "<= 0.9x",
				fmt.Sprintf("%s (%.3f s/GB)", ratio(c.VsBetter), c.Value.Median), c.VsBetter <= 0.9})
		}
	}
	if c := r.ControlPlane; c != nil {
		var v, p controlplane.PluginResult
		for _, x := range c.Plugins {
			switch x.Plugin {
			case "vnetbpf":
				v = x
			case "ptp":
				p = x
			}
		}
		for _, run := range []struct {
			name   string
			vl, pl controlplane.Latencies
		}{{"one by one", v.SeqAdd, p.SeqAdd}, {fmt.Sprintf("%d at a time", c.Batch), v.BatchAdd, p.BatchAdd}} {
			ts = append(ts,
				target{"CNI ADD p99, " + run.name, "<= 25 ms", fmt.Sprintf("%.1f ms", run.vl.P99), run.vl.P99 <= 25},
				target{"CNI ADD p99 vs ptp+host-local, " + run.name, "<= 1.0x", fmt.Sprintf("%s (ptp %.1f ms)", ratio(stats.Ratio(run.vl.P99, run.pl.P99)), run.pl.P99),
					run.vl.P99 <= run.pl.P99})
		}
		ts = append(ts,
			target{fmt.Sprintf("%d containers added one by one", c.Containers), "<= 10 s (for 250)", fmt.Sprintf("%.2f s", v.SeqAdd.TotalSeconds),
				v.SeqAdd.TotalSeconds <= 10*float64(c.Containers)/250},
			target{fmt.Sprintf("agent resident memory at %d endpoints", c.EndpointsAtRSS), "<= 40 MB", fmt.Sprintf("%.1f MB", c.RSSLoadedMB), c.RSSLoadedMB <= 40})
		lost := map[string]int{}
		sent := map[string]int{}
		for _, l := range c.Losses {
			kind, _, _ := strings.Cut(l.Event, " (")
			lost[kind] += l.Lost
			sent[kind] += l.Sent
		}
		for _, kind := range []string{"agent restart", "program upgrade"} {
			ts = append(ts, target{"packets lost across " + kind + " (1 ms ping)", "0", fmt.Sprintf("%d of %d", lost[kind], sent[kind]), sent[kind] > 0 && lost[kind] == 0})
		}
	}
	return ts
}
