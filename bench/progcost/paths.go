package progcost

import (
	"net"
	"net/netip"

	"github.com/google/gopacket/layers"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// TC verdicts as BPF_PROG_TEST_RUN reports them.
const (
	actOK       = 0
	actShot     = 2
	actRedirect = 7
)

// Path is one branch of a datapath program and a frame that takes it.
type Path struct {
	// Name says which packet it is, as the table shows it.
	Name string
	// Program is the program the frame is given to.
	Program loader.Program
	// Reason is the stats counter the branch counts under; the run fails if any other
	// counter moves, so a change to the C that sends the frame elsewhere is caught.
	Reason maps.Reason
	// Verdict is the TC verdict the branch returns.
	Verdict uint32
	// Forwarding runs the frame in the namespace whose NIC forwards.
	Forwarding bool
	// Rewrites marks a branch that turns the frame into one that takes another branch (an
	// ARP request becomes a reply), so it can run only once per test-run call.
	Rewrites bool
	// Frame is the packet.
	Frame []byte
}

// Label is the program and the path name.
func (p Path) Label() string { return string(p.Program) + ": " + p.Name }

// The frames' TTL: each forwarding run decrements it, and the run must stay above 1.
const ttl = 255

// MaxRepeat is the most runs one call may make on one frame: a forwarding branch decrements
// the TTL on every run, and at TTL 1 the frame would be dropped instead.
const MaxRepeat = ttl - 2

func udp(src netip.Addr, srcMAC net.HardwareAddr, dst netip.Addr, dstMAC net.HardwareAddr, ttl uint8) []byte {
	return testutils.IPv4{SrcMAC: srcMAC, DstMAC: dstMAC, Src: src, Dst: dst, TTL: ttl,
		SrcPort: 40000, DstPort: 5201, Payload: make([]byte, 18)}.Frame()
}

// ethOnly is an Ethernet header of the given type followed by n zero bytes.
func ethOnly(src net.HardwareAddr, ethertype uint16, n int) []byte {
	b := make([]byte, 14+n)
	copy(b[0:6], layers.EthernetBroadcast)
	copy(b[6:12], src)
	b[12], b[13] = byte(ethertype>>8), byte(ethertype)
	return b
}

// Paths lists every branch of both programs that a frame can reach in BPF_PROG_TEST_RUN:
// each forwarding branch, each pass to the stack, the ARP answers, and each drop reason.
func Paths() []Path {
	fc, fv := loader.FromContainer, loader.FromVNet
	ipHeaderLen4 := func(b []byte) []byte { b[14] = 0x44; return b } // IHL below 5
	return []Path{
		{Name: "local delivery (to a container on the node)", Program: fc, Reason: loader.DatapathStatReasonFWD_LOCAL, Verdict: actRedirect,
			Frame: udp(addrA, macA, addrB, hostMACA, ttl)},
		{Name: "to the VNet, on link (next hop from vnet_cidrs)", Program: fc, Reason: loader.DatapathStatReasonFWD_TO_VNET, Verdict: actRedirect,
			Frame: udp(addrA, macA, onLinkIP, hostMACA, ttl)},
		{Name: "to the VNet, via the gateway (next hop from vnet_cidrs)", Program: fc, Reason: loader.DatapathStatReasonFWD_TO_VNET, Verdict: actRedirect,
			Frame: udp(addrA, macA, viaIP, hostMACA, ttl)},
		{Name: "to the VNet, no next hop, node does not forward (FIB, redirect_neigh)", Program: fc, Reason: loader.DatapathStatReasonFWD_TO_VNET, Verdict: actRedirect,
			Frame: udp(addrA, macA, remoteIP, hostMACA, ttl)},
		{Name: "to the VNet, no next hop, FIB hit (node forwards)", Program: fc, Reason: loader.DatapathStatReasonFWD_TO_VNET, Verdict: actRedirect, Forwarding: true,
			Frame: udp(addrA, macA, remoteIP, hostMACA, ttl)},
		{Name: "to the VNet, no next hop, no neighbour yet (node forwards)", Program: fc, Reason: loader.DatapathStatReasonFWD_TO_VNET, Verdict: actRedirect, Forwarding: true,
			Frame: udp(addrA, macA, unknownIP, hostMACA, ttl)},
		{Name: "to the stack: outside the VNet", Program: fc, Reason: loader.DatapathStatReasonPASS_TO_STACK, Verdict: actOK,
			Frame: udp(addrA, macA, outsideIP, hostMACA, ttl)},
		{Name: "to the stack: the node's own address", Program: fc, Reason: loader.DatapathStatReasonPASS_TO_STACK, Verdict: actOK,
			Frame: udp(addrA, macA, nicIP, hostMACA, ttl)},
		{Name: "ARP request for the gateway, answered", Program: fc, Reason: loader.DatapathStatReasonARP_REPLY, Verdict: actRedirect, Rewrites: true,
			Frame: testutils.ARP{SrcMAC: macA, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: macA, SPA: addrA, TPA: gatewayIP}.Frame()},
		{Name: "ARP announcement, to the stack", Program: fc, Reason: loader.DatapathStatReasonARP_TO_STACK, Verdict: actOK,
			Frame: testutils.ARP{SrcMAC: macA, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: macA, SPA: addrA, TPA: addrA}.Frame()},
		{Name: "drop: source IP not its own", Program: fc, Reason: loader.DatapathStatReasonDROP_SPOOFED_IP, Verdict: actShot,
			Frame: udp(strangerIP, macA, addrB, hostMACA, ttl)},
		{Name: "drop: source MAC not its own", Program: fc, Reason: loader.DatapathStatReasonDROP_SPOOFED_MAC, Verdict: actShot,
			Frame: udp(addrA, otherMAC, addrB, hostMACA, ttl)},
		{Name: "drop: ARP claiming another address", Program: fc, Reason: loader.DatapathStatReasonDROP_ARP_SPOOFED, Verdict: actShot,
			Frame: testutils.ARP{SrcMAC: macA, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: macA, SPA: addrB, TPA: addrB}.Frame()},
		{Name: "drop: TTL exceeded", Program: fc, Reason: loader.DatapathStatReasonDROP_TTL_EXCEEDED, Verdict: actShot,
			Frame: udp(addrA, macA, addrB, hostMACA, 1)},
		{Name: "drop: no route (blackhole)", Program: fc, Reason: loader.DatapathStatReasonDROP_NO_ROUTE, Verdict: actShot, Forwarding: true,
			Frame: udp(addrA, macA, blackholed, hostMACA, ttl)},
		{Name: "drop: unsupported ethertype (IPv6)", Program: fc, Reason: loader.DatapathStatReasonDROP_UNSUPPORTED, Verdict: actShot,
			Frame: ethOnly(macA, 0x86dd, 60)},
		{Name: "drop: malformed IPv4 header", Program: fc, Reason: loader.DatapathStatReasonDROP_MALFORMED, Verdict: actShot,
			Frame: ipHeaderLen4(udp(addrA, macA, addrB, hostMACA, ttl))},

		{Name: "to a container", Program: fv, Reason: loader.DatapathStatReasonFWD_FROM_VNET, Verdict: actRedirect,
			Frame: udp(remoteIP, neighMAC, addrA, nicMAC, ttl)},
		{Name: "ARP request for a container, answered", Program: fv, Reason: loader.DatapathStatReasonARP_REPLY, Verdict: actRedirect, Rewrites: true,
			Frame: testutils.ARP{SrcMAC: neighMAC, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: neighMAC, SPA: remoteIP, TPA: addrA}.Frame()},
		{Name: "to the host: the node's own address", Program: fv, Reason: loader.DatapathStatReasonPASS_VNET_TO_HOST, Verdict: actOK,
			Frame: udp(remoteIP, neighMAC, nicIP, nicMAC, ttl)},
		{Name: "to the host: ARP request for the node", Program: fv, Reason: loader.DatapathStatReasonPASS_VNET_TO_HOST, Verdict: actOK,
			Frame: testutils.ARP{SrcMAC: neighMAC, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: neighMAC, SPA: remoteIP, TPA: nicIP}.Frame()},
		{Name: "to the host: IPv6", Program: fv, Reason: loader.DatapathStatReasonPASS_VNET_TO_HOST, Verdict: actOK,
			Frame: ethOnly(neighMAC, 0x86dd, 60)},
		{Name: "drop: TTL exceeded", Program: fv, Reason: loader.DatapathStatReasonDROP_TTL_EXCEEDED, Verdict: actShot,
			Frame: udp(remoteIP, neighMAC, addrA, nicMAC, 1)},
	}
}
