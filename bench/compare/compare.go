// Package compare turns per-repetition rates of several modes, measured interleaved, into
// what the benchmark reports: medians and ranges, ratios to the baselines, and the forwarding
// overhead of each mode over the direct veth pair.
package compare

import (
	"math"

	"github.com/vnetbpf/vnetbpf/bench/stats"
)

// Baseline mode names.
const (
	PTP    = "ptp"
	Bridge = "bridge"
	Direct = "direct"
)

// Samples holds one metric for each mode; index r of every mode's slice is the same
// interleaved repetition.
type Samples map[string][]float64

// Row is one mode's summary and its ratios to the baselines (ratios of medians; NaN where
// the baseline was not measured).
type Row struct {
	Mode     string        `json:"mode"`
	Value    stats.Summary `json:"value"`
	VsPTP    float64       `json:"vsPTP"`
	VsBridge float64       `json:"vsBridge"`
	VsDirect float64       `json:"vsDirect"`
	// VsBetter is the ratio to the better of ptp and bridge (higher is better if
	// higherIsBetter, else lower).
	VsBetter float64 `json:"vsBetter"`
}

// Rows summarises s in the order of modes. higherIsBetter says which of ptp and bridge is
// "the better" one.
func Rows(s Samples, modes []string, higherIsBetter bool) []Row {
	med := func(m string) float64 { return stats.Median(s[m]) }
	better := BetterOf(med(PTP), med(Bridge), higherIsBetter)
	var rows []Row
	for _, m := range modes {
		if _, ok := s[m]; !ok {
			continue
		}
		v := stats.Summarize(s[m])
		rows = append(rows, Row{
			Mode: m, Value: v,
			VsPTP: stats.Ratio(v.Median, med(PTP)), VsBridge: stats.Ratio(v.Median, med(Bridge)),
			VsDirect: stats.Ratio(v.Median, med(Direct)), VsBetter: stats.Ratio(v.Median, better),
		})
	}
	return rows
}

// BetterOf returns the better of a and b, ignoring a NaN.
func BetterOf(a, b float64, higherIsBetter bool) float64 {
	switch {
	case math.IsNaN(a):
		return b
	case math.IsNaN(b):
		return a
	case higherIsBetter:
		return math.Max(a, b)
	}
	return math.Min(a, b)
}

// OverheadRow is a mode's forwarding overhead: its cost per transaction (or packet) minus
// the base mode's, and that overhead's ratio to ptp's and bridge's.
type OverheadRow struct {
	Mode string `json:"mode"`
	// Us is the per-repetition overhead (cost(mode) - cost(base) of the same repetition,
	// microseconds for rates; the unit of the costs for CostOverheads), summarised.
	Us       stats.Summary `json:"us"`
	VsPTP    float64       `json:"vsPTP"`
	VsBridge float64       `json:"vsBridge"`
	// VsBetter is the ratio to the smaller of ptp's and bridge's overhead.
	VsBetter float64 `json:"vsBetter"`
}

// Overheads computes the forwarding overhead of every mode in modes over base from rates
// (transactions or packets per second): the cost of one is 1e6/rate microseconds.
func Overheads(rates Samples, modes []string, base string) []OverheadRow {
	costs := Samples{}
	for m, rs := range rates {
		for _, r := range rs {
			c := math.NaN()
			if r > 0 {
				c = 1e6 / r
			}
			costs[m] = append(costs[m], c)
		}
	}
	return CostOverheads(costs, modes, base)
}

// CostOverheads computes the overhead of every mode in modes over base from costs per
// transaction or packet (CPU time, in any unit): cost(mode) - cost(base) within each
// repetition.
func CostOverheads(costs Samples, modes []string, base string) []OverheadRow {
	baseCosts := costs[base]
	per := map[string][]float64{}
	for _, m := range modes {
		cs, ok := costs[m]
		if !ok || m == base {
			continue
		}
		for r := range min(len(cs), len(baseCosts)) {
			if !math.IsNaN(cs[r]) && !math.IsNaN(baseCosts[r]) && cs[r] > 0 && baseCosts[r] > 0 {
				per[m] = append(per[m], cs[r]-baseCosts[r])
			}
		}
	}
	med := func(m string) float64 { return stats.Median(per[m]) }
	better := BetterOf(med(PTP), med(Bridge), false)
	var rows []OverheadRow
	for _, m := range modes {
		if _, ok := per[m]; !ok {
			continue
		}
		o := med(m)
		rows = append(rows, OverheadRow{
			Mode: m, Us: stats.Summarize(per[m]),
			VsPTP: stats.Ratio(o, med(PTP)), VsBridge: stats.Ratio(o, med(Bridge)), VsBetter: stats.Ratio(o, better),
		})
	}
	return rows
}
