package cni

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// gatewayIP is api.GatewayIP as the 4-byte slice netlink compares against.
var gatewayIP = net.IP(api.GatewayIP.AsSlice())

func hostPrefix(ip net.IP) *net.IPNet { return &net.IPNet{IP: ip, Mask: net.CIDRMask(32, 32)} }

var defaultDst = &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}

// wiring is what ADD puts in place for one attachment and what CHECK expects to find.
type wiring struct {
	ifName       string // container side
	hostName     string
	ip           net.IP // 4 bytes
	mtu          int
	hostMAC      net.HardwareAddr
	containerMAC net.HardwareAddr
}

func newWiring(k api.Key, ip net.IP, mtu int) *wiring {
	return &wiring{
		ifName:       k.IfName,
		hostName:     api.HostVethName(k),
		ip:           ip.To4(),
		mtu:          mtu,
		hostMAC:      api.HostMAC(k),
		containerMAC: api.ContainerMAC(k),
	}
}

// createVeth runs in the container's netns. It creates both ends, with their names, MACs
// and MTU, and the host end already in hostNS, in one netlink request: either the whole
// pair exists afterwards and is ours, or nothing was created. ip.SetupVethWithName cannot
// set the host end's MAC and, when it fails, does not say whether it created the pair;
// ADD's rollback needs to know exactly that.
func (w *wiring) createVeth(hostNS ns.NetNS) (netlink.Link, error) {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = w.ifName
	attrs.MTU = w.mtu
	attrs.HardwareAddr = w.containerMAC
	veth := &netlink.Veth{
		LinkAttrs:        attrs,
		PeerName:         w.hostName,
		PeerHardwareAddr: w.hostMAC,
		PeerMTU:          uint32(w.mtu),
		PeerNamespace:    netlink.NsFd(int(hostNS.Fd())),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("create veth %s (host end %s): %w", w.ifName, w.hostName, err)
	}
	link, err := netlink.LinkByName(w.ifName)
	if err != nil {
		return nil, fmt.Errorf("find new veth %s: %w", w.ifName, err)
	}
	return link, nil
}

// configureContainer runs in the container's netns. The order matters: IPv4 refuses a
// route through a link that is down, and a gateway route needs the link route first.
func (w *wiring) configureContainer(link netlink.Link) error {
	if err := disableIPv6(w.ifName); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", w.ifName, err)
	}
	if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: hostPrefix(w.ip)}); err != nil {
		return fmt.Errorf("add %s/32 to %s: %w", w.ip, w.ifName, err)
	}
	idx := link.Attrs().Index
	gwRoute := &netlink.Route{LinkIndex: idx, Dst: hostPrefix(gatewayIP), Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteAdd(gwRoute); err != nil {
		return fmt.Errorf("add route %s/32 dev %s scope link: %w", gatewayIP, w.ifName, err)
	}
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: idx, Dst: defaultDst, Gw: gatewayIP}); err != nil {
		return fmt.Errorf("add default route via %s dev %s: %w", gatewayIP, w.ifName, err)
	}
	// A permanent entry, so the container never needs an ARP answer for the gateway: the
	// datapath answers ARP too, but this keeps the first packet from waiting on it.
	neigh := &netlink.Neigh{
		LinkIndex:    idx,
		Family:       netlink.FAMILY_V4,
		State:        netlink.NUD_PERMANENT,
		IP:           gatewayIP,
		HardwareAddr: w.hostMAC,
	}
	if err := netlink.NeighAdd(neigh); err != nil {
		return fmt.Errorf("add neighbour %s lladdr %s dev %s: %w", gatewayIP, w.hostMAC, w.ifName, err)
	}
	return nil
}

// configureHost runs in the host netns on the veth createVeth put there. The /32 route is
// how the node itself (kubelet probes, host-network pods) reaches the container; traffic
// from other containers and the VNet is redirected by the datapath and never uses it.
func (w *wiring) configureHost() (netlink.Link, error) {
	link, err := netlink.LinkByName(w.hostName)
	if err != nil {
		return nil, fmt.Errorf("find host veth %s: %w", w.hostName, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("set %s up: %w", w.hostName, err)
	}
	route := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: hostPrefix(w.ip), Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteAdd(route); err != nil {
		return nil, fmt.Errorf("add route %s/32 dev %s scope link: %w", w.ip, w.hostName, err)
	}
	return link, nil
}

// hostLinkExists reports whether a link of that name is in the current netns.
func hostLinkExists(name string) (bool, error) {
	_, err := netlink.LinkByName(name)
	if err == nil {
		return true, nil
	}
	if errors.As(err, &netlink.LinkNotFoundError{}) {
		return false, nil
	}
	return false, fmt.Errorf("look up %s: %w", name, err)
}

// deleteLink deletes the named link of the current netns; a missing link is success, which
// makes DEL idempotent. Deleting either end of a veth deletes both, and the kernel drops
// every route through it, the host /32 route included.
func deleteLink(name string) error {
	link, err := netlink.LinkByName(name)
	if errors.As(err, &netlink.LinkNotFoundError{}) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if err := netlink.LinkDel(link); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// deleteContainerVeth deletes the container's interface, but only if it is a veth: an
// interface of that name of another kind was not made by vnetbpf.
func deleteContainerVeth(name string) error {
	link, err := netlink.LinkByName(name)
	if errors.As(err, &netlink.LinkNotFoundError{}) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if link.Type() != "veth" {
		return nil
	}
	if err := netlink.LinkDel(link); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// retryDump repeats a netlink dump that the kernel interrupted because the table changed
// under it (netlink returns ErrDumpInterrupted with partial results), as
// containernetworking's netlinksafe does; that package and pkg/ip need modules this
// module's go.sum does not carry.
func retryDump[T any](dump func() (T, error)) (T, error) {
	var v T
	var err error
	for range 5 {
		v, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return v, err
}

// disableIPv6 turns IPv6 off on the container's interface before it comes up. The datapath
// forwards IPv4 only and drops everything else a container sends, so the link-local address,
// router solicitations and MLD reports IPv6 would start with would only fill the drop counters
// and `vnetbpf-agent monitor`. /proc/sys/net belongs to the calling thread's namespace; a
// kernel without IPv6 has no such file, which is fine.
func disableIPv6(ifName string) error {
	p := "/proc/sys/net/ipv6/conf/" + ifName + "/disable_ipv6"
	if err := os.WriteFile(p, []byte("1"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("disable IPv6 on %s: %w", ifName, err)
	}
	return nil
}
