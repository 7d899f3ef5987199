package ipam

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	bolt "go.etcd.io/bbolt"
)

// fakeClock lets a test step through a cooldown without waiting for it.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func owner(id string) api.Owner {
	return api.Owner{Key: api.Key{ContainerID: id, IfName: "eth0"}, PodNamespace: "default", PodName: "pod-" + id}
}

func addrs(t *testing.T, ss ...string) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

// addrRange returns n consecutive addresses starting at first.
func addrRange(first string, n int) []netip.Addr {
	a := netip.MustParseAddr(first)
	out := make([]netip.Addr, n)
	for i := range out {
		out[i] = a
		a = a.Next()
	}
	return out
}

func openPool(t *testing.T, path string, opts Options, set []netip.Addr) *Pool {
	t.Helper()
	p, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() { _ = p.Close() })
	if set != nil {
		if err := p.SetAddresses(set); err != nil {
			t.Fatalf("SetAddresses: %v", err)
		}
	}
	return p
}

func mustAllocate(t *testing.T, p *Pool, id string) api.Allocation {
	t.Helper()
	a, existing, err := p.Allocate(owner(id))
	if err != nil {
		t.Fatalf("Allocate(%s): %v", id, err)
	}
	if existing {
		t.Fatalf("Allocate(%s): existing=true for a new key", id)
	}
	return a
}

func mustRelease(t *testing.T, p *Pool, id string) {
	t.Helper()
	released, err := p.Release(owner(id).Key)
	if err != nil {
		t.Fatalf("Release(%s): %v", id, err)
	}
	if !released {
		t.Fatalf("Release(%s): released=false for an allocated key", id)
	}
}

func statePath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "state.db")
}

func TestAllocateDistinctUntilExhausted(t *testing.T) {
	clock := newFakeClock()
	set := addrRange("10.0.0.10", 5)
	p := openPool(t, statePath(t), Options{Now: clock.Now}, set)

	seen := map[netip.Addr]string{}
	for i := range len(set) {
		id := fmt.Sprintf("c%d", i)
		a := mustAllocate(t, p, id)
		if prev, dup := seen[a.IP]; dup {
			t.Fatalf("%s got %s, already given to %s", id, a.IP, prev)
		}
		seen[a.IP] = id
		if a.Key != owner(id).Key || a.PodName != "pod-"+id {
			t.Errorf("allocation owner = %+v, want %+v", a.Owner, owner(id))
		}
		if !a.AllocatedAt.Equal(clock.Now()) {
			t.Errorf("AllocatedAt = %v, want the clock's %v", a.AllocatedAt, clock.Now())
		}
		if a.Gateway.IsValid() || a.MTU != 0 || a.VNetCIDRs != nil {
			t.Errorf("allocation fills the agent's fields: %+v", a)
		}
	}
	// Never-used addresses go out in address order.
	for i, ip := range set {
		if seen[ip] != fmt.Sprintf("c%d", i) {
			t.Errorf("%s went to %q, want c%d", ip, seen[ip], i)
		}
	}

	_, _, err := p.Allocate(owner("one-too-many"))
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate on a full pool: err = %v, want ErrExhausted", err)
	}
	if !strings.Contains(err.Error(), "pool of 5 addresses has 5 allocated and 0 cooling") {
		t.Errorf("exhausted message does not give size/used/cooling: %q", err)
	}
	if _, ok := p.Get(owner("one-too-many").Key); ok {
		t.Error("a failed Allocate left an allocation behind")
	}
}

func TestAllocateEmptyPool(t *testing.T) {
	p := openPool(t, statePath(t), Options{}, nil)
	_, _, err := p.Allocate(owner("a"))
	if !errors.Is(err, ErrExhausted) || !strings.Contains(err.Error(), "no addresses") {
		t.Fatalf("Allocate before SetAddresses: err = %v, want ErrExhausted saying the pool has no addresses", err)
	}
}

