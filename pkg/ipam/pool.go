// Package ipam is the node's address pool: which of the addresses the node owns is given to
// which container interface, kept in a bbolt file so that a crash of the agent at any point
// neither loses nor doubles an address.
//
// The store is the truth. Every change is one bbolt transaction, fsync'ed on commit, and the
// in-memory index that answers reads is changed only after the commit succeeded; an
// allocation the caller has seen is therefore on disk, and one it has not seen either is not
// on disk or is found again by the retried request for the same key.
package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	bolt "go.etcd.io/bbolt"
)

// DefaultCooldown is how long a released address rests before reuse, so that peers' stale
// neighbour and conntrack entries for the old container age out before a new one answers.
const DefaultCooldown = 30 * time.Second

// DefaultLockTimeout is how long Open waits for another process to let go of the state
// file: short, because the other process is almost always a second agent started by
// mistake, and the person who did it should hear about it at once.
const DefaultLockTimeout = time.Second

// Values of api.AddressState.State, named here so the agent and its CLI compare against
// the same strings the pool writes.
const (
	// StateFree is an address Allocate may hand out now.
	StateFree = "free"
	// StateAllocated is an address a container holds.
	StateAllocated = "allocated"
	// StateCooling is a released address resting until CoolingUntil.
	StateCooling = "cooling"
)

var (
	// ErrExhausted means no address can be given now; the agent answers with CNI code 11
	// (try again later), since addresses cool down or the provider grows the pool.
	ErrExhausted = errors.New("no free address")
	// ErrConflict means Restore was asked to give an address or key a second owner.
	ErrConflict = errors.New("conflicting allocation")
	// ErrCorrupt means the state file cannot be trusted; the agent must not start on it.
	ErrCorrupt = errors.New("state file is corrupt")
	// ErrInvalidKey means a request named no container or interface, a caller's bug.
	ErrInvalidKey = errors.New("invalid attachment key")
	// ErrClosed means the pool was used after Close.
	ErrClosed = errors.New("address pool is closed")
)

// Options tunes a Pool; the zero value is the production setting.
type Options struct {
	// Cooldown is how long a released address rests before reuse. Zero means
	// DefaultCooldown; a negative value turns the cooldown off.
	Cooldown time.Duration
	// LockTimeout bounds the wait for the state file's lock. Zero means DefaultLockTimeout.
	LockTimeout time.Duration
	// Now replaces the clock, so tests can step through a cooldown. Nil means time.Now.
	Now func() time.Time
}

// Pool hands out the node's addresses. It is safe for concurrent use.
//
// Changes are serialised by writeMu, which is held across the bbolt transaction; the index
// is guarded by mu, which a change takes only to apply what has committed, so reads do not
// wait for a writer's fsync. A change may read the index without mu, since only the holder
// of writeMu ever modifies it.
type Pool struct {
	path     string
	cooldown time.Duration
	now      func() time.Time

	writeMu sync.Mutex
	mu      sync.RWMutex
	db      *bolt.DB // nil once closed
	addrs   []netip.Addr
	inSet   map[netip.Addr]bool
	byKey   map[api.Key]api.Allocation
	byIP    map[netip.Addr]api.Key
	// released holds when each address was last released. An address without an entry
	// has never been used and is preferred; the entry stays while the address is
	// allocated and is overwritten by the next release.
	released map[netip.Addr]time.Time
}

// Open opens the state file at path, creating it and its directory if needed, and loads
// the allocations and release times in it. The pool owns no addresses until SetAddresses,
// because which addresses the node has is the provider's to say, not the file's.
func Open(path string, opts Options) (*Pool, error) {
	p := &Pool{
		path:     path,
		cooldown: opts.Cooldown,
		now:      opts.Now,
		inSet:    map[netip.Addr]bool{},
		byKey:    map[api.Key]api.Allocation{},
		byIP:     map[netip.Addr]api.Key{},
		released: map[netip.Addr]time.Time{},
	}
	switch {
	case p.cooldown == 0:
		p.cooldown = DefaultCooldown
	case p.cooldown < 0:
		p.cooldown = 0
	}
	if p.now == nil {
		p.now = time.Now
	}
	lockTimeout := opts.LockTimeout
	if lockTimeout <= 0 {
		lockTimeout = DefaultLockTimeout
	}
	dir, created, err := ensureDir(path)
	if err != nil {
		return nil, err
	}
	if p.db, err = openBolt(path, lockTimeout); err != nil {
		return nil, err
	}
	if err := p.load(); err != nil {
		_ = p.db.Close()
		return nil, err
	}
	if created {
		if err := syncDir(dir); err != nil {
			_ = p.db.Close()
			return nil, fmt.Errorf("sync state directory %s: %w", dir, err)
		}
	}
	return p, nil
}

