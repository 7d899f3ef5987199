package e2e

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// TestLoad puts 250 containers on one node, has each ping another for 60 s (2,500 packets a
// second in all), and restarts the agent with SIGKILL half way. Every ping must be answered
// (nothing is dropped but what the stats count, and nothing here should be dropped), and
// the agent's memory must not grow between the first and the second half. It takes about two
// minutes, so it runs only with VNETBPF_LOAD=1 (`make test-load`).
func TestLoad(t *testing.T) {
	if os.Getenv("VNETBPF_LOAD") == "" {
		t.Skip("set VNETBPF_LOAD=1 to run the 250-container load test (about two minutes)")
	}
	const n = 250
	duration := 60 * time.Second
	if d, err := time.ParseDuration(os.Getenv("VNETBPF_LOAD_DURATION")); err == nil {
		duration = d
	}
	c := newCluster(t, "10.0.4.0/23")
	cni := c.cni("1.1.0")
	ctrs := make([]*container, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 10)
	start := time.Now()
	for i := range ctrs {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			ctr, err := c.add(cni, fmt.Sprintf("load-%03d", i))
			if err != nil {
				t.Errorf("ADD %d: %v", i, err)
			}
			ctrs[i] = ctr
		}(i)
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d containers added in %s", n, time.Since(start).Round(time.Millisecond))

	before := c.counts()
	rss0 := rssKiB(t, c.agent.PID())
	count := int(duration / (100 * time.Millisecond))
	results := make([]int, n)
	errs := make([]error, n)
	for i := range ctrs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			peer := ctrs[(i+1)%n]
			results[i], errs[i] = Ping(ctrs[i].ns, peer.ip, count, 100*time.Millisecond, 2*time.Second)
		}(i)
	}
	time.Sleep(duration / 2)
	rssMid := rssKiB(t, c.agent.PID())
	must(t, c.agent.Kill())
	must(t, c.agent.Start())
	rssRestart := rssKiB(t, c.agent.PID())
	time.Sleep(duration / 4)
	rssEnd := rssKiB(t, c.agent.PID())
	wg.Wait()

	var sent, got int
	for i := range results {
		if errs[i] != nil {
			t.Errorf("pinger %d: %v", i, errs[i])
		}
		sent += count
		got += results[i]
	}
	after := c.counts()
	var drops uint64
	var dropDetail []string
	for _, r := range loader.Reasons() {
		name := loader.ReasonName(r)
		if strings.HasPrefix(name, "DROP_") && after[name] != before[name] {
			drops += after[name] - before[name]
			dropDetail = append(dropDetail, fmt.Sprintf("%s=%d", name, after[name]-before[name]))
		}
	}
	t.Logf("pings: %d sent, %d answered; datapath drops: %d %v; forwarded locally: %d",
		sent, got, drops, dropDetail, after["FWD_LOCAL"]-before["FWD_LOCAL"])
	t.Logf("agent RSS: %d KiB before traffic, %d KiB at half time, %d KiB after the restart, %d KiB at three quarters",
		rss0, rssMid, rssRestart, rssEnd)
	if uint64(sent-got) > drops {
		t.Errorf("%d pings unanswered, but the datapath counted only %d drops", sent-got, drops)
	}
	if got != sent {
		t.Errorf("%d of %d pings unanswered", sent-got, sent)
	}
	if rssEnd > rssRestart*3/2+4096 {
		t.Errorf("agent memory grew from %d KiB to %d KiB under steady load", rssRestart, rssEnd)
	}
	expectState(t, c, ctrs)
}

// rssKiB is a process's resident set size.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	must(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kib, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			must(t, err)
			return kib
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}