func TestAllocateRepeatReturnsSame(t *testing.T) {
	clock := newFakeClock()
	p := openPool(t, statePath(t), Options{Now: clock.Now}, addrRange("10.0.0.1", 4))
	first := mustAllocate(t, p, "a")
	mustAllocate(t, p, "b")
	clock.Advance(time.Minute)
	again, existing, err := p.Allocate(owner("a"))
	if err != nil {
		t.Fatal(err)
	}
	if !existing {
		t.Error("repeat Allocate: existing=false")
	}
	if again.IP != first.IP || !again.AllocatedAt.Equal(first.AllocatedAt) {
		t.Errorf("repeat Allocate = %s at %v, want the first %s at %v", again.IP, again.AllocatedAt, first.IP, first.AllocatedAt)
	}
	if n := len(p.Allocations()); n != 2 {
		t.Errorf("%d allocations after a repeat, want 2", n)
	}
	// The same container on a second interface is a different attachment.
	o := owner("a")
	o.IfName = "net1"
	second, existing, err := p.Allocate(o)
	if err != nil || existing || second.IP == first.IP {
		t.Errorf("Allocate(a/net1) = %s existing=%v err=%v, want a new address", second.IP, existing, err)
	}
}

func TestReleaseCooldownBlocksReuse(t *testing.T) {
	clock := newFakeClock()
	const cooldown = 30 * time.Second
	p := openPool(t, statePath(t), Options{Now: clock.Now, Cooldown: cooldown}, addrs(t, "10.0.0.1"))
	a := mustAllocate(t, p, "a")
	mustRelease(t, p, "a")
	releasedAt := clock.Now()

	if released, err := p.Release(owner("a").Key); err != nil || released {
		t.Errorf("second Release = %v, %v; want false, nil", released, err)
	}

	clock.Advance(cooldown - time.Nanosecond)
	_, _, err := p.Allocate(owner("b"))
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate during cooldown: err = %v, want ErrExhausted", err)
	}
	until := releasedAt.Add(cooldown)
	for _, want := range []string{"1 cooling", until.Format(time.RFC3339), "(in 1s)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("exhausted message %q lacks %q", err, want)
		}
	}
	st := p.State()
	if st.Cooling != 1 || st.Addresses[0].State != StateCooling || !st.Addresses[0].CoolingUntil.Equal(until) {
		t.Errorf("State during cooldown = %+v, want %s cooling until %v", st, a.IP, until)
	}

	clock.Advance(time.Nanosecond)
	b, existing, err := p.Allocate(owner("b"))
	if err != nil || existing || b.IP != a.IP {
		t.Fatalf("Allocate after cooldown = %s, %v, %v; want %s", b.IP, existing, err, a.IP)
	}
}

func TestCooldownDisabled(t *testing.T) {
	p := openPool(t, statePath(t), Options{Cooldown: -1}, addrs(t, "10.0.0.1"))
	mustAllocate(t, p, "a")
	mustRelease(t, p, "a")
	mustAllocate(t, p, "b")
}

func TestChoicePrefersNeverUsedThenLongestReleased(t *testing.T) {
	clock := newFakeClock()
	p := openPool(t, statePath(t), Options{Now: clock.Now, Cooldown: time.Second}, addrRange("10.0.0.1", 4))
	for _, id := range []string{"a", "b", "c"} { // .1 .2 .3
		mustAllocate(t, p, id)
	}
	mustRelease(t, p, "c") // .3 released first
	clock.Advance(time.Millisecond)
	mustRelease(t, p, "a") // .1 released later
	clock.Advance(time.Hour)

	want := []string{"10.0.0.4", "10.0.0.3", "10.0.0.1"} // never used, then oldest release
	for i, w := range want {
		got := mustAllocate(t, p, fmt.Sprintf("n%d", i))
		if got.IP.String() != w {
			t.Errorf("allocation %d got %s, want %s", i, got.IP, w)
		}
	}
}

func TestChoiceTiesBrokenByAddress(t *testing.T) {
	clock := newFakeClock()
	p := openPool(t, statePath(t), Options{Now: clock.Now, Cooldown: time.Second}, addrRange("10.0.0.1", 3))
	for _, id := range []string{"a", "b", "c"} {
		mustAllocate(t, p, id)
	}
	for _, id := range []string{"c", "b"} { // same instant
		mustRelease(t, p, id)
	}
	clock.Advance(time.Hour)
	if got := mustAllocate(t, p, "n"); got.IP.String() != "10.0.0.2" {
		t.Errorf("tie between .2 and .3 went to %s, want 10.0.0.2", got.IP)
	}
}

