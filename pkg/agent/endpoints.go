package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/ipam"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// apiError is an error with the HTTP status and CNI code the API answers with.
type apiError struct {
	status int
	body   api.Error
}

func (e *apiError) Error() string { return e.body.Error() }

func errorf(status int, code uint, format string, args ...any) *apiError {
	return &apiError{status: status, body: api.Error{Code: code, Msg: fmt.Sprintf(format, args...)}}
}

func internal(err error) *apiError {
	return &apiError{status: http.StatusInternalServerError, body: api.Error{Code: api.CodeInternal, Msg: err.Error()}}
}

// allocate gives an address to an attachment. A repeated request for the same key returns the
// same address (an ADD retried after a crash), unless a live endpoint already holds it: then
// this is a second ADD for an attachment in use, refused without touching it. When the pool is
// empty and the provider can grow it, the request waits up to ipam.allocateTimeout.
func (a *Agent) allocate(ctx context.Context, req api.AllocationRequest) (api.Allocation, *apiError) {
	deadline := time.Now().Add(a.cfg.IPAM.AllocateTimeout.Duration)
	for {
		alloc, err := a.tryAllocate(req)
		if !errors.Is(err, ipam.ErrExhausted) {
			if err != nil {
				return alloc, asAPIError(err)
			}
			a.keepWarm()
			return a.withNetwork(alloc), nil
		}
		if a.grower == nil || !time.Now().Before(deadline) {
			a.metrics.allocFailures.Inc()
			return alloc, a.exhaustedError(err)
		}
		a.grower.Trigger()
		select {
		case <-ctx.Done():
			return alloc, a.exhaustedError(err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (a *Agent) tryAllocate(req api.AllocationRequest) (api.Allocation, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if ep, ok := a.endpoints[req.Key]; ok && linkExists(ep.HostIfName) {
		return api.Allocation{}, errorf(http.StatusConflict, api.CodeInternal,
			"attachment %s is already in use with address %s on host veth %s; delete it (CNI DEL) before adding it again",
			req.Key, ep.IP, ep.HostIfName)
	}
	alloc, existing, err := a.pool.Allocate(req.Owner)
	if err != nil {
		return alloc, err
	}
	a.settle.adding[req.Key] = time.Now()
	a.log.Info("address allocated", "key", req.Key.String(), "ip", alloc.IP.String(), "existing", existing,
		"pod", req.PodNamespace+"/"+req.PodName)
	return alloc, nil
}

func asAPIError(err error) *apiError {
	var aerr *apiError
	switch {
	case errors.As(err, &aerr):
		return aerr
	case errors.Is(err, ipam.ErrInvalidKey):
		return errorf(http.StatusBadRequest, api.CodeInvalidConfig, "%v", err)
	}
	return internal(err)
}

// exhaustedError is CNI code 11 with what the operator can act on: the pool's numbers and,
// for a growing provider, why it has not grown.
func (a *Agent) exhaustedError(err error) *apiError {
	details := strings.TrimPrefix(err.Error(), ipam.ErrExhausted.Error()+": ") // Msg says it already
	if a.grower != nil {
		st := a.grower.Status()
		details += fmt.Sprintf("; waited %s for the pool to grow (%d IP configurations on the NIC, %d being added)",
			a.cfg.IPAM.AllocateTimeout.Duration, st.IPConfigs, st.Pending)
		if st.LastError != "" {
			details += "; last Azure error: " + st.LastError
		}
		if st.IPConfigs >= a.cfg.IPAM.Azure.MaxIPs {
			details += fmt.Sprintf("; the NIC is at ipam.azure.maxIPs (%d)", a.cfg.IPAM.Azure.MaxIPs)
		}
	}
	return &apiError{status: http.StatusServiceUnavailable, body: api.Error{Code: api.CodeTryAgainLater,
		Msg: "no free VNet address on this node", Details: details}}
}

// keepWarm wakes the provider when the pool has drifted out of its warm range, so growth
// starts before the next ADD finds it empty and shrinking does not wait for the next tick.
func (a *Agent) keepWarm() {
	if a.grower == nil {
		return
	}
	st := a.pool.State()
	if st.Free < a.cfg.IPAM.Azure.MinFree || st.Free > a.cfg.IPAM.Azure.MaxFree {
		a.grower.Trigger()
	}
}

// withNetwork adds what a container needs to use its address.
func (a *Agent) withNetwork(alloc api.Allocation) api.Allocation {
	alloc.Gateway = api.GatewayIP
	alloc.MTU = a.cfg.MTU
	if alloc.MTU == 0 {
		alloc.MTU = a.nic.mtu
	}
	alloc.VNetCIDRs = a.vnet
	return alloc
}

// release frees an attachment's address, removing its endpoint first if it has one.
func (a *Agent) release(k api.Key) *apiError {
	a.mu.Lock()
	aerr := a.removeLocked(k, "released")
	a.mu.Unlock()
	a.keepWarm()
	return aerr
}

// putEndpoint registers a wired container interface: record, map entry, then the program on
// its host veth. The record comes first so that a crash in between leaves something the
// reconcile at start finds and completes or removes.
func (a *Agent) putEndpoint(req api.EndpointRequest) (api.Endpoint, *apiError) {
	a.mu.Lock()
	defer a.mu.Unlock()
	alloc, ok := a.pool.Get(req.Key)
	if !ok {
		return api.Endpoint{}, errorf(http.StatusNotFound, api.CodeUnknownContainer,
			"attachment %s has no address: allocate one first", req.Key)
	}
	if alloc.IP != req.IP {
		return api.Endpoint{}, errorf(http.StatusConflict, api.CodeInvalidConfig,
			"attachment %s holds address %s, not %s", req.Key, alloc.IP, req.IP)
	}
	if aerr := validateEndpoint(req); aerr != nil {
		return api.Endpoint{}, aerr
	}
	ep := api.Endpoint{EndpointRequest: req, CreatedAt: time.Now().UTC()}
	if old, ok := a.endpoints[req.Key]; ok {
		ep.ID, ep.CreatedAt = old.ID, old.CreatedAt
	} else {
		id, err := a.freeID()
		if err != nil {
			return ep, internal(err)
		}
		ep.ID = id
	}
	// The key on the veth itself lets a later agent rebuild this endpoint from the kernel
	// if its files are lost.
	if l, err := netlink.LinkByName(req.HostIfName); err == nil {
		if err := netlink.LinkSetAlias(l, api.VethAlias(req.Key)); err != nil {
			return ep, internal(fmt.Errorf("label host veth %s: %w", req.HostIfName, err))
		}
	}
	delete(a.settle.adding, req.Key)
	if err := a.store.put(ep); err != nil {
		return ep, internal(fmt.Errorf("persist endpoint: %w", err))
	}
	a.endpoints[req.Key] = ep
	if err := a.program(ep, true); err != nil {
		a.removeLocked(req.Key, "registration failed")
		// The address stays with the attachment: the CNI binary releases it on rollback.
		return ep, internal(err)
	}
	a.log.Info("endpoint added", "key", req.Key.String(), "ip", ep.IP.String(), "veth", ep.HostIfName, "id", ep.ID,
		"pod", req.PodNamespace+"/"+req.PodName)
	return ep, nil
}

// program writes ep's map entry and attaches from_container to its host veth. fresh zeroes
// its counters, for an id that may have served an earlier endpoint.
func (a *Agent) program(ep api.Endpoint, fresh bool) error {
	if err := a.writeEndpoint(ep, fresh); err != nil {
		return err
	}
	// AttachTCX: TCX at once, not a cls_bpf filter first (see api.EndpointRequest).
	mode, err := a.dp.AttachEndpoint(ep.HostIfName, ep.AttachTCX)
	if err != nil {
		return err
	}
	a.noteAttached(ep.HostIfName, mode)
	return nil
}

// writeEndpoint writes ep's entry in the endpoints map (and zeroes its counters if fresh).
func (a *Agent) writeEndpoint(ep api.Endpoint, fresh bool) error {
	cmac, err := macOf(ep.ContainerMAC)
	if err != nil {
		return err
	}
	hmac, err := macOf(ep.HostMAC)
	if err != nil {
		return err
	}
	if fresh {
		if err := a.maps.ResetEndpointStat(ep.ID); err != nil {
			return err
		}
	}
	return a.maps.PutEndpoint(ep.IP, maps.Endpoint{Ifindex: uint32(ep.HostIfIndex), Id: ep.ID, Mac: cmac, HostMac: hmac})
}

func macOf(s string) ([6]byte, error) {
	hw, err := net.ParseMAC(s)
	if err != nil {
		return [6]byte{}, err
	}
	return maps.MAC(hw)
}

// removeLocked takes an attachment out of the datapath and the pool. Every step tolerates
// what is already gone, so it is safe to repeat after a crash.
func (a *Agent) removeLocked(k api.Key, why string) *apiError {
	delete(a.settle.adding, k)
	if ep, ok := a.endpoints[k]; ok {
		if err := a.maps.DeleteEndpoint(ep.IP); err != nil {
			return internal(err)
		}
		// The filter goes now; a TCX link when the veth is gone (see settle.go).
		if err := a.dp.DetachFilter(ep.HostIfName); err != nil {
			return internal(err)
		}
		a.noteRemoved(ep.HostIfName)
		if err := a.store.delete(k); err != nil {
			return internal(err)
		}
		delete(a.endpoints, k)
		a.log.Info("endpoint removed", "key", k.String(), "ip", ep.IP.String(), "veth", ep.HostIfName, "why", why)
	}
	released, err := a.pool.Release(k)
	if err != nil && !errors.Is(err, ipam.ErrInvalidKey) {
		return internal(err)
	}
	if released {
		a.log.Info("address released", "key", k.String(), "why", why)
	}
	return nil
}

// freeID is the lowest endpoint id in use by nobody; ids index endpoint_stats.
func (a *Agent) freeID() (uint32, error) {
	used := make(map[uint32]bool, len(a.endpoints))
	for _, ep := range a.endpoints {
		used[ep.ID] = true
	}
	return freeIDOf(used, a.maps.MaxEndpointIDs())
}

func validateEndpoint(req api.EndpointRequest) *apiError {
	if req.HostIfName == "" || req.HostIfIndex <= 0 {
		return errorf(http.StatusBadRequest, api.CodeInvalidConfig, "hostIfName and hostIfIndex are required")
	}
	l, err := netlink.LinkByName(req.HostIfName)
	if err != nil {
		return errorf(http.StatusBadRequest, api.CodeInvalidEnvironment,
			"host veth %s does not exist in the agent's network namespace: %v", req.HostIfName, err)
	}
	if l.Attrs().Index != req.HostIfIndex {
		return errorf(http.StatusBadRequest, api.CodeInvalidEnvironment,
			"host veth %s has index %d, not %d", req.HostIfName, l.Attrs().Index, req.HostIfIndex)
	}
	if _, err := macOf(req.ContainerMAC); err != nil {
		return errorf(http.StatusBadRequest, api.CodeInvalidConfig, "containerMAC %q: %v", req.ContainerMAC, err)
	}
	hmac, err := net.ParseMAC(req.HostMAC)
	if err != nil || hmac.String() != l.Attrs().HardwareAddr.String() {
		return errorf(http.StatusBadRequest, api.CodeInvalidConfig, "hostMAC %q is not the MAC of %s (%s)", req.HostMAC, req.HostIfName, l.Attrs().HardwareAddr)
	}
	return nil
}

func linkExists(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

// endpoint returns one endpoint with its counters.
func (a *Agent) endpoint(k api.Key) (api.Endpoint, bool) {
	a.mu.Lock()
	ep, ok := a.endpoints[k]
	a.mu.Unlock()
	if ok {
		a.addCounts(&ep)
	}
	return ep, ok
}

// listEndpoints returns every endpoint with its counters, by key.
func (a *Agent) listEndpoints() []api.Endpoint {
	a.mu.Lock()
	out := make([]api.Endpoint, 0, len(a.endpoints))
	for _, ep := range a.endpoints {
		out = append(out, ep)
	}
	a.mu.Unlock()
	sortEndpoints(out)
	for i := range out {
		a.addCounts(&out[i])
	}
	return out
}

func (a *Agent) addCounts(ep *api.Endpoint) {
	if s, err := a.maps.ReadEndpointStat(ep.ID); err == nil {
		ep.RxPackets, ep.TxPackets = s.RxPackets, s.TxPackets
	}
}

// gc releases every allocation whose key the runtime no longer knows.
func (a *Agent) gc(valid []api.Key) (api.GCResponse, *apiError) {
	keep := make(map[api.Key]bool, len(valid))
	for _, k := range valid {
		keep[k] = true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	resp := api.GCResponse{Released: []api.Key{}}
	for _, alloc := range a.pool.Allocations() {
		if keep[alloc.Key] {
			continue
		}
		if aerr := a.removeLocked(alloc.Key, "garbage-collected"); aerr != nil {
			return resp, aerr
		}
		resp.Released = append(resp.Released, alloc.Key)
	}
	return resp, nil
}

// reconcile makes store, pool, map and links agree at start: endpoints whose host veth is gone
// are removed and their addresses freed; live ones are written to the map and attached again
// (replacing an older program); map entries and link pins nobody owns are removed. Every
// entry is written before the first program is attached, so that a new program on maps that
// an upgrade replaced finds every peer.
func (a *Agent) reconcile() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	records, err := a.store.all()
	if err != nil {
		return err
	}
	for _, ep := range records {
		a.endpoints[ep.Key] = ep
	}
	live := map[string]bool{a.nic.name: true}
	for _, ep := range records {
		l, err := netlink.LinkByName(ep.HostIfName)
		if err != nil {
			a.log.Info("container is gone; removing its endpoint", "key", ep.Key.String(), "veth", ep.HostIfName)
			if aerr := a.removeLocked(ep.Key, "host veth gone"); aerr != nil {
				return aerr
			}
			continue
		}
		if _, ok := a.pool.Get(ep.Key); !ok {
			a.log.Warn("endpoint had no allocation; restoring it", "key", ep.Key.String(), "ip", ep.IP.String())
			if err := a.pool.Restore([]api.Allocation{{Owner: ep.Owner, IP: ep.IP, AllocatedAt: ep.CreatedAt}}); err != nil {
				return err
			}
		}
		if l.Attrs().Index != ep.HostIfIndex {
			ep.HostIfIndex = l.Attrs().Index
			if err := a.store.put(ep); err != nil {
				return err
			}
			a.endpoints[ep.Key] = ep
		}
		if err := a.writeEndpoint(ep, false); err != nil {
			return fmt.Errorf("restore endpoint %s: %w", ep.Key, err)
		}
		live[ep.HostIfName] = true
	}
	for _, ep := range a.endpoints {
		mode, err := a.dp.AttachEndpoint(ep.HostIfName, ep.AttachTCX)
		if err != nil && !linkExists(ep.HostIfName) {
			// The runtime's DEL removed the veth since the loop above (it does not need us).
			a.log.Info("container is gone; removing its endpoint", "key", ep.Key.String(), "veth", ep.HostIfName)
			if aerr := a.removeLocked(ep.Key, "host veth gone"); aerr != nil {
				return aerr
			}
			delete(live, ep.HostIfName)
			continue
		}
		if err != nil {
			return fmt.Errorf("restore endpoint %s: %w", ep.Key, err)
		}
		a.noteAttached(ep.HostIfName, mode)
	}

	// An allocation without an endpoint belongs to an ADD that never finished: the agent died
	// between the address and the endpoint, and the plugin's rollback (or the runtime's DEL)
	// found no agent to release it. If no host veth for it exists either, nobody holds it.
	for _, alloc := range a.pool.Allocations() {
		if _, ok := a.endpoints[alloc.Key]; ok || linkExists(api.HostVethName(alloc.Key)) {
			continue
		}
		if _, err := a.pool.Release(alloc.Key); err != nil {
			return err
		}
		a.log.Info("released an allocation whose ADD never finished", "key", alloc.Key.String(), "ip", alloc.IP.String())
	}

	inMap, err := a.maps.ListEndpoints()
	if err != nil {
		return err
	}
	owned := make(map[string]bool, len(a.endpoints))
	for _, ep := range a.endpoints {
		owned[ep.IP.String()] = true
	}
	for ip := range inMap {
		if !owned[ip.String()] {
			a.log.Info("removing map entry nobody owns", "ip", ip.String())
			if err := a.maps.DeleteEndpoint(ip); err != nil {
				return err
			}
		}
	}
	pins, err := loader.LinkPins(a.cfg.BPFRoot)
	if err != nil {
		return err
	}
	for _, dev := range pins {
		if !live[dev] {
			a.log.Info("removing link pin nobody owns", "device", dev)
			if err := a.dp.Detach(dev); err != nil {
				return err
			}
		}
	}
	a.log.Info("reconciled", "endpoints", len(a.endpoints), "allocations", len(a.pool.Allocations()))
	return nil
}
