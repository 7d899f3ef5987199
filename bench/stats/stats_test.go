package stats

import (
	"math"
	"testing"
)

func TestSummarize(t *testing.T) {
	s := Summarize([]float64{5, 1, 3, 2, 4})
	if s != (Summary{N: 5, Median: 3, Min: 1, Max: 5}) {
		t.Errorf("odd count: %+v", s)
	}
	if m := Summarize([]float64{4, 1, 3, 2}).Median; m != 2.5 {
		t.Errorf("median of an even count %v, want 2.5", m)
	}
	if s := Summarize(nil); s.N != 0 {
		t.Errorf("empty: %+v", s)
	}
}

func TestPercentileNearestRank(t *testing.T) {
	xs := make([]float64, 250)
	for i := range xs {
		xs[i] = float64(250 - i) // 250 .. 1, unsorted on purpose
	}
	for _, c := range []struct{ p, want float64 }{{50, 125}, {90, 225}, {99, 248}, {100, 250}, {0.1, 1}} {
		if got := Percentile(xs, c.p); got != c.want {
			t.Errorf("p%v = %v, want %v", c.p, got, c.want)
		}
	}
	if !math.IsNaN(Percentile(nil, 50)) {
		t.Error("percentile of nothing is not NaN")
	}
}

func TestRatio(t *testing.T) {
	if r := Ratio(3, 2); r != 1.5 {
		t.Errorf("3/2 = %v", r)
	}
	if !math.IsNaN(Ratio(1, 0)) || !math.IsNaN(Ratio(math.NaN(), 1)) {
		t.Error("a ratio against a missing baseline is not NaN")
	}
}
