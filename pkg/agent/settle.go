package agent

import (
	"context"
	"maps"
	"net/http"
	"slices"
	"sync/atomic"
	"time"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// Work that holds the kernel's RTNL lock across an RCU grace period (8 to 15 ms measured)
// is kept off the CNI path and done while no CNI request is in flight:
//   - settling: moving a new endpoint's from_container from the cls_bpf filter it got at ADD
//     to a TCX link (attachMode auto), which costs about 70 ns less per packet;
//   - reaping: dropping the TCX link pin of a removed endpoint. Closing the link while its
//     veth exists waits for a grace period; once the CNI plugin has deleted the veth (right
//     after the agent forgot it) it costs nothing.
const (
	// quietFor is how long no CNI request may have run before a step starts. One step holds
	// RTNL for one grace period, so a request arriving during it waits at most that long.
	quietFor = 100 * time.Millisecond
	// reapAfter is how long a removed endpoint's veth may outlive it before its link is
	// closed anyway (a DEL whose plugin could not delete the veth).
	reapAfter  = 10 * time.Second
	settleTick = 50 * time.Millisecond
	// addingFor is how long an ADD counts as running between its two calls (the address,
	// then the endpoint), while the plugin builds the veth and the namespace, work that takes
	// the RTNL lock too. One whose plugin died stops counting after it.
	addingFor = 5 * time.Second
)

// settler tracks CNI requests and the pending work. Its maps are guarded by Agent.mu.
type settler struct {
	inflight atomic.Int32
	lastDone atomic.Int64 // unix nanoseconds at which the last CNI request ended
	wake     chan struct{}

	unsettled map[string]bool       // host veths on cls_bpf that TCX should take over
	reap      map[string]time.Time  // link pins of removed endpoints, and when removed
	adding    map[api.Key]time.Time // ADDs between their address and their endpoint
}

func newSettler() *settler {
	return &settler{wake: make(chan struct{}, 1), unsettled: map[string]bool{}, reap: map[string]time.Time{},
		adding: map[api.Key]time.Time{}}
}

// track wraps a CNI API handler so that the settler knows when the node is quiet.
func (s *settler) track(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.inflight.Add(1)
		defer func() {
			s.lastDone.Store(time.Now().UnixNano())
			s.inflight.Add(-1)
			s.poke()
		}()
		h.ServeHTTP(w, r)
	})
}

func (s *settler) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *settler) quiet(now time.Time) bool {
	return s.inflight.Load() == 0 && now.Sub(time.Unix(0, s.lastDone.Load())) >= quietFor
}

// noteAttached records how an endpoint's veth was attached: one left on cls_bpf in
// attachMode auto waits for settling.
func (a *Agent) noteAttached(veth string, mode loader.Mode) {
	delete(a.settle.reap, veth)
	if mode == loader.ModeTC && a.dp.EndpointMode() == loader.ModeAuto && !a.dp.TCXUnsupported() {
		a.settle.unsettled[veth] = true
		a.settle.poke()
	}
}

// noteRemoved records a removed endpoint's veth, whose TCX link pin (if any) is reaped later.
func (a *Agent) noteRemoved(veth string) {
	delete(a.settle.unsettled, veth)
	a.settle.reap[veth] = time.Now()
	a.settle.poke()
}

// runSettler does one step at a time while the node is quiet, until ctx ends.
func (a *Agent) runSettler(ctx context.Context) {
	t := time.NewTicker(settleTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.settle.wake:
		}
		for ctx.Err() == nil && a.settle.quiet(time.Now()) && a.settleStep(time.Now()) {
		}
	}
}

// settleStep does one piece of pending work and says whether there was any. It does none
// while an ADD is between its two calls.
func (a *Agent) settleStep(now time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, since := range a.settle.adding {
		if now.Sub(since) < addingFor {
			return false
		}
		delete(a.settle.adding, k)
	}
	// Reaping first: a gone veth costs nothing, and its name may come back with a new ADD.
	for _, veth := range slices.Sorted(maps.Keys(a.settle.reap)) {
		gone := !linkExists(veth)
		if !gone && now.Sub(a.settle.reap[veth]) < reapAfter {
			continue
		}
		delete(a.settle.reap, veth)
		if err := a.dp.Detach(veth); err != nil {
			a.log.Warn("cannot remove a removed endpoint's attachment", "veth", veth, "err", err)
		}
		return true
	}
	for _, veth := range slices.Sorted(maps.Keys(a.settle.unsettled)) {
		delete(a.settle.unsettled, veth)
		start := time.Now()
		mode, err := a.dp.AttachEndpoint(veth, true)
		switch {
		case err == nil && mode == loader.ModeTCX:
			a.log.Debug("endpoint moved to TCX", "veth", veth, "took", time.Since(start).String())
		case err == nil:
			a.log.Info("the kernel has no TCX; endpoints stay on cls_bpf filters")
			clear(a.settle.unsettled)
		case !linkExists(veth):
			// Deleted in between: nothing to settle.
		default:
			// The error says which step failed: the TCX attach (the filter stays), or
			// removing the filter or the empty clsact afterwards (TCX runs first anyway).
			a.log.Warn("cannot settle an endpoint on TCX", "veth", veth, "err", err)
		}
		return true
	}
	return false
}