func TestAllocationsSurviveReopen(t *testing.T) {
	clock := newFakeClock()
	path := statePath(t)
	set := addrRange("10.0.0.1", 8)
	p := openPool(t, path, Options{Now: clock.Now}, set)
	var want []api.Allocation
	for i := range 5 {
		want = append(want, mustAllocate(t, p, fmt.Sprintf("c%d", i)))
	}
	mustRelease(t, p, "c2")
	want = append(want[:2], want[3:]...)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	q := openPool(t, path, Options{Now: clock.Now}, set)
	got := q.Allocations()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("after reopen:\n got  %v\n want %v", got, want)
	}
	for _, w := range want {
		a, existing, err := q.Allocate(w.Owner)
		if err != nil || !existing || a.IP != w.IP {
			t.Errorf("repeat ADD of %s after reopen = %s existing=%v err=%v, want %s", w.Key, a.IP, existing, err, w.IP)
		}
	}
	if _, ok := q.Get(owner("c2").Key); ok {
		t.Error("a released allocation came back after reopen")
	}
}

func TestCooldownSurvivesReopen(t *testing.T) {
	clock := newFakeClock()
	path := statePath(t)
	set := addrs(t, "10.0.0.1", "10.0.0.2")
	p := openPool(t, path, Options{Now: clock.Now}, set)
	mustAllocate(t, p, "a") // .1
	mustAllocate(t, p, "b") // .2
	mustRelease(t, p, "a")
	releasedAt := clock.Now()
	clock.Advance(10 * time.Second)
	mustRelease(t, p, "b")
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	q := openPool(t, path, Options{Now: clock.Now}, set)
	if _, _, err := q.Allocate(owner("c")); !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate after reopen within cooldown: err = %v, want ErrExhausted", err)
	}
	if st := q.State(); st.Cooling != 2 || !st.Addresses[0].CoolingUntil.Equal(releasedAt.Add(DefaultCooldown)) {
		t.Errorf("State after reopen = %+v, want both cooling, .1 until %v", st, releasedAt.Add(DefaultCooldown))
	}
	clock.Advance(DefaultCooldown - 10*time.Second)
	// .1 has cooled, .2 has 10s to go; the persisted release order decides.
	if got := mustAllocate(t, q, "c"); got.IP.String() != "10.0.0.1" {
		t.Errorf("first address after cooldown = %s, want 10.0.0.1", got.IP)
	}
}

func TestConcurrentAllocate(t *testing.T) {
	const n = 50
	p := openPool(t, statePath(t), Options{}, addrRange("10.1.0.1", n))
	type result struct {
		id     string
		ip     netip.Addr
		repeat netip.Addr
		err    error
	}
	results := make(chan result, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			r := result{id: fmt.Sprintf("c%d", i)}
			var a api.Allocation
			if a, _, r.err = p.Allocate(owner(r.id)); r.err == nil {
				r.ip = a.IP
				a, _, r.err = p.Allocate(owner(r.id))
				r.repeat = a.IP
			}
			_ = p.State() // readers run alongside writers
			results <- r
		})
	}
	close(start)
	wg.Wait()
	close(results)
	holder := map[netip.Addr]string{}
	for r := range results {
		if r.err != nil {
			t.Errorf("%s: %v", r.id, r.err)
			continue
		}
		if prev, dup := holder[r.ip]; dup {
			t.Errorf("%s and %s both got %s", prev, r.id, r.ip)
		}
		holder[r.ip] = r.id
		if r.repeat != r.ip {
			t.Errorf("%s: repeat got %s, first %s", r.id, r.repeat, r.ip)
		}
	}
	if len(holder) != n {
		t.Errorf("%d distinct addresses, want %d", len(holder), n)
	}
	if st := p.State(); st.Used != n || st.Free != 0 {
		t.Errorf("State after %d allocations: used %d free %d", n, st.Used, st.Free)
	}
}

