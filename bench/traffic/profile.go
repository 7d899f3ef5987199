package traffic

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vnetbpf/vnetbpf/bench/topology"
)

// SymbolCost is one kernel or user symbol's share of a transaction.
type SymbolCost struct {
	Symbol string  `json:"symbol"`
	Ns     float64 `json:"nsPerTransaction"`
}

// RRProfile is where one pair's request/response transactions spend CPU time.
type RRProfile struct {
	Pair         string       `json:"pair"`
	Transactions float64      `json:"transactions"`
	NsTotal      float64      `json:"nsPerTransaction"`
	Symbols      []SymbolCost `json:"symbols"`
}

const profileHz = 10000

// ProfileRR runs qperf tcp_lat on p for d while `perf record` samples cpu (cpu-clock, 10 kHz),
// and charges the samples of the qperf processes and of ksoftirqd to symbols, in ns per
// transaction: samples × 100 µs / transactions.
func ProfileRR(ctx context.Context, p topology.Pair, cpu int, d time.Duration) (*RRProfile, error) {
	dir, err := os.MkdirTemp("", "vnetbpf-rr-profile-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	data := filepath.Join(dir, "perf.data")
	rec := exec.CommandContext(ctx, "perf", "record", "-q", "-e", "cpu-clock", "-F", strconv.Itoa(profileHz), "-C", strconv.Itoa(cpu),
		"-o", data, "--", "sleep", strconv.FormatFloat(d.Seconds()+1, 'f', 1, 64))
	var recOut bytes.Buffer
	rec.Stdout, rec.Stderr = &recOut, &recOut
	if err := rec.Start(); err != nil {
		return nil, fmt.Errorf("perf record: %w", err)
	}
	time.Sleep(300 * time.Millisecond) // perf is sampling before the traffic starts
	out, _, err := client(ctx, p.Client.NS, cpu, "qperf", p.Server.IP.String(), "--listen_port", strconv.Itoa(qperfPort),
		"-t", seconds(d), "-m", strconv.Itoa(MessageSize), "-vvs", "tcp_lat")
	recErr := rec.Wait()
	if err != nil {
		return nil, err
	}
	if recErr != nil {
		return nil, fmt.Errorf("perf record: %v: %s", recErr, recOut.String())
	}
	msgs := qperfValues(out)["loc_recv_msgs"]
	if msgs <= 0 {
		return nil, fmt.Errorf("qperf counted no transactions:\n%s", out)
	}
	script, err := exec.CommandContext(ctx, "perf", "script", "-i", data, "-F", "comm,ip,sym").Output()
	if err != nil {
		return nil, fmt.Errorf("perf script: %w", err)
	}
	counts := map[string]int{}
	total := 0
	sc := bufio.NewScanner(bytes.NewReader(script))
	want := fmt.Sprintf("ksoftirqd/%d", cpu)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 || (f[0] != "qperf" && f[0] != want) { // comm, ip, symbol
			continue
		}
		counts[f[len(f)-1]]++
		total++
	}
	per := 1e9 / profileHz / msgs
	prof := &RRProfile{Pair: p.Label(), Transactions: msgs, NsTotal: float64(total) * per}
	for sym, n := range counts {
		prof.Symbols = append(prof.Symbols, SymbolCost{Symbol: sym, Ns: float64(n) * per})
	}
	slices.SortFunc(prof.Symbols, func(a, b SymbolCost) int {
		switch {
		case a.Ns > b.Ns:
			return -1
		case a.Ns < b.Ns:
			return 1
		}
		return strings.Compare(a.Symbol, b.Symbol)
	})
	return prof, nil
}

// Diff is how much more each symbol costs per transaction in a than in base, largest first.
func Diff(a, base *RRProfile) []SymbolCost {
	m := map[string]float64{}
	for _, s := range a.Symbols {
		m[s.Symbol] += s.Ns
	}
	for _, s := range base.Symbols {
		m[s.Symbol] -= s.Ns
	}
	var out []SymbolCost
	for sym, ns := range m {
		out = append(out, SymbolCost{Symbol: sym, Ns: ns})
	}
	slices.SortFunc(out, func(x, y SymbolCost) int {
		switch {
		case x.Ns > y.Ns:
			return -1
		case x.Ns < y.Ns:
			return 1
		}
		return strings.Compare(x.Symbol, y.Symbol)
	})
	return out
}
