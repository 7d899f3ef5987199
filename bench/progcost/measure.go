package progcost

import (
	"context"
	"errors"
	"fmt"
	"runtime"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/vnetbpf/vnetbpf/bench/stats"
	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// Config sets how much is measured.
type Config struct {
	// Rounds is how many times every path is measured; the paths (and the empty program)
	// are interleaved within a round, and the summary is over rounds.
	Rounds int
	// Calls is the number of BPF_PROG_TEST_RUN calls per path per round.
	Calls int
	// Repeat is the runs per call (at most MaxRepeat); branches that rewrite their frame into
	// another branch's run once per call and are compared with the empty program run once.
	Repeat uint32
	// CPU pins the measuring thread; -1 leaves it to the scheduler.
	CPU int
	// Progress, if set, is told about each round.
	Progress func(format string, args ...any)
	// Context, if set, stops the run between rounds when it is done.
	Context context.Context
}

// Measurement is one path at one map size.
type Measurement struct {
	Endpoints int `json:"endpoints"`
	// Ns is the kernel's time per run in nanoseconds: one sample per round, the mean over
	// that round's calls.
	Ns stats.Summary `json:"ns"`
	// Ratio is Ns over the empty program's in the same round, at the same repeat count.
	Ratio stats.Summary `json:"ratio"`
	// Own is Ns minus the empty program's in the same round: what the program's own
	// instructions and helpers cost, without the test-run loop.
	Own     stats.Summary `json:"ownNs"`
	Samples []float64     `json:"samples"`
}

// PathResult is one path at every map size.
type PathResult struct {
	Program string        `json:"program"`
	Name    string        `json:"name"`
	Reason  string        `json:"reason"`
	Repeat  uint32        `json:"repeat"`
	BySize  []Measurement `json:"bySize"`
	// Flatness is the median at the largest map over the median at the smallest.
	Flatness float64 `json:"flatness"`
}

// Result is a whole per-packet measurement.
type Result struct {
	Rounds int   `json:"rounds"`
	Calls  int   `json:"calls"`
	Sizes  []int `json:"sizes"`
	// Empty is the empty program at Repeat runs per call, EmptyOnce at one; one entry per
	// map size (the empty program uses no map: these show the spread between blocks).
	Empty     []Measurement `json:"empty"`
	EmptyOnce []Measurement `json:"emptyOnce"`
	Repeat    uint32        `json:"repeat"`
	Paths     []PathResult  `json:"paths"`
}

// Run measures every path of Paths on every instance of f.
func (f *Fixture) Run(cfg Config) (*Result, error) {
	if cfg.Repeat < 1 || cfg.Repeat > MaxRepeat {
		return nil, fmt.Errorf("repeat %d: want 1..%d", cfg.Repeat, MaxRepeat)
	}
	paths := Paths()
	res := &Result{Rounds: cfg.Rounds, Calls: cfg.Calls, Repeat: cfg.Repeat}
	type series struct{ ns, ratio, own []float64 }
	emptyR := make([]series, len(f.Instances))
	empty1 := make([]series, len(f.Instances))
	bySize := make([][]series, len(paths))
	for i := range bySize {
		bySize[i] = make([]series, len(f.Instances))
	}
	for _, inst := range f.Instances {
		res.Sizes = append(res.Sizes, inst.Endpoints)
	}

	baseFrame := paths[0].Frame
	for round := range cfg.Rounds {
		if cfg.Context != nil && cfg.Context.Err() != nil {
			return nil, cfg.Context.Err()
		}
		if cfg.Progress != nil {
			cfg.Progress("per-packet cost: round %d of %d", round+1, cfg.Rounds)
		}
		for si, inst := range f.Instances {
			eR, err := f.measure(nil, f.Empty, Path{Program: "empty", Frame: baseFrame}, cfg.Repeat, cfg)
			if err != nil {
				return nil, err
			}
			e1, err := f.measure(nil, f.Empty, Path{Program: "empty", Frame: baseFrame}, 1, cfg)
			if err != nil {
				return nil, err
			}
			emptyR[si].ns = append(emptyR[si].ns, eR)
			empty1[si].ns = append(empty1[si].ns, e1)
			// Rotate the order every round so that no path always follows the same one.
			for k := range paths {
				pi := (k + round) % len(paths)
				p := paths[pi]
				prog, err := inst.program(p.Program)
				if err != nil {
					return nil, err
				}
				repeat, base := cfg.Repeat, eR
				if p.Rewrites {
					repeat, base = 1, e1
				}
				v, err := f.measure(inst, prog, p, repeat, cfg)
				if err != nil {
					return nil, fmt.Errorf("%s with %d endpoints: %w", p.Label(), inst.Endpoints, err)
				}
				bySize[pi][si].ns = append(bySize[pi][si].ns, v)
				bySize[pi][si].ratio = append(bySize[pi][si].ratio, stats.Ratio(v, base))
				bySize[pi][si].own = append(bySize[pi][si].own, v-base)
			}
		}
	}
	for si, inst := range f.Instances {
		res.Empty = append(res.Empty, Measurement{Endpoints: inst.Endpoints, Ns: stats.Summarize(emptyR[si].ns), Samples: emptyR[si].ns})
		res.EmptyOnce = append(res.EmptyOnce, Measurement{Endpoints: inst.Endpoints, Ns: stats.Summarize(empty1[si].ns), Samples: empty1[si].ns})
	}
	for pi, p := range paths {
		pr := PathResult{Program: string(p.Program), Name: p.Name, Reason: loader.ReasonName(p.Reason), Repeat: cfg.Repeat}
		if p.Rewrites {
			pr.Repeat = 1
		}
		for si, inst := range f.Instances {
			s := bySize[pi][si]
			pr.BySize = append(pr.BySize, Measurement{Endpoints: inst.Endpoints, Ns: stats.Summarize(s.ns), Ratio: stats.Summarize(s.ratio),
				Own: stats.Summarize(s.own), Samples: s.ns})
		}
		if n := len(pr.BySize); n > 1 {
			pr.Flatness = stats.Ratio(pr.BySize[n-1].Ns.Median, pr.BySize[0].Ns.Median)
		}
		res.Paths = append(res.Paths, pr)
	}
	return res, nil
}

func (i *Instance) program(p loader.Program) (*ebpf.Program, error) {
	switch p {
	case loader.FromContainer:
		return i.DP.Objects.FromContainer, nil
	case loader.FromVNet:
		return i.DP.Objects.FromVnet, nil
	}
	return nil, fmt.Errorf("unknown program %q", p)
}

// measure runs prog on p's frame cfg.Calls times, repeat runs per call, in the namespace p
// needs, and returns the mean kernel time per run. With inst set it checks that every run
// returned p's verdict and was counted under p's reason and nothing else.
func (f *Fixture) measure(inst *Instance, prog *ebpf.Program, p Path, repeat uint32, cfg Config) (float64, error) {
	ifindex := f.idx.hA
	if p.Program == loader.FromVNet {
		ifindex = f.idx.nic
	}
	netns := f.plain
	if p.Forwarding {
		netns = f.fwd
	}
	var before map[maps.Reason]maps.Stat
	if inst != nil {
		var err error
		if before, err = inst.Maps.ReadStats(); err != nil {
			return 0, err
		}
	}
	drop := p.Verdict == actShot
	var total float64
	var n int
	err := netns.Do(func(ns.NetNS) error {
		ctx, err := testutils.SkbContext(ifindex)
		if err != nil {
			return err
		}
		restore, err := pin(cfg.CPU)
		if err != nil {
			return err
		}
		defer restore()
		for c := range cfg.Calls {
			verdict, d, err := testRun(prog, p.Frame, ctx, repeat)
			if errors.Is(err, errInterrupted) {
				continue
			}
			if err != nil {
				return err
			}
			if inst != nil && verdict != p.Verdict {
				return fmt.Errorf("verdict %d, want %d", verdict, p.Verdict)
			}
			total += float64(d)
			n++
			// Each call adds at most repeat events; the ring holds thousands.
			if drop && inst != nil && c%8 == 7 {
				if err := inst.drainEvents(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, fmt.Errorf("every one of %d calls was interrupted", cfg.Calls)
	}
	if inst != nil {
		if drop {
			if err := inst.drainEvents(); err != nil {
				return 0, err
			}
		}
		after, err := inst.Maps.ReadStats()
		if err != nil {
			return 0, err
		}
		if err := checkCounted(before, after, p.Reason, uint64(n)*uint64(repeat)); err != nil {
			return 0, err
		}
	}
	return total / float64(n), nil
}

// checkCounted fails unless reason counted at least want packets and no other reason
// counted any: every run took the branch being measured. (An interrupted call runs an
// unknown number of times, hence "at least".)
func checkCounted(before, after map[maps.Reason]maps.Stat, reason maps.Reason, want uint64) error {
	for r, s := range after {
		got := s.Packets - before[r].Packets
		switch {
		case r == reason && got < want:
			return fmt.Errorf("%s counted %d runs, want %d: some runs took another branch", loader.ReasonName(r), got, want)
		case r != reason && got != 0:
			return fmt.Errorf("%s counted %d runs, want 0 (the path is %s)", loader.ReasonName(r), got, loader.ReasonName(reason))
		}
	}
	return nil
}

// pin binds the calling (locked) thread to cpu and returns a function that restores its
// previous affinity, so the thread goes back to the Go scheduler as it came.
func pin(cpu int) (func(), error) {
	if cpu < 0 {
		return func() {}, nil
	}
	runtime.LockOSThread()
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("pin to CPU %d: %w", cpu, err)
	}
	return func() {
		unix.SchedSetaffinity(0, &old)
		runtime.UnlockOSThread()
	}, nil
}