func TestRestore(t *testing.T) {
	clock := newFakeClock()
	path := statePath(t)
	set := addrRange("10.0.0.1", 4)
	p := openPool(t, path, Options{Now: clock.Now}, set)
	a := mustAllocate(t, p, "a") // .1

	conflicting := api.Allocation{Owner: owner("x"), IP: a.IP}
	fine := api.Allocation{Owner: owner("y"), IP: netip.MustParseAddr("10.0.0.3")}
	err := p.Restore([]api.Allocation{fine, conflicting})
	if !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), a.Key.String()) {
		t.Fatalf("Restore of an address held by %s: err = %v, want ErrConflict naming the holder", a.Key, err)
	}
	if _, ok := p.Get(fine.Key); ok {
		t.Error("a refused Restore still inserted its other entry")
	}
	if got, _ := p.Get(a.Key); got.IP != a.IP {
		t.Errorf("refused Restore changed %s to %s", a.Key, got.IP)
	}

	// The same key with another address is a conflict too: a key has one address.
	moved := api.Allocation{Owner: owner("a"), IP: netip.MustParseAddr("10.0.0.4")}
	if err := p.Restore([]api.Allocation{moved}); !errors.Is(err, ErrConflict) {
		t.Errorf("Restore of %s with another address: err = %v, want ErrConflict", a.Key, err)
	}
	// Two entries of one call that disagree.
	twin := api.Allocation{Owner: owner("z"), IP: fine.IP}
	if err := p.Restore([]api.Allocation{fine, twin}); !errors.Is(err, ErrConflict) {
		t.Errorf("Restore of one address for two keys in one call: err = %v, want ErrConflict", err)
	}

	// Outside the set and with the agent's fields filled: kept, fields cleared.
	outside := api.Allocation{Owner: owner("w"), IP: netip.MustParseAddr("10.9.9.9"), MTU: 1500,
		Gateway: api.GatewayIP, AllocatedAt: clock.Now().Add(-time.Hour)}
	same := a // already present as given: skipped
	if err := p.Restore([]api.Allocation{fine, outside, same}); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	q := openPool(t, path, Options{Now: clock.Now}, set)
	got, ok := q.Get(fine.Key)
	if !ok || got.IP != fine.IP || !got.AllocatedAt.Equal(clock.Now()) {
		t.Errorf("restored %s after reopen = %+v, %v; want %s allocated now", fine.Key, got, ok, fine.IP)
	}
	got, ok = q.Get(outside.Key)
	if !ok || got.IP != outside.IP || got.MTU != 0 || got.Gateway.IsValid() || !got.AllocatedAt.Equal(outside.AllocatedAt) {
		t.Errorf("restored %s after reopen = %+v, %v", outside.Key, got, ok)
	}
	if n := len(q.Allocations()); n != 3 {
		t.Errorf("%d allocations, want 3", n)
	}
	// A restored address is never handed out again.
	for i := 0; ; i++ {
		b, _, err := q.Allocate(owner(fmt.Sprintf("n%d", i)))
		if errors.Is(err, ErrExhausted) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if b.IP == fine.IP || b.IP == a.IP {
			t.Fatalf("Allocate handed out %s, which is allocated", b.IP)
		}
	}
}

func TestSetAddressesShrinkKeepsAllocations(t *testing.T) {
	clock := newFakeClock()
	p := openPool(t, statePath(t), Options{Now: clock.Now}, addrRange("10.0.0.1", 4))
	a := mustAllocate(t, p, "a") // .1
	if err := p.SetAddresses(addrs(t, "10.0.0.3", "10.0.0.2")); err != nil {
		t.Fatal(err)
	}
	if got, ok := p.Get(a.Key); !ok || got.IP != a.IP {
		t.Fatalf("allocation on a removed address = %+v, %v; want kept", got, ok)
	}
	if s := p.Stranded(); len(s) != 1 || s[0].IP != a.IP {
		t.Errorf("Stranded = %v, want [%s]", s, a.IP)
	}
	st := p.State()
	if st.Size != 2 || st.Used != 0 || st.Free != 2 || len(st.Addresses) != 3 {
		t.Errorf("State = %+v, want size 2, 2 free, and 3 addresses listed", st)
	}
	if first := st.Addresses[0]; first.IP != a.IP || first.State != StateAllocated || first.Owner == nil || first.Owner.Key != a.Key {
		t.Errorf("stranded address in State = %+v, want %s allocated to %s", first, a.IP, a.Key)
	}

	got := map[string]bool{}
	for _, id := range []string{"b", "c"} {
		got[mustAllocate(t, p, id).IP.String()] = true
	}
	if !got["10.0.0.2"] || !got["10.0.0.3"] {
		t.Errorf("after shrinking, got %v, want .2 and .3", got)
	}
	_, _, err := p.Allocate(owner("d"))
	if !errors.Is(err, ErrExhausted) || !strings.Contains(err.Error(), "1 more allocations hold addresses no longer in the pool") {
		t.Errorf("Allocate with only removed addresses left: err = %v", err)
	}
	if again, existing, err := p.Allocate(owner("a")); err != nil || !existing || again.IP != a.IP {
		t.Errorf("repeat ADD of a stranded key = %s, %v, %v", again.IP, existing, err)
	}

	mustRelease(t, p, "a")
	clock.Advance(time.Hour)
	if _, _, err := p.Allocate(owner("d")); !errors.Is(err, ErrExhausted) {
		t.Errorf("a released address outside the set was handed out: err = %v", err)
	}
	// Growing back brings it in.
	if err := p.SetAddresses(addrRange("10.0.0.1", 3)); err != nil {
		t.Fatal(err)
	}
	if d := mustAllocate(t, p, "d"); d.IP != a.IP {
		t.Errorf("after growing back, got %s, want %s", d.IP, a.IP)
	}
	if err := p.SetAddresses([]netip.Addr{{}}); err == nil {
		t.Error("SetAddresses accepted the zero address")
	}
}

