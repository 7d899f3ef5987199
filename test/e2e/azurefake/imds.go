package azurefake

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// IMDSAPIVersion is the IMDS api-version whose document shape the fake follows.
const IMDSAPIVersion = "2021-02-01"

// VM describes the virtual machine an IMDS belongs to: the compute document, and the identity
// the agent derives its ARM calls from (subscription, resource group).
type VM struct {
	SubscriptionID string
	ResourceGroup  string
	Name           string
	Location       string
	// VMID is the VM's unique ID (a GUID); NewIMDS makes one up when empty.
	VMID string
	// VMSize is reported as vmSize; NewIMDS uses Standard_D4s_v5 when empty.
	VMSize string
}

// ComputeDoc is IMDS's compute document (/metadata/instance/compute), as far as the fake models
// it. Every value is a string, as IMDS sends them.
type ComputeDoc struct {
	AzEnvironment     string `json:"azEnvironment"`
	Location          string `json:"location"`
	Name              string `json:"name"`
	OSType            string `json:"osType"`
	Provider          string `json:"provider"`
	ResourceGroupName string `json:"resourceGroupName"`
	ResourceID        string `json:"resourceId"`
	SubscriptionID    string `json:"subscriptionId"`
	Tags              string `json:"tags"`
	VMID              string `json:"vmId"`
	VMSize            string `json:"vmSize"`
	Zone              string `json:"zone"`
}

// NetworkDoc is IMDS's network document (/metadata/instance/network).
type NetworkDoc struct {
	Interface []InterfaceDoc `json:"interface"`
}

// InterfaceDoc is one NIC in the network document.
type InterfaceDoc struct {
	IPv4 struct {
		IPAddress []IPAddressDoc `json:"ipAddress"`
		Subnet    []SubnetDoc    `json:"subnet"`
	} `json:"ipv4"`
	IPv6 struct {
		IPAddress []IPAddressDoc `json:"ipAddress"`
	} `json:"ipv6"`
	// MACAddress is 12 uppercase hex digits without separators, e.g. "000D3AF806EC".
	MACAddress string `json:"macAddress"`
}

// IPAddressDoc is one address of a NIC; the primary comes first.
type IPAddressDoc struct {
	PrivateIPAddress string `json:"privateIpAddress"`
	PublicIPAddress  string `json:"publicIpAddress"`
}

// SubnetDoc is a subnet of a NIC: its network address and prefix length, both strings.
type SubnetDoc struct {
	Address string `json:"address"`
	Prefix  string `json:"prefix"`
}

// InstanceDoc is the full instance document (/metadata/instance).
type InstanceDoc struct {
	Compute ComputeDoc `json:"compute"`
	Network NetworkDoc `json:"network"`
}

// IMDS is a fake Instance Metadata Service for one VM, an http.Handler answering
//
//	GET /metadata/instance[/compute|/network][/<path into the document>]?api-version=…[&format=json|text]
//	GET /metadata/identity/oauth2/token?api-version=…&resource=…
//
// with header "Metadata: true". Feed it from ARM with arm.OnChange(imds.Update); it ignores NICs
// that are not this VM's. All methods are safe for concurrent use.
type IMDS struct {
	mu     sync.Mutex
	vm     VM
	nics   []*imdsNIC
	delay  time.Duration
	failN  int
	failSt int
	counts map[int]int
	tokens int
}

type imdsNIC struct {
	id       string
	versions []imdsVersion // pending and visible states, oldest first
}

type imdsVersion struct {
	visibleAt time.Time
	state     NICState
}

// NewIMDS returns the IMDS of vm, whose NICs are nics in order (the primary NIC first), visible
// immediately.
func NewIMDS(vm VM, nics ...NICState) *IMDS {
	if vm.VMID == "" {
		vm.VMID = newUUID()
	}
	if vm.VMSize == "" {
		vm.VMSize = "Standard_D4s_v5"
	}
	m := &IMDS{vm: vm, counts: map[int]int{}}
	for _, n := range nics {
		m.nics = append(m.nics, &imdsNIC{id: strings.ToLower(n.ID), versions: []imdsVersion{{state: n.clone()}}})
	}
	return m
}

