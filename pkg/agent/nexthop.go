package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// route is what the next-hop choice needs of one route of the node's main table.
type route struct {
	dst       netip.Prefix // 0.0.0.0/0 for the default route
	gw        netip.Addr   // invalid when on link
	link      int
	unicast   bool
	multipath bool
	hostVeth  bool // a container's /32 route to its host veth: the endpoints map decides those
}

// vnetEntries is what the vnet_cidrs map should hold: the node's own addresses (and its
// subnets' broadcast addresses) for the host stack, the NIC's subnets inside the VNet
// prefixes, and the prefixes themselves. A prefix gets a next hop only where the node's
// routing would send every packet of it the same way out of the NIC: then the programs skip
// the FIB. Anything else (policy rules, a narrower route inside the prefix, a route through
// another device, no route) leaves the prefix to a FIB lookup per packet, as the kernel
// would route it.
func (a *Agent) vnetEntries() []maps.VNetCIDR {
	var want []maps.VNetCIDR
	add := func(c maps.VNetCIDR) {
		if !slices.ContainsFunc(want, func(w maps.VNetCIDR) bool { return w.Prefix == c.Prefix }) {
			want = append(want, c)
		}
	}
	for _, ip := range a.nic.addrs {
		add(maps.VNetCIDR{Prefix: netip.PrefixFrom(ip, 32), Host: true})
	}
	for _, s := range a.nic.subnets {
		if s.Bits() < 31 {
			add(maps.VNetCIDR{Prefix: netip.PrefixFrom(lastAddr(s), 32), Host: true})
		}
	}
	routes, err := a.readRoutes()
	if err != nil {
		a.log.Warn("cannot read the node's routes; VNet packets take the FIB", "err", err)
	}
	var prefixes []netip.Prefix
	for _, s := range a.nic.subnets {
		if slices.ContainsFunc(a.vnet, func(p netip.Prefix) bool { return p.Bits() <= s.Bits() && p.Contains(s.Addr()) }) {
			prefixes = append(prefixes, s)
		}
	}
	prefixes = append(prefixes, a.vnet...)
	for _, p := range prefixes {
		c := maps.VNetCIDR{Prefix: p}
		if err == nil {
			var why string
			c.OnLink, c.Via, why = nextHop(p, routes, a.nic.index, a.nic.subnets)
			if why != "" {
				a.log.Info("VNet prefix without a next hop; its packets take the FIB", "prefix", p.String(), "why", why)
			}
		}
		add(c)
	}
	return want
}

// readRoutes lists the main table's IPv4 routes; with policy rules beyond the kernel's three
// (local, main, default) the main table does not say how a packet is routed, and it fails.
func (a *Agent) readRoutes() ([]route, error) {
	rules, err := netlink.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list rules: %w", err)
	}
	for _, r := range rules {
		if r.Table != unix.RT_TABLE_LOCAL && r.Table != unix.RT_TABLE_MAIN && r.Table != unix.RT_TABLE_DEFAULT {
			return nil, fmt.Errorf("the node has policy routing rules (table %d, priority %d)", r.Table, r.Priority)
		}
	}
	links, err := netlinksafe.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	veth := map[int]bool{}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, api.HostVethPrefix) {
			veth[l.Attrs().Index] = true
		}
	}
	nl, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	out := make([]route, 0, len(nl))
	for _, r := range nl {
		rt := route{dst: netip.PrefixFrom(netip.IPv4Unspecified(), 0), link: r.LinkIndex,
			unicast: r.Type == unix.RTN_UNICAST, multipath: len(r.MultiPath) > 0, hostVeth: veth[r.LinkIndex]}
		if r.Dst != nil {
			ip, ok := netip.AddrFromSlice(r.Dst.IP.To4())
			ones, _ := r.Dst.Mask.Size()
			if !ok {
				continue
			}
			rt.dst = netip.PrefixFrom(ip, ones).Masked()
		}
		if gw, ok := netip.AddrFromSlice(r.Gw.To4()); ok && r.Gw != nil {
			rt.gw = gw
		}
		out = append(out, rt)
	}
	return out, nil
}

// nextHop decides p's next hop from the routes: the most specific route that covers all of
// p must be a unicast route out of nic, and no narrower route may decide part of p, apart
// from the containers' own /32s and the NIC's subnets (which have entries of their own). why
// says, when there is no next hop, what stood in the way.
func nextHop(p netip.Prefix, routes []route, nic int, subnets []netip.Prefix) (onLink bool, via netip.Addr, why string) {
	var cover *route
	for i, r := range routes {
		switch {
		case r.dst.Bits() <= p.Bits() && r.dst.Contains(p.Addr()):
			if cover == nil || r.dst.Bits() > cover.dst.Bits() {
				cover = &routes[i]
			}
		case r.dst.Bits() > p.Bits() && p.Contains(r.dst.Addr()):
			if r.hostVeth || (r.link == nic && !r.gw.IsValid() && slices.Contains(subnets, r.dst) && r.dst != p) {
				continue
			}
			return false, netip.Addr{}, fmt.Sprintf("the route to %s inside it", r.dst)
		}
	}
	switch {
	case cover == nil:
		return false, netip.Addr{}, "no route covers it"
	case cover.link != nic || !cover.unicast || cover.multipath:
		return false, netip.Addr{}, fmt.Sprintf("its route (%s) is not a unicast route out of the NIC", cover.dst)
	case cover.gw.IsValid():
		return false, cover.gw, ""
	}
	return true, netip.Addr{}, ""
}

// lastAddr is the highest address of p: an IPv4 subnet's broadcast address.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
