package azurefake

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// MaxIPConfigsPerNIC is Azure's limit of IP configurations on one network interface.
const MaxIPConfigsPerNIC = 256

// ARM error codes the fake answers with. Those Azure is known to use carry Azure's name; the
// others are the fake's own and marked so — match on them in tests, not in the agent.
const (
	CodeNotFound                   = "NotFound"                    // unknown NIC or operation (404)
	CodePreconditionFailed         = "PreconditionFailed"          // If-Match / If-None-Match failed (412)
	CodeAnotherOperationInProgress = "AnotherOperationInProgress"  // PUT while the NIC's previous PUT runs (409)
	CodeInvalidRequestFormat       = "InvalidRequestFormat"        // missing or malformed field (400)
	CodeInvalidRequestContent      = "InvalidRequestContent"       // body is not JSON (400)
	CodeLocationRequired           = "LocationRequired"            // PUT without location (400)
	CodeInvalidResourceLocation    = "InvalidResourceLocation"     // PUT with another location (400)
	CodeInvalidResourceReference   = "InvalidResourceReference"    // subnet ID the fake does not know (400)
	CodeDuplicateResourceName      = "DuplicateResourceName"       // two IP configurations share a name (400)
	CodeSubnetIsFull               = "SubnetIsFull"                // no free address for a Dynamic config (400)
	CodePrivateIPAddressInUse      = "PrivateIPAddressInUse"       // Static address held by another config (400)
	CodePrivateIPAddressNotInSub   = "PrivateIPAddressNotInSubnet" // Static address outside the subnet (400)
	CodeMissingAPIVersion          = "MissingApiVersionParameter"  // no ?api-version= (400)
	CodeAuthenticationFailed       = "AuthenticationFailed"        // no bearer token (401)
	CodeTooManyRequests            = "TooManyRequests"             // injected throttling (429)
	CodeServiceUnavailable         = "ServiceUnavailable"          // injected outage (503)
	CodeInternalServerError        = "InternalServerError"         // error of an injected failed operation

	// The fake's own codes (Azure's exact codes for these cases are not known to the fake).
	CodeExceededMaxIPConfigs      = "ExceededMaxIpConfigurations"        // more than the NIC limit (400)
	CodeInvalidPrimaryIPConfig    = "InvalidPrimaryIpConfiguration"      // not exactly one primary (400)
	CodePrimaryIPConfigChanged    = "PrimaryIpConfigurationCannotChange" // primary renamed, moved or readdressed (400)
	CodePrivateIPAddressReserved  = "PrivateIPAddressIsReserved"         // Static address Azure reserves (400)
	CodeMethodNotAllowed          = "MethodNotAllowed"                   // verb the fake does not model (405)
	CodeInvalidResourceTypeOrPath = "InvalidResourceType"                // path the fake does not model (404)
)

// Provisioning and operation states as ARM spells them.
const (
	StateSucceeded  = "Succeeded"
	StateUpdating   = "Updating"
	StateFailed     = "Failed"
	StateInProgress = "InProgress"
)

// FailMode says how an injected operation failure (FailNextOperation) leaves the NIC.
type FailMode int

const (
	// FailWhole fails the operation and leaves the NIC's IP configurations and etag as they were
	// before the PUT; only provisioningState becomes "Failed", as Azure shows after a failed update.
	FailWhole FailMode = iota + 1
	// FailHalfway fails the operation after committing the first half (rounded up) of the IP
	// configurations the PUT added, in request order; removals and other changes of that PUT are
	// not applied. The etag changes and OnChange fires (if anything was added), so a client that
	// assumes "failed means nothing happened" leaks addresses — the case this mode exists to test.
	// A PUT that adds nothing fails like FailWhole.
	FailHalfway
)

// String names the mode for test output.
func (m FailMode) String() string {
	switch m {
	case FailWhole:
		return "whole"
	case FailHalfway:
		return "halfway"
	}
	return fmt.Sprintf("FailMode(%d)", int(m))
}

// Request is one request the fake ARM answered, kept so tests can assert on what the client sent
// (e.g. that it quoted the etag in If-Match) and how often it retried.
type Request struct {
	Time    time.Time   // when the request arrived
	Method  string      // HTTP method
	Path    string      // URL path, without the query
	Kind    RequestKind // what the path addressed
	IfMatch string      // the If-Match header as sent, "" when absent
	Status  int         // the status the fake answered with
}