func TestStateAndAllocationsSorted(t *testing.T) {
	clock := newFakeClock()
	p := openPool(t, statePath(t), Options{Now: clock.Now}, addrRange("10.0.0.1", 12))
	// Restore a high address first, so that insertion order differs from address order.
	if err := p.Restore([]api.Allocation{{Owner: owner("r"), IP: netip.MustParseAddr("10.0.0.11")}}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b", "c"} {
		mustAllocate(t, p, id)
	}
	mustRelease(t, p, "b") // .2 cooling
	as := p.Allocations()
	var ips []string
	for _, a := range as {
		ips = append(ips, a.IP.String())
	}
	if got := strings.Join(ips, " "); got != "10.0.0.1 10.0.0.3 10.0.0.11" {
		t.Errorf("Allocations order = %s", got)
	}
	st := p.State()
	if st.Size != 12 || st.Used != 3 || st.Cooling != 1 || st.Free != 8 {
		t.Errorf("counts = size %d used %d cooling %d free %d", st.Size, st.Used, st.Cooling, st.Free)
	}
	wantStates := map[string]string{"10.0.0.1": StateAllocated, "10.0.0.2": StateCooling, "10.0.0.4": StateFree, "10.0.0.11": StateAllocated}
	for i, s := range st.Addresses {
		if i > 0 && st.Addresses[i-1].IP.Compare(s.IP) >= 0 {
			t.Errorf("State addresses out of order at %d: %s then %s", i, st.Addresses[i-1].IP, s.IP)
		}
		if w, ok := wantStates[s.IP.String()]; ok && s.State != w {
			t.Errorf("%s is %s, want %s", s.IP, s.State, w)
		}
		if (s.State == StateAllocated) != (s.Owner != nil) {
			t.Errorf("%s: state %s with owner %v", s.IP, s.State, s.Owner)
		}
	}
}

func TestInvalidKeys(t *testing.T) {
	p := openPool(t, statePath(t), Options{}, addrRange("10.0.0.1", 2))
	bad := []api.Key{{ContainerID: "", IfName: "eth0"}, {ContainerID: "c", IfName: ""}, {ContainerID: "c\x00d", IfName: "eth0"}}
	for _, k := range bad {
		if _, _, err := p.Allocate(api.Owner{Key: k}); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Allocate(%q): err = %v, want ErrInvalidKey", k, err)
		}
		if _, err := p.Release(k); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Release(%q): err = %v, want ErrInvalidKey", k, err)
		}
		if err := p.Restore([]api.Allocation{{Owner: api.Owner{Key: k}, IP: netip.MustParseAddr("10.0.0.1")}}); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Restore(%q): err = %v, want ErrInvalidKey", k, err)
		}
	}
	if err := p.Restore([]api.Allocation{{Owner: owner("a")}}); err == nil {
		t.Error("Restore without an address succeeded")
	}
	if n := len(p.Allocations()); n != 0 {
		t.Errorf("invalid calls left %d allocations", n)
	}
}

func TestClosedPool(t *testing.T) {
	p := openPool(t, statePath(t), Options{}, addrRange("10.0.0.1", 2))
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, _, err := p.Allocate(owner("a")); !errors.Is(err, ErrClosed) {
		t.Errorf("Allocate after Close: err = %v, want ErrClosed", err)
	}
	if _, err := p.Release(owner("a").Key); !errors.Is(err, ErrClosed) {
		t.Errorf("Release after Close: err = %v, want ErrClosed", err)
	}
}

