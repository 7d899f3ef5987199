// Package api holds the types and the client of the agent's HTTP+JSON API, which the agent
// serves on a Unix socket and which the CNI binary and the agent's debug subcommands call.
//
// Routes (all JSON):
//
//	POST   /v1/ipam/allocations                      AllocationRequest → Allocation
//	DELETE /v1/ipam/allocations/{containerID}/{ifName} → 204 (idempotent)
//	GET    /v1/ipam                                  → PoolState
//	PUT    /v1/endpoints/{containerID}/{ifName}      EndpointRequest → Endpoint
//	GET    /v1/endpoints/{containerID}/{ifName}      → Endpoint
//	DELETE /v1/endpoints/{containerID}/{ifName}      → 204 (idempotent; releases the address too)
//	GET    /v1/endpoints                             → []Endpoint
//	POST   /v1/gc                                    GCRequest → GCResponse
//	GET    /v1/status                                → Status
//	GET    /v1/events                                → a stream of DropEvent, one JSON object a line
//
// Every error is an Error body with a CNI error code, so that the CNI binary can pass the
// agent's verdict on to the runtime unchanged.
package api

import (
	"fmt"
	"net/netip"
	"time"
)

// DefaultSocket is where the agent serves the API unless configured otherwise.
const DefaultSocket = "/run/vnetbpf/agent.sock"

// GatewayIP is the link-local next hop every container routes through; the host-side veth
// answers for it.
var GatewayIP = netip.MustParseAddr("169.254.1.1")

// CNI error codes used in Error.Code (the CNI spec's well-known codes plus ours).
const (
	CodeIncompatibleVersion = 1
	CodeUnsupportedField    = 2
	CodeUnknownContainer    = 3
	CodeInvalidEnvironment  = 4
	CodeIOFailure           = 5
	CodeDecodingFailure     = 6
	CodeInvalidConfig       = 7
	CodeTryAgainLater       = 11
	CodeNotAvailable        = 50 // STATUS: the plugin cannot add containers now
	CodeInternal            = 999
)

// Key names one attachment: a container's interface.
type Key struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
}

func (k Key) String() string { return k.ContainerID + "/" + k.IfName }

// Owner describes who an address is allocated to.
type Owner struct {
	Key
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
	Netns        string `json:"netns,omitempty"`
}

// AllocationRequest asks the agent for an address for one attachment.
type AllocationRequest struct {
	Owner
}

// Allocation is an address given to an attachment, with what the container needs to use it.
type Allocation struct {
	Owner
	IP          netip.Addr     `json:"ip"`
	Gateway     netip.Addr     `json:"gateway"`
	MTU         int            `json:"mtu"`
	AllocatedAt time.Time      `json:"allocatedAt"`
	VNetCIDRs   []netip.Prefix `json:"vnetCIDRs,omitempty"`
}

// EndpointRequest registers a wired container interface with the agent, which then attaches
// from_container to the host-side veth and writes the endpoints map entry.
type EndpointRequest struct {
	Owner
	IP           netip.Addr `json:"ip"`
	HostIfName   string     `json:"hostIfName"`
	HostIfIndex  int        `json:"hostIfIndex"`
	HostMAC      string     `json:"hostMAC"`
	ContainerMAC string     `json:"containerMAC"`
	// AttachTCX asks for from_container through TCX at once, not a cls_bpf filter first:
	// a plugin later in the chain (bandwidth, for an egress limit) puts an ingress qdisc on
	// the host veth, which cannot live beside a clsact.
	AttachTCX bool `json:"attachTCX,omitempty"`
}

// Endpoint is a registered container interface as the agent sees it.
type Endpoint struct {
	EndpointRequest
	ID        uint32    `json:"id"`
	CreatedAt time.Time `json:"createdAt"`
	// Packet counts from the datapath, filled in by list calls.
	RxPackets uint64 `json:"rxPackets"`
	TxPackets uint64 `json:"txPackets"`
}

// AddressState is one address of the pool.
type AddressState struct {
	IP           netip.Addr `json:"ip"`
	State        string     `json:"state"` // "free", "allocated" or "cooling"
	Owner        *Owner     `json:"owner,omitempty"`
	CoolingUntil time.Time  `json:"coolingUntil,omitzero"`
}

// PoolState is the whole address pool.
type PoolState struct {
	Provider  string         `json:"provider"`
	Size      int            `json:"size"`
	Used      int            `json:"used"`
	Free      int            `json:"free"`
	Cooling   int            `json:"cooling"`
	Addresses []AddressState `json:"addresses"`
	// Provider-side state (azure): IP configurations on the NIC (primary included), those
	// being added, and the last failure to talk to ARM or IMDS, empty once one succeeds.
	IPConfigs     int       `json:"ipConfigs,omitempty"`
	Pending       int       `json:"pending"`
	LastError     string    `json:"lastError,omitempty"`
	LastErrorTime time.Time `json:"lastErrorTime,omitzero"`
}

// GCRequest lists the attachments the runtime still knows; the agent releases all others.
type GCRequest struct {
	ValidAttachments []Key `json:"validAttachments"`
}

// GCResponse says which attachments were released.
type GCResponse struct {
	Released []Key `json:"released"`
}

// Status is the agent's health and whether it can give an address now.
type Status struct {
	Version            string    `json:"version"`
	Ready              bool      `json:"ready"`
	CanAllocate        bool      `json:"canAllocate"`
	Reason             string    `json:"reason,omitempty"` // why CanAllocate is false
	Endpoints          int       `json:"endpoints"`
	Pool               PoolState `json:"pool"`
	NIC                string    `json:"nic"`
	AttachMode         string    `json:"attachMode"`         // the NIC's: tcx or tc
	EndpointAttachMode string    `json:"endpointAttachMode"` // the host veths': auto, tcx or tc
	// EndpointsOnClsBPF counts endpoints that attachMode auto has yet to move from their
	// cls_bpf filter to TCX (it does so while no CNI request runs).
	EndpointsOnClsBPF int       `json:"endpointsOnClsBpf"`
	StartedAt         time.Time `json:"startedAt"`
}

// DropEvent is one packet the datapath dropped, as `vnetbpf-agent monitor` prints it.
type DropEvent struct {
	Time      time.Time  `json:"time"`
	Reason    string     `json:"reason"`
	IfIndex   uint32     `json:"ifindex"`
	IfName    string     `json:"ifName,omitempty"`
	EtherType uint16     `json:"etherType"`
	Protocol  uint8      `json:"protocol"`
	Src       netip.Addr `json:"src"`
	Dst       netip.Addr `json:"dst"`
	SrcPort   uint16     `json:"srcPort"`
	DstPort   uint16     `json:"dstPort"`
	SrcMAC    string     `json:"srcMAC"`
}

// Error is the body of every non-2xx answer.
type Error struct {
	Code    uint   `json:"code"`
	Msg     string `json:"msg"`
	Details string `json:"details,omitempty"`
}

func (e *Error) Error() string {
	if e.Details == "" {
		return e.Msg
	}
	return fmt.Sprintf("%s: %s", e.Msg, e.Details)
}