// Update tells the IMDS that ARM committed a new state of a NIC. The document shows it once the
// propagation delay has passed (removals too: IMDS lags in both directions). States of NICs that
// are not this VM's are ignored, so every node's IMDS can subscribe to the one ARM.
func (m *IMDS) Update(nic NICState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, n := range m.nics {
		if n.id == strings.ToLower(nic.ID) {
			n.versions = append(n.versions, imdsVersion{visibleAt: time.Now().Add(m.delay), state: nic.clone()})
			return
		}
	}
}

// SetPropagationDelay sets how long after an Update the document shows it, as real IMDS lags
// behind ARM; it applies to later Updates.
func (m *IMDS) SetPropagationDelay(d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.delay = d
}

// FailNext makes the next n requests (Metadata header or not) fail with status, e.g. 429 (IMDS
// throttles above 5 requests per second) or 500.
func (m *IMDS) FailNext(n, status int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failN, m.failSt = n, status
}

// Count returns how many requests got status; 0 counts all.
func (m *IMDS) Count(status int) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if status != 0 {
		return m.counts[status]
	}
	total := 0
	for _, c := range m.counts {
		total += c
	}
	return total
}

// TokensIssued returns how many managed-identity tokens the IMDS handed out.
func (m *IMDS) TokensIssued() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.tokens
}

// Network returns the network document as a client would see it now.
func (m *IMDS) Network() NetworkDoc {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.networkLocked()
}

func (m *IMDS) networkLocked() NetworkDoc {
	now := time.Now()
	doc := NetworkDoc{Interface: []InterfaceDoc{}}
	for _, n := range m.nics {
		// The newest version already visible wins; older ones are dropped.
		vis := 0
		for i, v := range n.versions {
			if !v.visibleAt.After(now) {
				vis = i
			}
		}
		n.versions = n.versions[vis:]
		s := n.versions[0].state
		var d InterfaceDoc
		d.MACAddress = imdsMAC(s.MAC)
		d.IPv4.IPAddress = []IPAddressDoc{}
		d.IPv4.Subnet = []SubnetDoc{}
		d.IPv6.IPAddress = []IPAddressDoc{}
		for _, a := range s.Addresses() {
			d.IPv4.IPAddress = append(d.IPv4.IPAddress, IPAddressDoc{PrivateIPAddress: a.String()})
		}
		if p, ok := s.Primary(); ok && p.Subnet.IsValid() {
			d.IPv4.Subnet = append(d.IPv4.Subnet, SubnetDoc{Address: p.Subnet.Addr().String(), Prefix: strconv.Itoa(p.Subnet.Bits())})
		}
		doc.Interface = append(doc.Interface, d)
	}
	return doc
}

func (m *IMDS) computeLocked() ComputeDoc {
	return ComputeDoc{
		AzEnvironment:     "AzurePublicCloud",
		Location:          m.vm.Location,
		Name:              m.vm.Name,
		OSType:            "Linux",
		Provider:          "Microsoft.Compute",
		ResourceGroupName: m.vm.ResourceGroup,
		ResourceID:        fmt.Sprintf("/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Compute/virtualMachines/%s", m.vm.SubscriptionID, m.vm.ResourceGroup, m.vm.Name),
		SubscriptionID:    m.vm.SubscriptionID,
		VMID:              m.vm.VMID,
		VMSize:            m.vm.VMSize,
	}
}

