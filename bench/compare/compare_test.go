package compare

import (
	"math"
	"testing"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestRowsRatios(t *testing.T) {
	s := Samples{
		"vnetbpf": {120, 125, 130},
		PTP:       {100, 110, 105},
		Bridge:    {95, 100, 105},
		Direct:    {130, 130, 140},
	}
	rows := Rows(s, []string{"vnetbpf", PTP, Bridge, Direct, "absent"}, true)
	if len(rows) != 4 {
		t.Fatalf("%d rows, want 4 (a mode without samples is left out)", len(rows))
	}
	v := rows[0]
	if v.Value.Median != 125 || !near(v.VsPTP, 125.0/105) || !near(v.VsBridge, 125.0/100) || !near(v.VsDirect, 125.0/130) {
		t.Errorf("vnetbpf row %+v", v)
	}
	if !near(v.VsBetter, 125.0/105) {
		t.Errorf("better of ptp (105) and bridge (100) for a rate is 105; ratio %v", v.VsBetter)
	}
	if low := Rows(s, []string{"vnetbpf"}, false)[0]; !near(low.VsBetter, 125.0/100) {
		t.Errorf("better of ptp and bridge for a cost is the lower, 100; ratio %v", low.VsBetter)
	}
}

func TestOverheadsPairRepetitions(t *testing.T) {
	// Rates in transactions/s; direct drifts between repetitions, the others drift with it.
	s := Samples{
		Direct:    {100000, 50000},
		"vnetbpf": {80000, 40000},        // +2.5 µs, +5 µs
		PTP:       {50000, 100000.0 / 3}, // +10 µs, +10 µs
		Bridge:    {40000, 25000},        // +15 µs, +20 µs
	}
	rows := Overheads(s, []string{"vnetbpf", PTP, Bridge, Direct}, Direct)
	if len(rows) != 3 {
		t.Fatalf("%d rows, want 3 (no overhead row for the base)", len(rows))
	}
	v := rows[0]
	if !near(v.Us.Median, 3.75) || !near(v.Us.Min, 2.5) || !near(v.Us.Max, 5) {
		t.Errorf("vnetbpf overhead %+v, want median 3.75 µs from 2.5 and 5", v.Us)
	}
	if !near(v.VsPTP, 0.375) || !near(v.VsBridge, 3.75/17.5) || !near(v.VsBetter, 0.375) {
		t.Errorf("overhead ratios %+v", v)
	}
}

func TestBetterOfIgnoresMissing(t *testing.T) {
	if BetterOf(math.NaN(), 3, true) != 3 || BetterOf(2, math.NaN(), false) != 2 {
		t.Error("a missing baseline is not skipped")
	}
}