// RequestKind classifies an ARM request by the resource it addressed.
type RequestKind string

// The request kinds of the fake ARM.
const (
	KindNIC       RequestKind = "nic"       // GET or PUT of one network interface
	KindList      RequestKind = "list"      // list of network interfaces
	KindOperation RequestKind = "operation" // Azure-AsyncOperation status
	KindOther     RequestKind = "other"     // anything the fake does not model
)

// ARM is a fake Azure Resource Manager for Microsoft.Network/networkInterfaces, an http.Handler
// the real armnetwork.InterfacesClient talks to unchanged. Create it with NewARM, describe the
// VNet with AddSubnet and AddNIC, serve it over TLS, and point the client's cloud configuration
// (cloud.ResourceManager endpoint) at the server's URL. All methods are safe for concurrent use.
type ARM struct {
	mu           sync.Mutex
	subnets      map[string]*subnet // by lower-cased ID
	nics         map[string]*nic    // by nicKey
	ops          map[string]*operation
	opDelay      time.Duration
	pollInterval time.Duration
	maxIPConfigs int
	throttleLeft int
	throttleWait time.Duration
	outage       bool
	failNext     []FailMode
	log          []Request
	onChange     []func(NICState)
	events       []NICState // committed changes waiting to be delivered to onChange
	closed       bool

	// notifyMu serialises delivery of events, so callbacks see a NIC's changes in commit order.
	notifyMu sync.Mutex
}

type subnet struct {
	id     string
	prefix netip.Prefix
}

type nic struct {
	sub, rg, name string
	location      string
	mac           net.HardwareAddr
	guid          string
	etag          string
	state         string
	configs       []ipConfig
	extras        []byte // the rest of the last PUT body (tags, DNS settings, …), echoed back
	pending       *operation
}

type ipConfig struct {
	name     string
	addr     netip.Addr
	static   bool
	primary  bool
	subnetID string // canonical, as given to AddSubnet
	asgs     []string
}

type operation struct {
	id       string
	key      string // NIC key
	sub      string
	location string
	desired  []ipConfig
	extras   []byte
	newETag  string
	fail     FailMode
	status   string
	start    time.Time
	end      time.Time
	timer    *time.Timer
}

const maxLog = 10000

// NewARM returns an empty fake ARM: no subnets, no NICs, operations completing at once, polled
// every 100ms, the NIC limit at 256.
func NewARM() *ARM {
	return &ARM{
		subnets:      map[string]*subnet{},
		nics:         map[string]*nic{},
		ops:          map[string]*operation{},
		pollInterval: 100 * time.Millisecond,
		maxIPConfigs: MaxIPConfigsPerNIC,
	}
}

// Close stops operations still running, so that no OnChange callback fires after a test ended.
// Requests after Close are still answered; pending operations stay "InProgress" forever.
func (a *ARM) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closed = true
	for _, op := range a.ops {
		if op.timer != nil {
			op.timer.Stop()
		}
	}
}

func nicKey(sub, rg, name string) string {
	return strings.ToLower(sub + "/" + rg + "/" + name)
}

