package ipam

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// The crash test re-runs the test binary as a child that allocates and releases in a loop
// and reports each call that returned; the parent SIGKILLs it at a random moment and then
// checks the state file against the reports.
const (
	crashChildEnv = "VNETBPF_IPAM_CRASH_CHILD" // the state file; set only in the child
	crashRunEnv   = "VNETBPF_IPAM_CRASH_RUN"   // makes each run's keys distinct
	crashPool     = "10.20.0.0/16"
)

// crashCooldown is long enough that nothing released in the test is handed out again, so a
// released address must still be cooling when the parent looks.
const crashCooldown = 24 * time.Hour

func TestCrashSafety(t *testing.T) {
	if path := os.Getenv(crashChildEnv); path != "" {
		crashChild(path, os.Getenv(crashRunEnv))
		return
	}
	if testing.Short() {
		t.Skip("re-executes the test binary several times")
	}
	path := statePath(t)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0))
	present := map[api.Key]netip.Addr{} // reported allocated and never released
	gone := map[api.Key]netip.Addr{}    // reported released
	const runs = 8
	for run := range runs {
		killAfter := 1 + rng.IntN(400)
		jitter := time.Duration(rng.IntN(3000)) * time.Microsecond
		reports := runCrashChild(t, path, run, killAfter, jitter)
		t.Logf("run %d: killed after %d reports (+%s), %d reported in all", run, killAfter, jitter, len(reports))
		for _, r := range reports {
			switch r.op {
			case "A?", "R?": // in flight when killed, maybe: either outcome is allowed
			case "A":
				present[r.key] = r.ip
			case "R":
				ip, ok := present[r.key]
				if !ok {
					t.Fatalf("child released %s, which it never reported allocated", r.key)
				}
				delete(present, r.key)
				gone[r.key] = ip
			}
		}
		// A release that was in flight may or may not have happened.
		for _, r := range reports {
			if r.op == "R?" && !hasReport(reports, "R", r.key) {
				delete(present, r.key)
			}
		}
		checkAfterCrash(t, path, present, gone)
		if t.Failed() {
			t.Fatalf("state after run %d (killed after %d reports) is wrong", run, killAfter)
		}
	}
	if len(present) == 0 {
		t.Fatal("no child reported an allocation; the test checked nothing")
	}
}

type crashReport struct {
	op  string
	key api.Key
	ip  netip.Addr
}

func hasReport(rs []crashReport, op string, k api.Key) bool {
	for _, r := range rs {
		if r.op == op && r.key == k {
			return true
		}
	}
	return false
}

// runCrashChild starts the child, SIGKILLs it once it has made killAfter reports (plus
// jitter, so that the kill lands anywhere in the next call), and returns every report,
// including those written between the decision and the kill.
func runCrashChild(t *testing.T, path string, run, killAfter int, jitter time.Duration) []crashReport {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashSafety$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+path, crashRunEnv+"="+strconv.Itoa(run))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	kill := func() {
		if !killed {
			killed = true
			_ = cmd.Process.Kill()
		}
	}
	defer kill()

	var reports []crashReport
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) < 3 || !strings.HasPrefix(line, "A") && !strings.HasPrefix(line, "R") {
			continue // test framework output
		}
		r := crashReport{op: fields[0], key: api.Key{ContainerID: fields[1], IfName: fields[2]}}
		if r.op == "A" {
			if r.ip, err = netip.ParseAddr(fields[3]); err != nil {
				t.Fatalf("child report %q: %v", line, err)
			}
		}
		reports = append(reports, r)
		if len(reports) == killAfter {
			time.Sleep(jitter) // not a wait for a condition: it moves the kill to a random point
			kill()
		}
	}
	err = cmd.Wait()
	var exit *exec.ExitError
	if !killed || !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child ended by itself after %d reports (%v), not by our kill; stderr:\n%s", len(reports), err, stderr.String())
	}
	return reports
}

// checkAfterCrash reopens the state file as the restarted agent would.
func checkAfterCrash(t *testing.T, path string, present, gone map[api.Key]netip.Addr) {
	t.Helper()
	p, err := Open(path, Options{Cooldown: crashCooldown})
	if err != nil {
		t.Fatalf("reopen after SIGKILL: %v", err)
	}
	defer p.Close()
	holder := map[netip.Addr]api.Key{}
	for _, a := range p.Allocations() {
		if prev, dup := holder[a.IP]; dup {
			t.Errorf("%s is held by both %s and %s", a.IP, prev, a.Key)
		}
		holder[a.IP] = a.Key
	}
	s, err := NewStatic([]string{crashPool})
	if err != nil {
		t.Fatal(err)
	}
	set, _ := s.Addresses(context.Background())
	if err := p.SetAddresses(set); err != nil {
		t.Fatal(err)
	}
	for k, ip := range present {
		// The retried ADD of a container whose ADD was answered gets the same address.
		a, existing, err := p.Allocate(api.Owner{Key: k})
		if err != nil || !existing || a.IP != ip {
			t.Errorf("repeat ADD of %s after the crash = %s existing=%v err=%v; the child was given %s", k, a.IP, existing, err, ip)
		}
	}
	cooling := map[netip.Addr]bool{}
	for _, s := range p.State().Addresses {
		cooling[s.IP] = s.State == StateCooling
	}
	for k, ip := range gone {
		if a, ok := p.Get(k); ok {
			t.Errorf("%s was reported released, but holds %s after the crash", k, a.IP)
		}
		if !cooling[ip] {
			t.Errorf("%s, released by %s, is not cooling down after the crash", ip, k)
		}
	}
}

// crashChild allocates and releases until it is killed, writing a line before each call
// ("A?"/"R?") and after each call returned ("A key ip"/"R key"), so the parent knows which
// results were handed out. It exits non-zero on any error, which fails the parent.
func crashChild(path, run string) {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "crash child:", err)
		os.Exit(3)
	}
	p, err := Open(path, Options{Cooldown: crashCooldown})
	if err != nil {
		fail(err)
	}
	s, err := NewStatic([]string{crashPool})
	if err != nil {
		fail(err)
	}
	addrs, _ := s.Addresses(context.Background())
	if err := p.SetAddresses(addrs); err != nil {
		fail(err)
	}
	out := bufio.NewWriter(os.Stdout)
	report := func(format string, args ...any) {
		fmt.Fprintf(out, format+"\n", args...)
		if err := out.Flush(); err != nil { // unbuffered, so a report is out before the next call
			fail(err)
		}
	}
	for i := 0; ; i++ {
		k := api.Key{ContainerID: fmt.Sprintf("run%s-c%d", run, i), IfName: "eth0"}
		report("A? %s %s", k.ContainerID, k.IfName)
		a, _, err := p.Allocate(api.Owner{Key: k})
		if err != nil {
			fail(err)
		}
		report("A %s %s %s", k.ContainerID, k.IfName, a.IP)
		if i%3 == 2 { // release one of every three, so releases are killed mid-way too
			k := api.Key{ContainerID: fmt.Sprintf("run%s-c%d", run, i-1), IfName: "eth0"}
			report("R? %s %s", k.ContainerID, k.IfName)
			if _, err := p.Release(k); err != nil {
				fail(err)
			}
			report("R %s %s", k.ContainerID, k.IfName)
		}
	}
}