func TestOpenCreatesDirectory(t *testing.T) {
	path := filepath.Join(t.TempDir(), "var", "lib", "vnetbpf", "state.db")
	p := openPool(t, path, Options{}, addrRange("10.0.0.1", 1))
	mustAllocate(t, p, "a")
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("state file: %v, mode %v; want it created with mode 0600", err, fi.Mode().Perm())
	}
}

func TestSecondOpenFailsFast(t *testing.T) {
	path := statePath(t)
	openPool(t, path, Options{}, nil)
	start := time.Now()
	q, err := Open(path, Options{LockTimeout: 200 * time.Millisecond})
	if err == nil {
		q.Close()
		t.Fatal("a second Open of a state file in use succeeded")
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("second Open took %s to fail", elapsed)
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "locked by another process") {
		t.Errorf("error %q does not name the file and the lock", err)
	}
}

func TestCorruptStateFile(t *testing.T) {
	// A real state file with a few allocations, to damage in different ways.
	valid := func(t *testing.T) string {
		path := statePath(t)
		p, err := Open(path, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := p.SetAddresses(addrRange("10.0.0.1", 300)); err != nil {
			t.Fatal(err)
		}
		for i := range 200 { // enough to spill the bucket over several pages
			mustAllocate(t, p, fmt.Sprintf("container-%03d-%s", i, strings.Repeat("x", 40)))
		}
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
		return path
	}
	damage := map[string]func(t *testing.T, path string){
		"not a bbolt file": func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte(strings.Repeat("this is not a database\n", 400)), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"truncated": func(t *testing.T, path string) {
			if err := os.Truncate(path, 100); err != nil {
				t.Fatal(err)
			}
		},
		"meta pages overwritten": func(t *testing.T, path string) {
			overwrite(t, path, 0, 2*os.Getpagesize())
		},
		"data pages overwritten": func(t *testing.T, path string) {
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			overwrite(t, path, 2*int64(os.Getpagesize()), int(fi.Size())-2*os.Getpagesize())
		},
		"tree pages overwritten, freelist intact": func(t *testing.T, path string) {
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			ps := os.Getpagesize()
			keep := map[int]bool{0: true, 1: true}
			for meta := range 2 { // the freelist page of both meta pages, with its overflow
				free := int(binary.LittleEndian.Uint64(data[meta*ps+48:]))
				if (free+1)*ps > len(data) {
					t.Fatalf("meta page %d names freelist page %d beyond the file", meta, free)
				}
				overflow := int(binary.LittleEndian.Uint32(data[free*ps+12:]))
				for i := free; i <= free+overflow; i++ {
					keep[i] = true
				}
			}
			damaged := 0
			for id := range len(data) / ps {
				if !keep[id] {
					overwrite(t, path, int64(id*ps), ps)
					damaged++
				}
			}
			if damaged == 0 {
				t.Fatal("no page to damage")
			}
		},
		"live page listed as free": func(t *testing.T, path string) {
			// bbolt would hand the page out again and overwrite live allocations: only a
			// consistency check of the whole file sees it.
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			ps := os.Getpagesize()
			for meta := range 2 {
				root := binary.LittleEndian.Uint64(data[meta*ps+32:])
				free := int(binary.LittleEndian.Uint64(data[meta*ps+48:]))
				page := data[free*ps : (free+1)*ps]
				binary.LittleEndian.PutUint16(page[10:], 1) // count
				binary.LittleEndian.PutUint32(page[12:], 0) // overflow
				binary.LittleEndian.PutUint64(page[16:], root)
			}
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"bad allocation value": func(t *testing.T, path string) {
			putRaw(t, path, bucketAllocations, []byte("c\x00eth0"), []byte("{not json"))
		},
		"bad release time": func(t *testing.T, path string) {
			putRaw(t, path, bucketReleased, []byte("10.0.0.1"), []byte("yesterday"))
		},
		"address held twice": func(t *testing.T, path string) {
			v := []byte(`{"containerID":"dup","ifName":"eth0","ip":"10.0.0.1"}`)
			putRaw(t, path, bucketAllocations, []byte("dup\x00eth0"), v)
		},
	}
	for name, f := range damage {
		t.Run(name, func(t *testing.T) {
			path := valid(t)
			f(t, path)
			p, err := Open(path, Options{})
			if err == nil {
				p.Close()
				t.Fatal("Open of a damaged state file succeeded")
			}
			t.Log(err)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "corrupt") {
				t.Errorf("error %q: want ErrCorrupt naming %s", err, path)
			}
		})
	}
}

// overwrite fills n bytes at off with a pattern no bbolt page starts with.
func overwrite(t *testing.T, path string, off int64, n int) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	junk := make([]byte, n)
	for i := range junk {
		junk[i] = byte(0xa5 ^ i)
	}
	if _, err := f.WriteAt(junk, off); err != nil {
		t.Fatal(err)
	}
}

