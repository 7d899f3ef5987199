package azurefake

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v7"
)

// armError is an ARM error answer: status plus the {"error":{"code","message"}} body.
type armError struct {
	status  int
	code    string
	message string
}

func newARMError(status int, code, format string, args ...any) *armError {
	return &armError{status: status, code: code, message: fmt.Sprintf(format, args...)}
}

// reply is what a route decided; ServeHTTP logs it before writing, so a client that has seen the
// answer always finds the request in Requests.
type reply struct {
	status int
	header http.Header
	body   any
}

func errReply(e *armError) reply {
	return reply{status: e.status, body: errorBody(e.code, e.message)}
}

func errorBody(code, message string) map[string]any {
	return map[string]any{"error": map[string]any{"code": code, "message": message}}
}

// ServeHTTP answers ARM requests:
//
//	GET  /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces/{nic}
//	PUT  /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces/{nic}
//	GET  /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces
//	GET  /subscriptions/{sub}/providers/Microsoft.Network/networkInterfaces
//	GET  /subscriptions/{sub}/providers/Microsoft.Network/locations/{loc}/operations/{id}
//
// every one with ?api-version= and a bearer token. Path segments are matched case-insensitively,
// as ARM does.
func (a *ARM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rec := Request{Time: time.Now(), Method: r.Method, Path: r.URL.Path, IfMatch: r.Header.Get("If-Match"), Kind: KindOther}
	rep := a.route(r, &rec)

	a.mu.Lock()
	rec.Status = rep.status
	a.log = append(a.log, rec)
	if len(a.log) > maxLog {
		a.log = slices.Delete(a.log, 0, len(a.log)-maxLog)
	}
	a.mu.Unlock()

	h := w.Header()
	for k, v := range rep.header {
		h[k] = v
	}
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("x-ms-request-id", newUUID())
	h.Set("x-ms-correlation-request-id", newUUID())
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(rep.status)
	if rep.body != nil {
		_ = json.NewEncoder(w).Encode(rep.body)
	}
}

func (a *ARM) route(r *http.Request, rec *Request) reply {
	segs := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	var vars []string
	match := func(pattern ...string) bool {
		if len(segs) != len(pattern) {
			return false
		}
		vars = vars[:0]
		for i, p := range pattern {
			if p == "" {
				if segs[i] == "" {
					return false
				}
				vars = append(vars, segs[i])
			} else if !strings.EqualFold(p, segs[i]) {
				return false
			}
		}
		return true
	}
	var handle func() reply
	switch {
	case match("subscriptions", "", "resourceGroups", "", "providers", "Microsoft.Network", "networkInterfaces", ""):
		rec.Kind = KindNIC
		sub, rg, name := vars[0], vars[1], vars[2]
		switch r.Method {
		case http.MethodGet:
			handle = func() reply { return a.getNIC(sub, rg, name) }
		case http.MethodPut:
			handle = func() reply { return a.putNIC(r, sub, rg, name) }
		}
	case match("subscriptions", "", "resourceGroups", "", "providers", "Microsoft.Network", "networkInterfaces"):
		rec.Kind = KindList
		sub, rg := vars[0], vars[1]
		if r.Method == http.MethodGet {
			handle = func() reply { return a.listNICs(sub, rg) }
		}
	case match("subscriptions", "", "providers", "Microsoft.Network", "networkInterfaces"):
		rec.Kind = KindList
		sub := vars[0]
		if r.Method == http.MethodGet {
			handle = func() reply { return a.listNICs(sub, "") }
		}
	case match("subscriptions", "", "providers", "Microsoft.Network", "locations", "", "operations", ""):
		rec.Kind = KindOperation
		sub, id := vars[0], vars[2]
		if r.Method == http.MethodGet {
			handle = func() reply { return a.getOperation(sub, id) }
		}
	default:
		handle = func() reply {
			return errReply(newARMError(http.StatusNotFound, CodeInvalidResourceTypeOrPath, "The fake ARM does not model %s.", r.URL.Path))
		}
	}
	if handle == nil {
		handle = func() reply {
			return errReply(newARMError(http.StatusMethodNotAllowed, CodeMethodNotAllowed, "The fake ARM does not model %s on %s.", r.Method, r.URL.Path))
		}
	}

	// Front-door checks, in the order ARM makes them: availability, authentication, throttling.
	a.mu.Lock()
	outage := a.outage
	a.mu.Unlock()
	if outage {
		return errReply(newARMError(http.StatusServiceUnavailable, CodeServiceUnavailable, "The service is temporarily unavailable (azurefake outage)."))
	}
	if tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); !ok || strings.TrimSpace(tok) == "" {
		return errReply(newARMError(http.StatusUnauthorized, CodeAuthenticationFailed, "Authentication failed. The 'Authorization' header is missing or not a bearer token."))
	}
	if rep, ok := a.throttled(r.Method); ok {
		return rep
	}
	if r.URL.Query().Get("api-version") == "" {
		return errReply(newARMError(http.StatusBadRequest, CodeMissingAPIVersion, "The api-version query parameter (?api-version=) is required for all requests."))
	}
	rep := handle()
	if rep.header == nil {
		rep.header = http.Header{}
	}
	if r.Method == http.MethodGet {
		rep.header.Set("x-ms-ratelimit-remaining-subscription-reads", "11999")
	} else {
		rep.header.Set("x-ms-ratelimit-remaining-subscription-writes", "1199")
	}
	return rep
}