// Close releases the state file, so that the next agent can open it. Later calls that
// change the pool fail with ErrClosed; Close again is a no-op.
func (p *Pool) Close() error {
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.db == nil {
		return nil
	}
	err := p.db.Close()
	p.db = nil
	if err != nil {
		return fmt.Errorf("close state file %s: %w", p.path, err)
	}
	return nil
}

// Path is the state file, for messages and the agent's status.
func (p *Pool) Path() string { return p.path }

// SetAddresses replaces the set of addresses the pool may hand out, as the provider
// reports it. An allocation whose address leaves the set is kept, not dropped: a running
// container still uses it, and only its DEL may take it away. Stranded lists such
// allocations. The set lives in memory only; the provider is asked again after a restart.
func (p *Pool) SetAddresses(addrs []netip.Addr) error {
	set := make(map[netip.Addr]bool, len(addrs))
	for i, a := range addrs {
		if !a.IsValid() {
			return fmt.Errorf("set pool addresses: entry %d is not a valid address", i)
		}
		set[a.Unmap()] = true
	}
	sorted := make([]netip.Addr, 0, len(set))
	for a := range set {
		sorted = append(sorted, a)
	}
	slices.SortFunc(sorted, netip.Addr.Compare)

	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if p.db == nil {
		return ErrClosed
	}
	p.mu.Lock()
	p.addrs, p.inSet = sorted, set
	p.mu.Unlock()
	return nil
}

// Withdraw atomically takes up to n of candidates out of the set, choosing only addresses
// that are free and cooled down, and returns them: the provider can then give them back to
// the cloud without racing an allocation. On failure it hands them back with SetAddresses.
func (p *Pool) Withdraw(candidates []netip.Addr, n int) ([]netip.Addr, error) {
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if p.db == nil {
		return nil, ErrClosed
	}
	now := p.now()
	var out []netip.Addr
	for _, a := range candidates {
		if len(out) >= n {
			break
		}
		if !p.inSet[a] {
			continue
		}
		if _, taken := p.byIP[a]; taken {
			continue
		}
		if at, used := p.released[a]; used && p.cooling(at, now) {
			continue
		}
		out = append(out, a)
	}
	if len(out) == 0 {
		return nil, nil
	}
	drop := make(map[netip.Addr]bool, len(out))
	for _, a := range out {
		drop[a] = true
	}
	p.mu.Lock()
	kept := p.addrs[:0:0]
	set := make(map[netip.Addr]bool, len(p.addrs))
	for _, a := range p.addrs {
		if !drop[a] {
			kept = append(kept, a)
			set[a] = true
		}
	}
	p.addrs, p.inSet = kept, set
	p.mu.Unlock()
	return out, nil
}

// Allocate gives o's key an address. It is idempotent per key: a retried ADD, for example
// after the agent crashed before answering, gets the allocation that already exists and
// existing=true, even if its address has since left the set. Otherwise it picks a free
// address that is not cooling down: one never used if there is one, else the one released
// longest ago (so peers have had the most time to forget the old owner), ties broken by
// address, so the choice is deterministic. When none is left it returns an error wrapping
// ErrExhausted that says why and when the next address frees.
func (p *Pool) Allocate(o api.Owner) (api.Allocation, bool, error) {
	if err := validKey(o.Key); err != nil {
		return api.Allocation{}, false, err
	}
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if p.db == nil {
		return api.Allocation{}, false, ErrClosed
	}
	if a, ok := p.byKey[o.Key]; ok {
		return a, true, nil
	}
	now := p.now()
	ip, ok := p.pick(now)
	if !ok {
		return api.Allocation{}, false, p.exhausted(now)
	}
	a := api.Allocation{Owner: o, IP: ip, AllocatedAt: now.UTC().Round(0)}
	if err := p.db.Update(func(tx *bolt.Tx) error { return putAllocation(tx, a) }); err != nil {
		return api.Allocation{}, false, fmt.Errorf("store allocation of %s to %s: %w", ip, o.Key, err)
	}
	p.mu.Lock()
	p.byKey[o.Key] = a
	p.byIP[ip] = o.Key
	p.mu.Unlock()
	return a, false, nil
}

