package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/vnetbpf/vnetbpf/bench/compare"
	"github.com/vnetbpf/vnetbpf/bench/controlplane"
	"github.com/vnetbpf/vnetbpf/bench/progcost"
	"github.com/vnetbpf/vnetbpf/bench/stats"
)

func byName(ts []target) map[string]target {
	m := map[string]target{}
	for _, t := range ts {
		m[t.Name] = t
	}
	return m
}

func TestEvaluateTargets(t *testing.T) {
	m := func(n int, median, ratio float64) progcost.Measurement {
		return progcost.Measurement{Endpoints: n, Ns: stats.Summary{N: 1, Median: median}, Ratio: stats.Summary{N: 1, Median: ratio}}
	}
	r := &report{
		Prog: &progcost.Result{Sizes: []int{2, 65536}, Paths: []progcost.PathResult{
			{Program: "from_vnet", Name: "cheap", BySize: []progcost.Measurement{m(2, 24, 1.2), m(65536, 24, 1.2)}, Flatness: 1.0},
			{Program: "from_container", Name: "dear", BySize: []progcost.Measurement{m(2, 60, 3.0), m(65536, 78, 3.9)}, Flatness: 1.3},
		}},
		Datapath: &datapathResult{Scopes: []scopeResult{{
			Scope:        "same node",
			Transactions: []compare.Row{{Mode: "vnetbpf", VsDirect: 0.95}},
			RROverhead:   []compare.OverheadRow{{Mode: "vnetbpf", Us: stats.Summary{Median: 0.3}, VsBetter: 0.25}},
			Gbps:         []compare.Row{{Mode: "vnetbpf", VsBetter: 0.98}},
			CPUPerGB:     []compare.Row{{Mode: "vnetbpf", VsBetter: 0.8}},
		}}},
		ControlPlane: &controlplane.Result{Containers: 250, Batch: 10, RSSLoadedMB: 41,
			Plugins: []controlplane.PluginResult{
				{Plugin: "vnetbpf", SeqAdd: controlplane.Latencies{P99: 20, TotalSeconds: 4}, BatchAdd: controlplane.Latencies{P99: 30}},
				{Plugin: "ptp", SeqAdd: controlplane.Latencies{P99: 22}, BatchAdd: controlplane.Latencies{P99: 28}},
			},
			Losses: []controlplane.Loss{{Event: "agent restart (SIGKILL, start)", Sent: 1000, Lost: 0}, {Event: "program upgrade (load, re-attach)", Sent: 1000, Lost: 2}},
		},
	}
	r.Targets = evaluate(r)
	ts := byName(r.Targets)
	for name, wantMet := range map[string]bool{
		"every program path vs the empty program":                                           false,
		"cost from 2 to 65536 endpoints":                                                    false,
		"request/response overhead over direct, same node, vs the better of ptp and bridge": true,
		"transactions/s vs direct, same node":                                               true,
		"TCP throughput vs the better of ptp and bridge, same node":                         false,
		"CPU per GB vs the better of ptp and bridge, same node":                             true,
		"CNI ADD p99, one by one":                                                           true,
		"CNI ADD p99, 10 at a time":                                                         false,
		"CNI ADD p99 vs ptp+host-local, one by one":                                         true,
		"CNI ADD p99 vs ptp+host-local, 10 at a time":                                       false,
		"250 containers added one by one":                                                   true,
		"agent resident memory at 0 endpoints":                                              false,
		"packets lost across agent restart (1 ms ping)":                                     true,
		"packets lost across program upgrade (1 ms ping)":                                   false,
	} {
		got, ok := ts[name]
		if !ok {
			t.Errorf("no target %q", name)
			continue
		}
		if got.Met != wantMet {
			t.Errorf("%s: met=%v, want %v (measured %s)", name, got.Met, wantMet, got.Got)
		}
	}
	if got := ts["every program path vs the empty program"].Got; !strings.Contains(got, "3.90x") || !strings.Contains(got, "dear") {
		t.Errorf("worst path reported as %q, want the 3.90x of from_container dear", got)
	}
	var out bytes.Buffer
	printReport(&out, r)
	if !strings.Contains(out.String(), "MISSED") {
		t.Error("the printed report does not show a missed target")
	}
}