// throttled consumes one unit of injected throttling, if any is left.
func (a *ARM) throttled(method string) (reply, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.throttleLeft <= 0 {
		return reply{}, false
	}
	a.throttleLeft--
	rep := errReply(newARMError(http.StatusTooManyRequests, CodeTooManyRequests, "The request is being throttled (azurefake)."))
	rep.header = http.Header{}
	setRetryAfter(rep.header, a.throttleWait)
	if method == http.MethodGet {
		rep.header.Set("x-ms-ratelimit-remaining-subscription-reads", "0")
	} else {
		rep.header.Set("x-ms-ratelimit-remaining-subscription-writes", "0")
	}
	return rep, true
}

// setRetryAfter writes d as ARM does (Retry-After, whole seconds) and, when that would round,
// also as Retry-After-Ms, which azcore reads first — so sub-second delays keep tests fast while a
// client that only knows Retry-After still waits long enough.
func setRetryAfter(h http.Header, d time.Duration) {
	if d <= 0 {
		return
	}
	h.Set("Retry-After", strconv.Itoa(int(math.Ceil(d.Seconds()))))
	if d%time.Second != 0 {
		h.Set("Retry-After-Ms", strconv.FormatInt(max(d.Milliseconds(), 1), 10))
	}
}

func (a *ARM) getNIC(sub, rg, name string) reply {
	a.mu.Lock()
	defer a.mu.Unlock()
	n, ok := a.nics[nicKey(sub, rg, name)]
	if !ok {
		return errReply(newARMError(http.StatusNotFound, CodeNotFound, "Resource %s not found.", NICID(sub, rg, name)))
	}
	return reply{status: http.StatusOK, body: a.renderLocked(n, n.configs, n.etag, n.state, n.extras)}
}