// AddSubnet makes a subnet known, so IP configurations may reference it by ID (see SubnetID).
// The prefix must be IPv4; host bits are cleared.
func (a *ARM) AddSubnet(id string, prefix netip.Prefix) error {
	if !prefix.IsValid() || !prefix.Addr().Is4() || prefix.Bits() > 29 {
		// Azure's smallest subnet is a /29: 8 addresses, 5 reserved.
		return fmt.Errorf("subnet %s: prefix %s must be a valid IPv4 prefix of /29 or larger", id, prefix)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.subnets[strings.ToLower(id)] = &subnet{id: id, prefix: prefix.Masked()}
	return nil
}

// AddNIC creates a network interface directly (no operation, no OnChange), with one primary IP
// configuration "ipconfig1" in the subnet. A zero primaryIP is allocated dynamically (lowest free);
// otherwise the address is used as a Static one and must be free. It returns the NIC's state,
// e.g. to seed an IMDS.
func (a *ARM) AddNIC(sub, rg, name, location string, mac net.HardwareAddr, subnetID string, primaryIP netip.Addr, asgIDs []string) (NICState, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	key := nicKey(sub, rg, name)
	if _, ok := a.nics[key]; ok {
		return NICState{}, fmt.Errorf("NIC %s already exists", NICID(sub, rg, name))
	}
	sn, ok := a.subnets[strings.ToLower(subnetID)]
	if !ok {
		return NICState{}, fmt.Errorf("unknown subnet %s", subnetID)
	}
	if len(mac) != 6 {
		return NICState{}, fmt.Errorf("MAC %q must have 6 bytes", mac)
	}
	cfg := ipConfig{name: "ipconfig1", primary: true, subnetID: sn.id, asgs: slices.Clone(asgIDs)}
	used := a.usedLocked()
	if primaryIP.IsValid() {
		if e := checkStatic(sn, primaryIP, used); e != nil {
			return NICState{}, errors.New(e.message)
		}
		cfg.addr, cfg.static = primaryIP, true
	} else {
		addr, ok := lowestFree(sn, used)
		if !ok {
			return NICState{}, fmt.Errorf("subnet %s is full", subnetID)
		}
		cfg.addr = addr
	}
	n := &nic{
		sub: sub, rg: rg, name: name, location: location,
		mac:     slices.Clone(mac),
		guid:    newUUID(),
		etag:    newETag(),
		state:   StateSucceeded,
		configs: []ipConfig{cfg},
	}
	a.nics[key] = n
	return a.stateLocked(n), nil
}

// Throttle makes the next n requests (any kind, polls included) fail with 429 TooManyRequests.
// retryAfter goes into Retry-After as whole seconds (rounded up) and, when it is not a whole
// number of seconds, also into Retry-After-Ms, which azcore prefers; zero sends neither, leaving
// the client to its own backoff.
func (a *ARM) Throttle(n int, retryAfter time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.throttleLeft, a.throttleWait = n, retryAfter
}

// FailNextOperation makes the next PUT's long-running operation end "Failed" with an
// InternalServerError, leaving the NIC as mode describes. Calls queue: two calls fail the next
// two operations.
func (a *ARM) FailNextOperation(mode FailMode) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.failNext = append(a.failNext, mode)
}

// SetOperationDelay sets how long a PUT's operation stays "InProgress" before it commits. It
// applies to operations started afterwards.
func (a *ARM) SetOperationDelay(d time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.opDelay = d
}

// SetPollInterval sets the Retry-After the fake sends with a PUT and with "InProgress" operation
// status (default 100ms). azcore's poller sleeps exactly that long between polls; without it, it
// would fall back to PollUntilDone's Frequency (30s by default, and at least 1s outside tests).
func (a *ARM) SetPollInterval(d time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pollInterval = d
}

// SetMaxIPConfigs lowers (or restores) the per-NIC limit of IP configurations, so a test can
// reach the limit without 256 addresses.
func (a *ARM) SetMaxIPConfigs(n int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.maxIPConfigs = n
}

// Outage makes every request fail with 503 ServiceUnavailable while on. Operations already
// running still commit on time (Azure's backend keeps working when its front door fails), but
// nobody can observe them until the outage ends.
func (a *ARM) Outage(on bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.outage = on
}

// OnChange registers fn to be called whenever a NIC's committed set of IP configurations changes
// (an operation committed, a half-way failure, an out-of-band change) with the NIC's new state.
// Calls are made outside the fake's lock, one at a time, in commit order; an operation reports
// "Succeeded" only after every callback for its commit returned, so a client that saw the
// operation succeed can rely on routes and IMDS having been told. fn may read the fake (NIC,
// Requests) but must not call its out-of-band mutators (AddIPConfig, RemoveIPConfig), which
// would deadlock.
func (a *ARM) OnChange(fn func(NICState)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.onChange = append(a.onChange, fn)
}

// NIC returns the committed state of a network interface.
func (a *ARM) NIC(sub, rg, name string) (NICState, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n, ok := a.nics[nicKey(sub, rg, name)]
	if !ok {
		return NICState{}, false
	}
	return a.stateLocked(n), true
}

// Requests returns the requests answered so far (the last 10000), oldest first.
func (a *ARM) Requests() []Request {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.log)
}

// Count returns how many requests had the method and got the status; an empty method or a zero
// status matches any.
func (a *ARM) Count(method string, status int) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := 0
	for _, r := range a.log {
		if (method == "" || r.Method == method) && (status == 0 || r.Status == status) {
			c++
		}
	}
	return c
}