// ServeHTTP answers IMDS requests; see the type's documentation.
func (m *IMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	status, body, text := m.serve(r)
	if text {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	} else {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
	}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func (m *IMDS) serve(r *http.Request) (status int, body []byte, text bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	defer func() { m.counts[status]++ }()
	fail := func(st int, msg string) (int, []byte, bool) {
		b, _ := json.Marshal(map[string]string{"error": msg})
		return st, b, false
	}
	if m.failN > 0 {
		m.failN--
		if m.failSt == http.StatusTooManyRequests {
			return fail(m.failSt, "Too many requests")
		}
		return fail(m.failSt, http.StatusText(m.failSt))
	}
	// IMDS refuses anything that might have come through a proxy or from a browser.
	if r.Header.Get("Metadata") != "true" {
		return fail(http.StatusBadRequest, "Bad request. Required metadata header not specified")
	}
	if r.Header.Get("X-Forwarded-For") != "" {
		return fail(http.StatusBadRequest, "Bad request. X-Forwarded-For header is not allowed")
	}
	if r.Method != http.MethodGet {
		return fail(http.StatusMethodNotAllowed, "Method not allowed")
	}
	q := r.URL.Query()
	if q.Get("api-version") == "" {
		b, _ := json.Marshal(map[string]any{
			"error":           "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds",
			"newest-versions": []string{"2023-07-01", "2021-12-13", IMDSAPIVersion},
		})
		return http.StatusBadRequest, b, false
	}

	path := strings.Trim(r.URL.Path, "/")
	if path == "metadata/identity/oauth2/token" {
		return m.tokenLocked(q.Get("resource"))
	}
	rest, ok := strings.CutPrefix(path, "metadata/instance")
	if !ok || (rest != "" && rest[0] != '/') {
		return fail(http.StatusNotFound, "Not found")
	}
	// Walk the generic JSON of the full document, so that both /network and leaf paths such as
	// /network/interface/0/ipv4/ipAddress/0/privateIpAddress work as in IMDS.
	raw, _ := json.Marshal(InstanceDoc{Compute: m.computeLocked(), Network: m.networkLocked()})
	var node any
	_ = json.Unmarshal(raw, &node)
	for _, seg := range strings.Split(strings.Trim(rest, "/"), "/") {
		if seg == "" {
			continue
		}
		switch v := node.(type) {
		case map[string]any:
			if node, ok = v[seg]; !ok {
				return fail(http.StatusNotFound, "Not found")
			}
		case []any:
			i, err := strconv.Atoi(seg)
			if err != nil || i < 0 || i >= len(v) {
				return fail(http.StatusNotFound, "Not found")
			}
			node = v[i]
		default:
			return fail(http.StatusNotFound, "Not found")
		}
	}
	switch q.Get("format") {
	case "", "json":
		b, _ := json.Marshal(node)
		return http.StatusOK, b, false
	case "text":
		if s, ok := node.(string); ok {
			return http.StatusOK, []byte(s), true
		}
		return fail(http.StatusBadRequest, "Bad request. format=text is only supported for leaf values")
	default:
		return fail(http.StatusBadRequest, "Bad request. Unsupported format")
	}
}

// tokenLocked issues a managed-identity token in IMDS's shape, so that azidentity's
// ManagedIdentityCredential works against the fake when 169.254.169.254 reaches it (azidentity
// has no knob for the IMDS address). The token is opaque; the fake ARM accepts any bearer token.
func (m *IMDS) tokenLocked(resource string) (int, []byte, bool) {
	if resource == "" {
		b, _ := json.Marshal(map[string]string{"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"})
		return http.StatusBadRequest, b, false
	}
	m.tokens++
	now := time.Now()
	b, _ := json.Marshal(map[string]string{
		"access_token":   fmt.Sprintf("azurefake-token-%s-%d", m.vm.Name, m.tokens),
		"client_id":      m.vm.VMID,
		"expires_in":     "86399",
		"expires_on":     strconv.FormatInt(now.Add(24*time.Hour).Unix(), 10),
		"ext_expires_in": "86399",
		"not_before":     strconv.FormatInt(now.Unix(), 10),
		"resource":       resource,
		"token_type":     "Bearer",
	})
	return http.StatusOK, b, false
}