func (a *ARM) listNICs(sub, rg string) reply {
	a.mu.Lock()
	defer a.mu.Unlock()
	var keys []string
	for k, n := range a.nics {
		if strings.EqualFold(n.sub, sub) && (rg == "" || strings.EqualFold(n.rg, rg)) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	value := []*armnetwork.Interface{}
	for _, k := range keys {
		n := a.nics[k]
		value = append(value, a.renderLocked(n, n.configs, n.etag, n.state, n.extras))
	}
	return reply{status: http.StatusOK, body: armnetwork.InterfaceListResult{Value: value}}
}

func (a *ARM) getOperation(sub, id string) reply {
	a.mu.Lock()
	defer a.mu.Unlock()
	op, ok := a.ops[id]
	if !ok || !strings.EqualFold(op.sub, sub) {
		return errReply(newARMError(http.StatusNotFound, CodeNotFound, "Operation %s not found.", id))
	}
	body := map[string]any{
		"id":        fmt.Sprintf("/subscriptions/%s/providers/Microsoft.Network/locations/%s/operations/%s", op.sub, op.location, op.id),
		"name":      op.id,
		"status":    op.status,
		"startTime": op.start.UTC().Format(time.RFC3339Nano),
	}
	rep := reply{status: http.StatusOK, header: http.Header{}, body: body}
	switch op.status {
	case StateInProgress:
		setRetryAfter(rep.header, a.pollInterval)
	case StateFailed:
		body["endTime"] = op.end.UTC().Format(time.RFC3339Nano)
		body["error"] = map[string]any{"code": CodeInternalServerError, "message": fmt.Sprintf("An error occurred (injected by azurefake, mode %s).", op.fail)}
	default:
		body["endTime"] = op.end.UTC().Format(time.RFC3339Nano)
	}
	return rep
}

// putNIC validates a full NIC body, reserves its addresses, and starts the operation that will
// commit it. The answer carries the NIC as it will be (new addresses, new etag) in "Updating".
func (a *ARM) putNIC(r *http.Request, sub, rg, name string) reply {
	raw, err := io.ReadAll(io.LimitReader(r.Body, 8<<20))
	if err != nil {
		return errReply(newARMError(http.StatusBadRequest, CodeInvalidRequestContent, "Reading the request body failed: %v", err))
	}
	var in armnetwork.Interface
	if err := json.Unmarshal(raw, &in); err != nil {
		return errReply(newARMError(http.StatusBadRequest, CodeInvalidRequestContent, "The request content was invalid and could not be deserialized: %v", err))
	}

	a.mu.Lock()
	defer a.mu.Unlock()
	key := nicKey(sub, rg, name)
	n := a.nics[key]

	if im := r.Header.Get("If-Match"); im != "" && (n == nil || !etagMatches(im, n.etag)) {
		return errReply(newARMError(http.StatusPreconditionFailed, CodePreconditionFailed, "Precondition failed: If-Match %s does not match the current etag of %s.", im, NICID(sub, rg, name)))
	}
	if inm := r.Header.Get("If-None-Match"); inm != "" && n != nil && (strings.TrimSpace(inm) == "*" || etagMatches(inm, n.etag)) {
		return errReply(newARMError(http.StatusPreconditionFailed, CodePreconditionFailed, "Precondition failed: %s already exists.", NICID(sub, rg, name)))
	}
	if n != nil && n.pending != nil {
		return errReply(newARMError(http.StatusConflict, CodeAnotherOperationInProgress, "Operation on %s is not allowed because another operation (%s) is in progress; retry later.", NICID(sub, rg, name), n.pending.id))
	}
	loc := deref(in.Location, "")
	if loc == "" {
		return errReply(newARMError(http.StatusBadRequest, CodeLocationRequired, "The location property is required for this definition."))
	}
	if n != nil && normLocation(loc) != normLocation(n.location) {
		return errReply(newARMError(http.StatusBadRequest, CodeInvalidResourceLocation, "The resource %s already exists in location %s; it cannot be moved to %s.", NICID(sub, rg, name), n.location, loc))
	}
	desired, e := a.planLocked(n, in.Properties)
	if e != nil {
		return errReply(e)
	}

	status := http.StatusOK
	if n == nil {
		// Creating through PUT: the NIC exists at once (GET shows it "Updating" with no
		// configurations), as Azure's resource does while its creation runs.
		status = http.StatusCreated
		n = &nic{sub: sub, rg: rg, name: name, location: loc, mac: newMAC(), guid: newUUID(), etag: newETag()}
		a.nics[key] = n
	}
	op := &operation{
		id: newUUID(), key: key, sub: n.sub, location: normLocation(n.location),
		desired: desired, extras: extrasOf(in), newETag: newETag(),
		status: StateInProgress, start: time.Now(),
	}
	if len(a.failNext) > 0 {
		op.fail = a.failNext[0]
		a.failNext = a.failNext[1:]
	}
	n.pending = op
	n.state = StateUpdating
	a.ops[op.id] = op
	if !a.closed {
		op.timer = time.AfterFunc(a.opDelay, func() { a.complete(op) })
	}

	h := http.Header{}
	scheme := "https"
	if r.TLS == nil {
		scheme = "http"
	}
	h.Set("Azure-AsyncOperation", fmt.Sprintf("%s://%s/subscriptions/%s/providers/Microsoft.Network/locations/%s/operations/%s?api-version=%s",
		scheme, r.Host, n.sub, op.location, op.id, r.URL.Query().Get("api-version")))
	setRetryAfter(h, a.pollInterval)
	return reply{status: status, header: h, body: a.renderLocked(n, desired, op.newETag, StateUpdating, op.extras)}
}

// planLocked validates the IP configurations of a PUT against the NIC's current ones and
// assigns addresses: kept configurations keep theirs, Static ones get what they ask for if it is
// free, Dynamic ones get the lowest free address of their subnet.
func (a *ARM) planLocked(n *nic, props *armnetwork.InterfacePropertiesFormat) ([]ipConfig, *armError) {
	bad := func(code, format string, args ...any) ([]ipConfig, *armError) {
		return nil, newARMError(http.StatusBadRequest, code, format, args...)
	}
	if props == nil || len(props.IPConfigurations) == 0 {
		return bad(CodeInvalidRequestFormat, "A network interface must have at least one IP configuration.")
	}
	in := props.IPConfigurations
	if len(in) > a.maxIPConfigs {
		return bad(CodeExceededMaxIPConfigs, "The network interface has %d IP configurations; at most %d are allowed.", len(in), a.maxIPConfigs)
	}

	type req struct {
		cfg       ipConfig
		requested netip.Addr
		sn        *subnet
	}
	reqs := make([]req, len(in))
	primaries := 0
	for i, c := range in {
		if c == nil || deref(c.Name, "") == "" {
			return bad(CodeInvalidRequestFormat, "IP configuration %d has no name.", i)
		}
		name := *c.Name
		for _, prev := range reqs[:i] {
			if strings.EqualFold(prev.cfg.name, name) {
				return bad(CodeDuplicateResourceName, "Two IP configurations are named %s.", name)
			}
		}
		p := c.Properties
		if p == nil || p.Subnet == nil || deref(p.Subnet.ID, "") == "" {
			return bad(CodeInvalidRequestFormat, "IP configuration %s has no subnet.", name)
		}
		sn, ok := a.subnets[strings.ToLower(*p.Subnet.ID)]
		if !ok {
			return bad(CodeInvalidResourceReference, "Resource %s referenced by IP configuration %s was not found.", *p.Subnet.ID, name)
		}
		if v := deref(p.PrivateIPAddressVersion, armnetwork.IPVersionIPv4); !strings.EqualFold(string(v), string(armnetwork.IPVersionIPv4)) {
			return bad(CodeInvalidRequestFormat, "IP configuration %s: privateIPAddressVersion %s is not modelled by the fake (IPv4 only).", name, v)
		}
		r := req{cfg: ipConfig{name: name, subnetID: sn.id, primary: deref(p.Primary, false)}, sn: sn}
		switch m := deref(p.PrivateIPAllocationMethod, armnetwork.IPAllocationMethodDynamic); {
		case strings.EqualFold(string(m), string(armnetwork.IPAllocationMethodDynamic)):
		case strings.EqualFold(string(m), string(armnetwork.IPAllocationMethodStatic)):
			r.cfg.static = true
		default:
			return bad(CodeInvalidRequestFormat, "IP configuration %s: unknown privateIPAllocationMethod %s.", name, m)
		}
		if s := deref(p.PrivateIPAddress, ""); s != "" {
			addr, err := netip.ParseAddr(s)
			if err != nil || !addr.Is4() {
				return bad(CodeInvalidRequestFormat, "IP configuration %s: privateIPAddress %q is not an IPv4 address.", name, s)
			}
			r.requested = addr
		}
		for _, g := range p.ApplicationSecurityGroups {
			if g != nil && deref(g.ID, "") != "" {
				r.cfg.asgs = append(r.cfg.asgs, *g.ID)
			}
		}
		if r.cfg.primary {
			primaries++
		}
		reqs[i] = r
	}
	if len(reqs) == 1 && primaries == 0 {
		reqs[0].cfg.primary = true // a lone configuration is the primary, as in Azure
		primaries = 1
	}
	if primaries != 1 {
		return bad(CodeInvalidPrimaryIPConfig, "A network interface must have exactly one primary IP configuration; this one has %d.", primaries)
	}

	var old map[string]ipConfig // current configurations by lower-cased name
	if n != nil {
		old = map[string]ipConfig{}
		for _, c := range n.configs {
			old[strings.ToLower(c.name)] = c
		}
	}
	// Pass 1: configurations that keep their address; the primary must be one of them.
	assigned := make([]bool, len(reqs))
	for i := range reqs {
		r := &reqs[i]
		prev, existed := old[strings.ToLower(r.cfg.name)]
		keep := existed && strings.EqualFold(prev.subnetID, r.cfg.subnetID) &&
			(!r.cfg.static || !r.requested.IsValid() || r.requested == prev.addr)
		if n != nil && len(n.configs) > 0 && (r.cfg.primary || prev.primary) {
			if !r.cfg.primary || !prev.primary || !keep || (r.requested.IsValid() && r.requested != prev.addr) {
				return bad(CodePrimaryIPConfigChanged, "The primary IP configuration of %s cannot be renamed, moved to another subnet, readdressed or demoted.", n.name)
			}
		}
		if keep {
			r.cfg.addr = prev.addr
			assigned[i] = true
		}
	}
	used := a.usedLocked()
	// Pass 2: Static addresses, before any Dynamic allocation could take them.
	for i := range reqs {
		r := &reqs[i]
		if assigned[i] || !r.cfg.static {
			continue
		}
		if !r.requested.IsValid() {
			return bad(CodeInvalidRequestFormat, "IP configuration %s is Static but has no privateIPAddress.", r.cfg.name)
		}
		if e := checkStatic(r.sn, r.requested, used); e != nil {
			return nil, e
		}
		r.cfg.addr = r.requested
		used[r.requested] = true
		assigned[i] = true
	}
	// Pass 3: Dynamic, lowest free address first (a requested address is ignored, as for Dynamic).
	for i := range reqs {
		r := &reqs[i]
		if assigned[i] {
			continue
		}
		addr, ok := lowestFree(r.sn, used)
		if !ok {
			return bad(CodeSubnetIsFull, "Subnet %s with address prefix %s does not have enough available IP addresses.", r.sn.id, r.sn.prefix)
		}
		r.cfg.addr = addr
		used[addr] = true
	}
	out := make([]ipConfig, len(reqs))
	for i, r := range reqs {
		out[i] = r.cfg
	}
	return out, nil
}

// renderLocked builds the NIC's ARM JSON with armnetwork's own types, so the shape is exactly
// what the SDK reads.
func (a *ARM) renderLocked(n *nic, configs []ipConfig, etag, state string, extras []byte) *armnetwork.Interface {
	var out armnetwork.Interface
	if len(extras) > 0 {
		_ = json.Unmarshal(extras, &out)
	}
	id := NICID(n.sub, n.rg, n.name)
	out.ID, out.Name, out.Etag, out.Location = to.Ptr(id), to.Ptr(n.name), to.Ptr(etag), to.Ptr(n.location)
	out.Type = to.Ptr("Microsoft.Network/networkInterfaces")
	if out.Properties == nil {
		out.Properties = &armnetwork.InterfacePropertiesFormat{}
	}
	p := out.Properties
	p.MacAddress = to.Ptr(armMAC(n.mac))
	p.ProvisioningState = to.Ptr(armnetwork.ProvisioningState(state))
	p.ResourceGUID = to.Ptr(n.guid)
	if p.NicType == nil {
		p.NicType = to.Ptr(armnetwork.NetworkInterfaceNicTypeStandard)
	}
	if p.EnableIPForwarding == nil {
		p.EnableIPForwarding = to.Ptr(false)
	}
	p.IPConfigurations = []*armnetwork.InterfaceIPConfiguration{}
	cfgState := armnetwork.ProvisioningStateSucceeded
	if state == StateUpdating {
		cfgState = armnetwork.ProvisioningStateUpdating
	}
	for _, c := range configs {
		method := armnetwork.IPAllocationMethodDynamic
		if c.static {
			method = armnetwork.IPAllocationMethodStatic
		}
		var asgs []*armnetwork.ApplicationSecurityGroup
		for _, g := range c.asgs {
			asgs = append(asgs, &armnetwork.ApplicationSecurityGroup{ID: to.Ptr(g)})
		}
		p.IPConfigurations = append(p.IPConfigurations, &armnetwork.InterfaceIPConfiguration{
			ID:   to.Ptr(id + "/ipConfigurations/" + c.name),
			Name: to.Ptr(c.name),
			Etag: to.Ptr(etag),
			Type: to.Ptr("Microsoft.Network/networkInterfaces/ipConfigurations"),
			Properties: &armnetwork.InterfaceIPConfigurationPropertiesFormat{
				PrivateIPAddress:          to.Ptr(c.addr.String()),
				PrivateIPAllocationMethod: to.Ptr(method),
				PrivateIPAddressVersion:   to.Ptr(armnetwork.IPVersionIPv4),
				Primary:                   to.Ptr(c.primary),
				Subnet:                    &armnetwork.Subnet{ID: to.Ptr(c.subnetID)},
				ApplicationSecurityGroups: asgs,
				ProvisioningState:         to.Ptr(cfgState),
			},
		})
	}
	return &out
}

// extrasOf keeps what a PUT said besides the IP configurations and read-only fields (tags, DNS
// settings, accelerated networking, …), so a GET after the PUT echoes them as ARM would.
func extrasOf(in armnetwork.Interface) []byte {
	in.ID, in.Name, in.Etag, in.Type = nil, nil, nil, nil
	if in.Properties != nil {
		p := *in.Properties
		p.IPConfigurations = nil
		p.MacAddress, p.ProvisioningState, p.ResourceGUID = nil, nil, nil
		in.Properties = &p
	}
	b, err := json.Marshal(in)
	if err != nil {
		return nil
	}
	return b
}

// etagMatches implements If-Match's list form: any listed etag (or *) that equals the current one.
func etagMatches(header, etag string) bool {
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimSpace(t)
		if t == "*" || t == etag {
			return true
		}
	}
	return false
}

// normLocation compares regions the way ARM does: "West Europe" is "westeurope".
func normLocation(l string) string {
	return strings.ToLower(strings.ReplaceAll(l, " ", ""))
}

// deref returns *p, or def when p is nil: ARM bodies leave out what is unset.
func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}