// putRaw writes a value the pool would never write, as a bug or bit rot might.
func putRaw(t *testing.T, path string, bucket, k, v []byte) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Put(k, v) }); err != nil {
		t.Fatal(err)
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	path := statePath(t)
	p := openPool(t, path, Options{}, nil)
	p.Close()
	putRaw(t, path, bucketMeta, keySchema, []byte("2"))
	q, err := Open(path, Options{})
	if err == nil {
		q.Close()
		t.Fatal("Open of a file with an unknown schema succeeded")
	}
	if errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "schema") {
		t.Errorf("error %q: want a schema error, not ErrCorrupt", err)
	}
}

// TestFailedCommitChangesNothing pins the rule that memory follows the store: a change whose
// transaction fails must not show up in reads, or a caller would see an address that a
// restart forgets.
func TestFailedCommitChangesNothing(t *testing.T) {
	p := openPool(t, statePath(t), Options{}, addrRange("10.0.0.1", 4))
	a := mustAllocate(t, p, "a")
	if err := p.db.Close(); err != nil { // every later transaction fails
		t.Fatal(err)
	}
	if _, _, err := p.Allocate(owner("b")); err == nil {
		t.Fatal("Allocate succeeded without a store")
	}
	if _, ok := p.Get(owner("b").Key); ok {
		t.Error("an allocation whose commit failed is visible")
	}
	if released, err := p.Release(a.Key); err == nil || released {
		t.Errorf("Release without a store = %v, %v; want an error", released, err)
	}
	if got, ok := p.Get(a.Key); !ok || got.IP != a.IP {
		t.Error("a release whose commit failed is visible")
	}
	if err := p.Restore([]api.Allocation{{Owner: owner("c"), IP: netip.MustParseAddr("10.0.0.3")}}); err == nil {
		t.Error("Restore succeeded without a store")
	}
	if st := p.State(); st.Used != 1 || st.Cooling != 0 {
		t.Errorf("State after failed commits = used %d cooling %d, want 1 and 0", st.Used, st.Cooling)
	}
}

func TestWithdrawTakesOnlyFreeCooledAddresses(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	p, err := Open(filepath.Join(t.TempDir(), "state.db"), Options{Cooldown: time.Minute, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	addrs := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("10.0.0.4")}
	if err := p.SetAddresses(addrs); err != nil {
		t.Fatal(err)
	}
	used, _, err := p.Allocate(api.Owner{Key: api.Key{ContainerID: "a", IfName: "eth0"}})
	if err != nil {
		t.Fatal(err)
	}
	cool, _, err := p.Allocate(api.Owner{Key: api.Key{ContainerID: "b", IfName: "eth0"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Release(api.Key{ContainerID: "b", IfName: "eth0"}); err != nil {
		t.Fatal(err)
	}
	got, err := p.Withdraw(addrs, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || slices.Contains(got, used.IP) || slices.Contains(got, cool.IP) {
		t.Fatalf("withdrew %v: want the 2 addresses neither allocated (%s) nor cooling (%s)", got, used.IP, cool.IP)
	}
	st := p.State()
	if st.Size != 2 {
		t.Errorf("pool size %d after withdrawing 2 of 4, want 2", st.Size)
	}
	if _, _, err := p.Allocate(api.Owner{Key: api.Key{ContainerID: "c", IfName: "eth0"}}); !errors.Is(err, ErrExhausted) {
		t.Errorf("allocate after withdraw: %v, want ErrExhausted (withdrawn addresses are not handed out)", err)
	}
}
