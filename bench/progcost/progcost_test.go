package progcost

import (
	"fmt"
	"testing"

	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/internal/testutils"
)

func newTestFixture(tb testing.TB, sizes ...int) *Fixture {
	tb.Helper()
	testutils.RequireRoot(tb)
	reg := resources.New("")
	f, err := NewFixture(reg, sizes)
	if err != nil {
		reg.Teardown()
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		f.Close()
		reg.Teardown()
	})
	return f
}

// TestEveryPathTakesItsBranch runs each benchmark frame through a full map and an almost
// empty one: if a change to bpf/datapath.c sends a frame down another branch, the benchmark
// would silently measure the wrong thing, so this fails instead.
func TestEveryPathTakesItsBranch(t *testing.T) {
	limit, err := MaxEndpoints()
	if err != nil {
		t.Fatal(err)
	}
	f := newTestFixture(t, 2, limit)
	cfg := Config{Calls: 3, CPU: -1}
	for _, inst := range f.Instances {
		for _, p := range Paths() {
			t.Run(fmt.Sprintf("%d endpoints/%s", inst.Endpoints, p.Label()), func(t *testing.T) {
				prog, err := inst.program(p.Program)
				if err != nil {
					t.Fatal(err)
				}
				repeat := uint32(MaxRepeat)
				if p.Rewrites {
					repeat = 1
				}
				ns, err := f.measure(inst, prog, p, repeat, cfg)
				if err != nil {
					t.Fatal(err)
				}
				if ns <= 0 {
					t.Errorf("kernel reported %v ns per run", ns)
				}
			})
		}
	}
}

// TestRewritingPathsCannotRepeat shows why ARP answers run once per call: a second run on
// the same frame sees the reply the first one wrote, and the counter check catches it.
func TestRewritingPathsCannotRepeat(t *testing.T) {
	f := newTestFixture(t, 2)
	for _, p := range Paths() {
		if !p.Rewrites {
			continue
		}
		prog, _ := f.Instances[0].program(p.Program)
		if _, err := f.measure(f.Instances[0], prog, p, 2, Config{Calls: 1, CPU: -1}); err == nil {
			t.Errorf("%s: two runs on one frame passed the branch check", p.Label())
		}
	}
}

// BenchmarkPaths reports each path's kernel time per run (ns/packet) for `go test -bench`,
// with the empty program first as the baseline.
func BenchmarkPaths(b *testing.B) {
	limit, err := MaxEndpoints()
	if err != nil {
		b.Fatal(err)
	}
	f := newTestFixture(b, 2, 1024, limit)
	for _, inst := range f.Instances {
		for _, p := range append([]Path{{Name: "baseline", Program: "empty", Frame: Paths()[0].Frame}}, Paths()...) {
			b.Run(fmt.Sprintf("endpoints=%d/%s", inst.Endpoints, p.Label()), func(b *testing.B) {
				prog := f.Empty
				if p.Program != "empty" {
					prog, _ = inst.program(p.Program)
				}
				repeat := uint32(MaxRepeat)
				if p.Rewrites {
					repeat = 1
				}
				calls := max(1, b.N/int(repeat))
				checked := inst
				if p.Program == "empty" {
					checked = nil
				}
				b.ResetTimer()
				ns, err := f.measure(checked, prog, p, repeat, Config{Calls: calls, CPU: -1})
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(ns, "ns/packet")
			})
		}
	}
}
