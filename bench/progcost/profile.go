package progcost

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// Share is part of a profile: samples that fell on one symbol or source line.
type Share struct {
	Name    string  `json:"name"`
	Samples int     `json:"samples"`
	Percent float64 `json:"percent"`
}

// Profile is where one path spends its time: kernel symbols (the program, the helpers and
// the test-run loop) and, inside the program, the bpf/datapath.c lines.
type Profile struct {
	Path      string `json:"path"`
	Endpoints int    `json:"endpoints"`
	Samples   int    `json:"samples"`
	// NsPerRun is measured before sampling starts; the shares are of that. (The timer
	// interrupts of sampling at 20 kHz add some 30 % to each run, and no sample sees them.)
	NsPerRun        float64 `json:"nsPerRun"`
	NsPerRunSampled float64 `json:"nsPerRunSampled"`
	Symbols         []Share `json:"symbols"`
	Lines           []Share `json:"lines"`
}

// ProfilePath runs p on inst in a loop on cpu for d while `perf record` samples that CPU
// (cpu-clock: this machine has no hardware counters), and attributes the samples of the
// measuring thread. Inside the program a sample is charged to the source line whose JITed
// code holds its address; a timer sample lands just after the instruction that was running,
// so read the lines as "this statement or the one before".
func (f *Fixture) ProfilePath(inst *Instance, p Path, d time.Duration, cpu int) (*Profile, error) {
	if _, err := exec.LookPath("perf"); err != nil {
		return nil, fmt.Errorf("perf is not installed (apt-get install linux-perf): %w", err)
	}
	prog, err := inst.program(p.Program)
	if err != nil {
		return nil, err
	}
	lines, err := newLineMap(prog)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "vnetbpf-profile-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	data := filepath.Join(dir, "perf.data")

	repeat := uint32(MaxRepeat)
	if p.Rewrites {
		repeat = 1
	}
	var stop atomic.Bool
	var tid atomic.Int64
	var runs, total, baseline float64
	done := make(chan error, 1)
	go func() {
		netns := f.plain
		if p.Forwarding {
			netns = f.fwd
		}
		ifindex := f.idx.hA
		if p.Program == loader.FromVNet {
			ifindex = f.idx.nic
		}
		done <- netns.Do(func(ns.NetNS) error {
			ctx, err := testutils.SkbContext(ifindex)
			if err != nil {
				return err
			}
			restore, err := pin(cpu)
			if err != nil {
				return err
			}
			defer restore()
			for i := 0; !stop.Load(); i++ {
				if i == 2000 { // unsampled so far: the cost without perf's interrupts
					baseline, total, runs = total/runs, 0, 0
					tid.Store(int64(unix.Gettid()))
				}
				_, d, err := testRun(prog, p.Frame, ctx, repeat)
				if errors.Is(err, errInterrupted) {
					continue
				}
				if err != nil {
					return err
				}
				total += float64(d)
				runs++
				if p.Verdict == actShot && i%8 == 7 {
					if err := inst.drainEvents(); err != nil {
						return err
					}
				}
			}
			return nil
		})
	}()
	for tid.Load() == 0 {
		select {
		case err := <-done:
			return nil, err
		case <-time.After(time.Millisecond):
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	defer cancel()
	rec := exec.CommandContext(ctx, "perf", "record", "-q", "-e", "cpu-clock", "-F", "20000", "-C", strconv.Itoa(cpu),
		"-o", data, "--", "sleep", strconv.FormatFloat(d.Seconds(), 'f', 3, 64))
	out, recErr := rec.CombinedOutput()
	stop.Store(true)
	if err := <-done; err != nil {
		return nil, err
	}
	if recErr != nil {
		return nil, fmt.Errorf("perf record: %v\n%s", recErr, out)
	}
	script, err := exec.CommandContext(ctx, "perf", "script", "-i", data, "-F", "tid,ip,sym,symoff,dso").Output()
	if err != nil {
		return nil, fmt.Errorf("perf script: %w", err)
	}
	prof := &Profile{Path: p.Label(), Endpoints: inst.Endpoints, NsPerRun: baseline}
	if runs > 0 {
		prof.NsPerRunSampled = total / runs
	}
	symbols := map[string]int{}
	byLine := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(script))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 { // tid, ip, sym+offset, (dso)
			continue
		}
		if t, err := strconv.ParseInt(fields[0], 10, 64); err != nil || t != tid.Load() {
			continue
		}
		// Only the kernel's samples: the thread's user-space work (draining drop events
		// between calls) is outside the time the kernel reports per run.
		if dso := fields[len(fields)-1]; !strings.Contains(dso, "kernel.kallsyms") && !strings.HasPrefix(dso, "(bpf_prog_") {
			continue
		}
		prof.Samples++
		sym, off, _ := strings.Cut(fields[2], "+0x")
		if strings.HasPrefix(sym, "bpf_prog_") {
			name := sym[strings.LastIndex(sym, "_")+1:]
			symbols["BPF program "+name+" (its own instructions)"]++
			if o, err := strconv.ParseUint(off, 16, 64); err == nil && strings.HasSuffix(sym, lines.name) {
				byLine[lines.at(o)]++
			}
			continue
		}
		symbols[sym]++
	}
	prof.Symbols = shares(symbols, prof.Samples)
	prof.Lines = shares(byLine, prof.Samples)
	return prof, nil
}

func shares(m map[string]int, total int) []Share {
	var out []Share
	for k, v := range m {
		out = append(out, Share{Name: k, Samples: v, Percent: 100 * float64(v) / float64(max(total, 1))})
	}
	slices.SortFunc(out, func(a, b Share) int { return b.Samples - a.Samples })
	return out
}

// lineMap finds the source line of an offset into a program's JITed code.
type lineMap struct {
	name  string
	offs  []uint64 // start of each line's JITed code, ascending
	texts []string
}

func newLineMap(prog *ebpf.Program) (*lineMap, error) {
	info, err := prog.Info()
	if err != nil {
		return nil, err
	}
	lm := &lineMap{name: info.Name}
	lis, err := info.LineInfos()
	if err != nil {
		return lm, nil // no BTF line info: symbols only
	}
	jited, ok1 := info.JitedLineInfos()
	ksyms, ok2 := info.JitedKsymAddrs()
	if !ok1 || !ok2 || len(jited) != len(lis) || len(ksyms) == 0 {
		return lm, nil
	}
	base := uint64(ksyms[0])
	type entry struct {
		off  uint64
		text string
	}
	entries := make([]entry, 0, len(lis))
	for i, li := range lis {
		line := li.Line
		text := fmt.Sprintf("%s:%d  %s", filepath.Base(line.FileName()), line.LineNumber(), strings.TrimSpace(line.Line()))
		entries = append(entries, entry{off: jited[i] - base, text: text})
	}
	slices.SortStableFunc(entries, func(a, b entry) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
	for _, e := range entries {
		lm.offs = append(lm.offs, e.off)
		lm.texts = append(lm.texts, e.text)
	}
	return lm, nil
}

func (lm *lineMap) at(off uint64) string {
	i, found := slices.BinarySearch(lm.offs, off)
	if !found {
		i--
	}
	if i < 0 || i >= len(lm.texts) {
		return fmt.Sprintf("+0x%x (no line info)", off)
	}
	return lm.texts[i]
}