// AddIPConfig adds an IP configuration to a NIC out of band, as a concurrent writer (another
// agent, the portal, a policy) would: immediately committed, etag bumped, OnChange fired. The
// configuration copies the primary's subnet and ASGs. A zero addr is allocated dynamically;
// otherwise it is used as a Static address and must be free. It returns the address.
func (a *ARM) AddIPConfig(sub, rg, nicName, name string, addr netip.Addr) (netip.Addr, error) {
	a.mu.Lock()
	n, ok := a.nics[nicKey(sub, rg, nicName)]
	if !ok {
		a.mu.Unlock()
		return netip.Addr{}, fmt.Errorf("no NIC %s", NICID(sub, rg, nicName))
	}
	var primary *ipConfig
	for i := range n.configs {
		if strings.EqualFold(n.configs[i].name, name) {
			a.mu.Unlock()
			return netip.Addr{}, fmt.Errorf("NIC %s already has IP configuration %s", n.name, name)
		}
		if n.configs[i].primary {
			primary = &n.configs[i]
		}
	}
	if primary == nil {
		a.mu.Unlock()
		return netip.Addr{}, fmt.Errorf("NIC %s has no primary IP configuration", n.name)
	}
	if len(n.configs) >= a.maxIPConfigs {
		a.mu.Unlock()
		return netip.Addr{}, fmt.Errorf("NIC %s already has %d IP configurations", n.name, len(n.configs))
	}
	sn := a.subnets[strings.ToLower(primary.subnetID)]
	cfg := ipConfig{name: name, subnetID: sn.id, asgs: slices.Clone(primary.asgs)}
	used := a.usedLocked()
	if addr.IsValid() {
		if e := checkStatic(sn, addr, used); e != nil {
			a.mu.Unlock()
			return netip.Addr{}, errors.New(e.message)
		}
		cfg.addr, cfg.static = addr, true
	} else {
		var ok bool
		if cfg.addr, ok = lowestFree(sn, used); !ok {
			a.mu.Unlock()
			return netip.Addr{}, fmt.Errorf("subnet %s is full", sn.id)
		}
	}
	n.configs = append(slices.Clone(n.configs), cfg)
	n.etag = newETag()
	a.events = append(a.events, a.stateLocked(n))
	a.mu.Unlock()
	a.flush()
	return cfg.addr, nil
}

// RemoveIPConfig removes a secondary IP configuration from a NIC out of band (see AddIPConfig),
// freeing its address at once.
func (a *ARM) RemoveIPConfig(sub, rg, nicName, name string) error {
	a.mu.Lock()
	n, ok := a.nics[nicKey(sub, rg, nicName)]
	if !ok {
		a.mu.Unlock()
		return fmt.Errorf("no NIC %s", NICID(sub, rg, nicName))
	}
	i := slices.IndexFunc(n.configs, func(c ipConfig) bool { return strings.EqualFold(c.name, name) })
	if i < 0 || n.configs[i].primary {
		a.mu.Unlock()
		return fmt.Errorf("NIC %s has no secondary IP configuration %s", n.name, name)
	}
	n.configs = slices.Delete(slices.Clone(n.configs), i, i+1)
	n.etag = newETag()
	a.events = append(a.events, a.stateLocked(n))
	a.mu.Unlock()
	a.flush()
	return nil
}

// TouchNIC changes a NIC's etag without changing its IP configurations, as an unrelated update
// (a tag, a DNS setting) by someone else would, so a client's If-Match goes stale.
func (a *ARM) TouchNIC(sub, rg, name string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	n, ok := a.nics[nicKey(sub, rg, name)]
	if !ok {
		return fmt.Errorf("no NIC %s", NICID(sub, rg, name))
	}
	n.etag = newETag()
	return nil
}

// stateLocked snapshots a NIC; a.mu must be held.
func (a *ARM) stateLocked(n *nic) NICState {
	id := NICID(n.sub, n.rg, n.name)
	s := NICState{
		ID: id, Subscription: n.sub, ResourceGroup: n.rg, Name: n.name, Location: n.location,
		MAC: n.mac, ETag: n.etag, ProvisioningState: n.state,
	}
	for _, c := range n.configs {
		var prefix netip.Prefix
		if sn, ok := a.subnets[strings.ToLower(c.subnetID)]; ok {
			prefix = sn.prefix
		}
		s.IPConfigurations = append(s.IPConfigurations, IPConfigState{
			Name: c.name, ID: id + "/ipConfigurations/" + c.name, Address: c.addr,
			Primary: c.primary, Static: c.static, SubnetID: c.subnetID, Subnet: prefix,
			ApplicationSecurityGroupIDs: c.asgs,
		})
	}
	return s.clone()
}