// pick chooses the address for a new allocation; the caller holds writeMu.
func (p *Pool) pick(now time.Time) (netip.Addr, bool) {
	var (
		best     netip.Addr
		bestAt   time.Time
		bestUsed bool
	)
	for _, a := range p.addrs { // sorted, so the first of equals wins
		if _, taken := p.byIP[a]; taken {
			continue
		}
		at, used := p.released[a]
		if !used {
			return a, true
		}
		if p.cooling(at, now) {
			continue
		}
		if !bestUsed || at.Before(bestAt) {
			best, bestAt, bestUsed = a, at, true
		}
	}
	return best, bestUsed
}

func (p *Pool) cooling(releasedAt, now time.Time) bool {
	return now.Before(releasedAt.Add(p.cooldown))
}

// exhausted explains an empty pool in terms an operator can act on: grow the pool, wait
// for the cooldown, or look for leaked allocations. The caller holds writeMu.
func (p *Pool) exhausted(now time.Time) error {
	if len(p.addrs) == 0 {
		return fmt.Errorf("%w: the pool has no addresses (the provider has supplied none)", ErrExhausted)
	}
	var used, cooling int
	var next time.Time
	for _, a := range p.addrs {
		if _, taken := p.byIP[a]; taken {
			used++
			continue
		}
		if at, ok := p.released[a]; ok && p.cooling(at, now) {
			cooling++
			if until := at.Add(p.cooldown); next.IsZero() || until.Before(next) {
				next = until
			}
		}
	}
	msg := fmt.Sprintf("pool of %d addresses has %d allocated and %d cooling down", len(p.addrs), used, cooling)
	if cooling > 0 {
		wait := (next.Sub(now) + time.Second - 1).Truncate(time.Second)
		msg += fmt.Sprintf("; the next one frees at %s (in %s)", next.UTC().Format(time.RFC3339), wait)
	}
	if stranded := len(p.byKey) - used; stranded > 0 {
		msg += fmt.Sprintf("; %d more allocations hold addresses no longer in the pool", stranded)
	}
	return fmt.Errorf("%w: %s", ErrExhausted, msg)
}

// Get returns the allocation of k, if any.
func (p *Pool) Get(k api.Key) (api.Allocation, bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	a, ok := p.byKey[k]
	return a, ok
}

// Release frees k's address, which then cools down before reuse. Releasing a key without
// an allocation succeeds with released=false, because DEL must be idempotent.
func (p *Pool) Release(k api.Key) (released bool, err error) {
	if err := validKey(k); err != nil {
		return false, err
	}
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if p.db == nil {
		return false, ErrClosed
	}
	a, ok := p.byKey[k]
	if !ok {
		return false, nil
	}
	now := p.now().UTC().Round(0)
	err = p.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketAllocations).Delete(storeKey(k)); err != nil {
			return err
		}
		return putReleased(tx, a.IP, now)
	})
	if err != nil {
		return false, fmt.Errorf("store release of %s by %s: %w", a.IP, k, err)
	}
	p.mu.Lock()
	delete(p.byKey, k)
	delete(p.byIP, a.IP)
	p.released[a.IP] = now
	p.mu.Unlock()
	return true, nil
}

