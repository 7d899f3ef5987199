package agent

import (
	"net/netip"
	"testing"
)

func TestNextHop(t *testing.T) {
	const nic, other, veth = 2, 3, 7
	pfx, addr := netip.MustParsePrefix, netip.MustParseAddr
	gw := addr("10.1.0.1")
	// Azure's layout: the VNet is 10.1.0.0/16, the NIC 10.1.0.4/24, the default route goes
	// through the subnet's gateway, and each container has a /32 to its host veth.
	azure := []route{
		{dst: pfx("0.0.0.0/0"), gw: gw, link: nic, unicast: true},
		{dst: pfx("10.1.0.0/24"), link: nic, unicast: true},
		{dst: pfx("10.1.0.10/32"), link: veth, unicast: true, hostVeth: true},
		{dst: pfx("168.63.129.16/32"), gw: gw, link: nic, unicast: true},
	}
	subnets := []netip.Prefix{pfx("10.1.0.0/24")}
	with := func(extra ...route) []route { return append(append([]route{}, azure...), extra...) }
	for _, c := range []struct {
		name   string
		p      netip.Prefix
		routes []route
		onLink bool
		via    netip.Addr
	}{
		{"the NIC's subnet is on link, containers' /32s aside", pfx("10.1.0.0/24"), azure, true, netip.Addr{}},
		{"the VNet goes through the gateway, not on link", pfx("10.1.0.0/16"), azure, false, gw},
		{"a peered VNet behind the default route", pfx("10.9.0.0/16"), azure, false, gw},
		{"a blackhole inside the VNet leaves it to the FIB", pfx("10.1.0.0/16"),
			with(route{dst: pfx("10.1.9.0/24"), link: 0, unicast: false}), false, netip.Addr{}},
		{"a route through another device inside the subnet", pfx("10.1.0.0/24"),
			with(route{dst: pfx("10.1.0.128/25"), link: other, unicast: true}), false, netip.Addr{}},
		{"a narrower route through the same gateway still decides part of it", pfx("10.1.0.0/16"),
			with(route{dst: pfx("10.1.5.0/24"), gw: gw, link: nic, unicast: true}), false, netip.Addr{}},
		{"the covering route leaves by another device", pfx("10.9.0.0/16"),
			with(route{dst: pfx("10.9.0.0/16"), link: other, unicast: true}), false, netip.Addr{}},
		{"a multipath route", pfx("10.9.0.0/16"),
			with(route{dst: pfx("10.8.0.0/15"), link: nic, unicast: true, multipath: true}), false, netip.Addr{}},
		{"no route at all", pfx("10.9.0.0/16"), azure[1:], false, netip.Addr{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			onLink, via, why := nextHop(c.p, c.routes, nic, subnets)
			if onLink != c.onLink || via != c.via {
				t.Errorf("nextHop(%s) = on link %v, via %v (%s); want on link %v, via %v", c.p, onLink, via, why, c.onLink, c.via)
			}
			if (onLink || via.IsValid()) != (why == "") {
				t.Errorf("nextHop(%s): reason %q with on link %v, via %v", c.p, why, onLink, via)
			}
		})
	}
}

func TestLastAddr(t *testing.T) {
	for p, want := range map[string]string{"10.1.0.0/24": "10.1.0.255", "10.1.0.7/16": "10.1.255.255", "10.1.0.0/30": "10.1.0.3"} {
		if got := lastAddr(netip.MustParsePrefix(p)); got.String() != want {
			t.Errorf("lastAddr(%s) = %s, want %s", p, got, want)
		}
	}
}