// usedLocked returns every address held by a committed configuration or promised to a running
// operation, anywhere: a removed configuration frees its address only when its operation commits,
// so an address is never handed to two NICs at once.
func (a *ARM) usedLocked() map[netip.Addr]bool {
	used := map[netip.Addr]bool{}
	for _, n := range a.nics {
		for _, c := range n.configs {
			used[c.addr] = true
		}
		if n.pending != nil {
			for _, c := range n.pending.desired {
				used[c.addr] = true
			}
		}
	}
	return used
}

// usable reports whether Azure lets a configuration have addr: inside the subnet and not one of
// the five addresses Azure reserves (network, gateway .1, DNS .2 and .3, broadcast).
func usable(sn *subnet, addr netip.Addr) bool {
	if !sn.prefix.Contains(addr) {
		return false
	}
	first := sn.prefix.Addr()
	for range 4 {
		if addr == first {
			return false
		}
		first = first.Next()
	}
	return addr != lastAddr(sn.prefix)
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// lowestFree is Azure's Dynamic allocation: the lowest usable address nobody holds.
func lowestFree(sn *subnet, used map[netip.Addr]bool) (netip.Addr, bool) {
	last := lastAddr(sn.prefix)
	for addr := sn.prefix.Addr(); addr.Less(last); addr = addr.Next() {
		if usable(sn, addr) && !used[addr] {
			return addr, true
		}
	}
	return netip.Addr{}, false
}

func checkStatic(sn *subnet, addr netip.Addr, used map[netip.Addr]bool) *armError {
	switch {
	case !sn.prefix.Contains(addr):
		return newARMError(400, CodePrivateIPAddressNotInSub, "Private static IP address %s does not belong to the range of subnet prefix %s.", addr, sn.prefix)
	case !usable(sn, addr):
		return newARMError(400, CodePrivateIPAddressReserved, "Private static IP address %s is reserved by Azure in subnet prefix %s.", addr, sn.prefix)
	case used[addr]:
		return newARMError(400, CodePrivateIPAddressInUse, "IP configuration is using the private IP address %s which is already allocated to another resource.", addr)
	}
	return nil
}

// complete ends an operation: commit (or fail as injected), deliver OnChange, then — only then —
// let the operation endpoint report the final status.
func (a *ARM) complete(op *operation) {
	a.mu.Lock()
	if a.closed || op.status != StateInProgress {
		a.mu.Unlock()
		return
	}
	n := a.nics[op.key]
	before := n.configs
	switch op.fail {
	case 0:
		n.configs = op.desired
		n.etag = op.newETag
		n.state = StateSucceeded
		n.extras = op.extras
	case FailHalfway:
		var added []ipConfig
		for _, c := range op.desired {
			if !slices.ContainsFunc(before, func(b ipConfig) bool { return strings.EqualFold(b.name, c.name) }) {
				added = append(added, c)
			}
		}
		if keep := (len(added) + 1) / 2; keep > 0 {
			n.configs = append(slices.Clone(before), added[:keep]...)
			n.etag = op.newETag
		}
		n.state = StateFailed
	default:
		n.state = StateFailed
	}
	n.pending = nil
	if !sameConfigs(before, n.configs) {
		a.events = append(a.events, a.stateLocked(n))
	}
	a.mu.Unlock()

	a.flush()

	a.mu.Lock()
	op.end = time.Now()
	if op.fail == 0 {
		op.status = StateSucceeded
	} else {
		op.status = StateFailed
	}
	a.mu.Unlock()
}

// flush delivers queued events to the OnChange callbacks. When it returns, every event queued
// before the call has been delivered (by this goroutine or by another that held notifyMu).
func (a *ARM) flush() {
	a.notifyMu.Lock()
	defer a.notifyMu.Unlock()
	for {
		a.mu.Lock()
		if len(a.events) == 0 {
			a.mu.Unlock()
			return
		}
		ev := a.events[0]
		a.events = a.events[1:]
		cbs := slices.Clone(a.onChange)
		a.mu.Unlock()
		for _, fn := range cbs {
			fn(ev.clone())
		}
	}
}

func sameConfigs(x, y []ipConfig) bool {
	return slices.EqualFunc(x, y, func(a, b ipConfig) bool {
		return a.name == b.name && a.addr == b.addr && a.primary == b.primary && a.static == b.static &&
			a.subnetID == b.subnetID && slices.Equal(a.asgs, b.asgs)
	})
}