// Restore re-inserts allocations known from elsewhere, such as the datapath's endpoints
// map after the state file was lost; the address may be outside the set or cooling, since
// a container already uses it. It is all or nothing, in one transaction: an address held
// by another key, a key holding another address, or two entries that disagree fail the
// whole call with ErrConflict. Entries already present as given are skipped. Gateway, MTU
// and VNetCIDRs are cleared, as Allocate leaves them to the agent; a zero AllocatedAt
// becomes now.
func (p *Pool) Restore(allocs []api.Allocation) error {
	for _, a := range allocs {
		if err := validKey(a.Key); err != nil {
			return fmt.Errorf("restore: %w", err)
		}
		if !a.IP.IsValid() {
			return fmt.Errorf("restore %s: no address", a.Key)
		}
	}
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if p.db == nil {
		return ErrClosed
	}
	now := p.now().UTC().Round(0)
	batchByIP := map[netip.Addr]api.Key{}
	batchByKey := map[api.Key]netip.Addr{}
	var add []api.Allocation
	for _, a := range allocs {
		ip := a.IP.Unmap()
		if holder, ok := p.byIP[ip]; ok && holder != a.Key {
			return fmt.Errorf("restore %s for %s: %w: the address is held by %s", ip, a.Key, ErrConflict, holder)
		}
		if holder, ok := batchByIP[ip]; ok && holder != a.Key {
			return fmt.Errorf("restore %s for %s: %w: the same call restores it for %s", ip, a.Key, ErrConflict, holder)
		}
		if cur, ok := p.byKey[a.Key]; ok {
			if cur.IP != ip {
				return fmt.Errorf("restore %s for %s: %w: the key holds %s", ip, a.Key, ErrConflict, cur.IP)
			}
			continue
		}
		if other, ok := batchByKey[a.Key]; ok {
			if other != ip {
				return fmt.Errorf("restore %s for %s: %w: the same call restores %s for it", ip, a.Key, ErrConflict, other)
			}
			continue
		}
		batchByIP[ip], batchByKey[a.Key] = a.Key, ip
		r := api.Allocation{Owner: a.Owner, IP: ip, AllocatedAt: a.AllocatedAt.UTC().Round(0)}
		if r.AllocatedAt.IsZero() {
			r.AllocatedAt = now
		}
		add = append(add, r)
	}
	if len(add) == 0 {
		return nil
	}
	err := p.db.Update(func(tx *bolt.Tx) error {
		for _, a := range add {
			if err := putAllocation(tx, a); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store %d restored allocations: %w", len(add), err)
	}
	p.mu.Lock()
	for _, a := range add {
		p.byKey[a.Key] = a
		p.byIP[a.IP] = a.Key
	}
	p.mu.Unlock()
	return nil
}

// Allocations returns every allocation, sorted by address, including stranded ones.
func (p *Pool) Allocations() []api.Allocation {
	p.mu.RLock()
	out := make([]api.Allocation, 0, len(p.byKey))
	for _, a := range p.byKey {
		out = append(out, a)
	}
	p.mu.RUnlock()
	sortByIP(out)
	return out
}

// Stranded returns the allocations whose address is no longer in the set, sorted by
// address: containers that keep an address the provider has taken away (or not yet
// reported since a restart), which the agent should report.
func (p *Pool) Stranded() []api.Allocation {
	p.mu.RLock()
	var out []api.Allocation
	for _, a := range p.byKey {
		if !p.inSet[a.IP] {
			out = append(out, a)
		}
	}
	p.mu.RUnlock()
	sortByIP(out)
	return out
}

// State describes every address of the pool, sorted by address. Size, Used, Free and
// Cooling count the set only (Size = Used + Free + Cooling); stranded allocations are
// listed in Addresses as allocated too, so no address in use is hidden, but not counted.
// Provider is left for the caller, who knows which provider fed the pool.
func (p *Pool) State() api.PoolState {
	now := p.now()
	p.mu.RLock()
	defer p.mu.RUnlock()
	st := api.PoolState{Size: len(p.addrs), Addresses: make([]api.AddressState, 0, len(p.addrs))}
	for _, ip := range p.addrs {
		s := api.AddressState{IP: ip}
		if k, ok := p.byIP[ip]; ok {
			owner := p.byKey[k].Owner
			s.State, s.Owner = StateAllocated, &owner
			st.Used++
		} else if at, ok := p.released[ip]; ok && p.cooling(at, now) {
			s.State, s.CoolingUntil = StateCooling, at.Add(p.cooldown)
			st.Cooling++
		} else {
			s.State = StateFree
			st.Free++
		}
		st.Addresses = append(st.Addresses, s)
	}
	stranded := false
	for _, a := range p.byKey {
		if !p.inSet[a.IP] {
			owner := a.Owner
			st.Addresses = append(st.Addresses, api.AddressState{IP: a.IP, State: StateAllocated, Owner: &owner})
			stranded = true
		}
	}
	if stranded {
		slices.SortFunc(st.Addresses, func(x, y api.AddressState) int { return x.IP.Compare(y.IP) })
	}
	return st
}

func sortByIP(as []api.Allocation) {
	slices.SortFunc(as, func(x, y api.Allocation) int { return x.IP.Compare(y.IP) })
}

func validKey(k api.Key) error {
	switch {
	case k.ContainerID == "":
		return fmt.Errorf("%w: empty container ID", ErrInvalidKey)
	case k.IfName == "":
		return fmt.Errorf("%w: empty interface name for container %s", ErrInvalidKey, k.ContainerID)
	case strings.ContainsRune(k.ContainerID, 0), strings.ContainsRune(k.IfName, 0):
		return fmt.Errorf("%w: NUL in %q", ErrInvalidKey, k.String())
	}
	return nil
}
