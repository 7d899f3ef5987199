// Package maps gives typed access to the datapath's pinned maps, in the types bpf2go
// generated from bpf/datapath.h (pkg/loader), so Go and C share one definition.
package maps

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// The generated types under the names this package's callers use.
type (
	// Endpoint is a value of the endpoints map.
	Endpoint = loader.DatapathEndpoint
	// NodeConfig is the single value of the config map.
	NodeConfig = loader.DatapathNodeConfig
	// Stat is a packet and byte count.
	Stat = loader.DatapathStat
	// EndpointStat is one endpoint's packet and byte counts.
	EndpointStat = loader.DatapathEndpointStat
	// Reason is why a packet got its verdict: the key of the stats map.
	Reason = loader.DatapathStatReason
	// DropEvent is one dropped packet from the events ring buffer.
	DropEvent = loader.DatapathDropEvent
)

// Maps holds the datapath's maps.
type Maps struct {
	Endpoints     *ebpf.Map
	VNetCIDRs     *ebpf.Map
	Config        *ebpf.Map
	Stats         *ebpf.Map
	EndpointStats *ebpf.Map
	Events        *ebpf.Map
	owned         bool
}

// FromObjects wraps the maps of a loaded datapath; Close leaves them to the datapath.
func FromObjects(o *loader.DatapathObjects) *Maps {
	return &Maps{
		Endpoints:     o.Endpoints,
		VNetCIDRs:     o.VnetCidrs,
		Config:        o.Config,
		Stats:         o.Stats,
		EndpointStats: o.EndpointStats,
		Events:        o.Events,
	}
}

// Open opens the maps pinned under root, as a debugging tool or a test does without
// loading the programs.
func Open(root string) (*Maps, error) {
	m := &Maps{owned: true}
	for name, dst := range map[string]**ebpf.Map{
		loader.DatapathMapEndpoints:     &m.Endpoints,
		loader.DatapathMapVnetCidrs:     &m.VNetCIDRs,
		loader.DatapathMapConfig:        &m.Config,
		loader.DatapathMapStats:         &m.Stats,
		loader.DatapathMapEndpointStats: &m.EndpointStats,
		loader.DatapathMapEvents:        &m.Events,
	} {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(root, name), nil)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("open pinned map %s (is vnetbpf-agent running with bpfRoot %s?): %w", name, root, err)
		}
		*dst = mp
	}
	return m, nil
}

// Close closes the maps if Open opened them.
func (m *Maps) Close() error {
	if !m.owned {
		return nil
	}
	var errs []error
	for _, mp := range []*ebpf.Map{m.Endpoints, m.VNetCIDRs, m.Config, m.Stats, m.EndpointStats, m.Events} {
		if mp != nil {
			errs = append(errs, mp.Close())
		}
	}
	return errors.Join(errs...)
}

func endpointKey(ip netip.Addr) (loader.DatapathEndpointKey, error) {
	if !ip.Is4() {
		return loader.DatapathEndpointKey{}, fmt.Errorf("endpoint address %s is not IPv4", ip)
	}
	return loader.DatapathEndpointKey{Ip: ip.As4()}, nil
}

// MAC converts a hardware address to the datapath's 6-byte form.
func MAC(hw net.HardwareAddr) ([6]byte, error) {
	var mac [6]byte
	if len(hw) != 6 {
		return mac, fmt.Errorf("MAC %q is not a 6-byte Ethernet address", hw)
	}
	copy(mac[:], hw)
	return mac, nil
}

// PutEndpoint adds or replaces the endpoint for ip.
func (m *Maps) PutEndpoint(ip netip.Addr, ep Endpoint) error {
	k, err := endpointKey(ip)
	if err != nil {
		return err
	}
	if ep.Ifindex == 0 || ep.Id == 0 {
		return fmt.Errorf("endpoint %s: ifindex and id must be set", ip)
	}
	if err := m.Endpoints.Put(k, ep); err != nil {
		return fmt.Errorf("put endpoint %s: %w", ip, err)
	}
	return nil
}

// Endpoint returns the endpoint for ip; ebpf.ErrKeyNotExist if there is none.
func (m *Maps) Endpoint(ip netip.Addr) (Endpoint, error) {
	var ep Endpoint
	k, err := endpointKey(ip)
	if err != nil {
		return ep, err
	}
	if err := m.Endpoints.Lookup(k, &ep); err != nil {
		return ep, fmt.Errorf("lookup endpoint %s: %w", ip, err)
	}
	return ep, nil
}

// DeleteEndpoint removes the endpoint for ip; a missing one is not an error.
func (m *Maps) DeleteEndpoint(ip netip.Addr) error {
	k, err := endpointKey(ip)
	if err != nil {
		return err
	}
	if err := m.Endpoints.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %s: %w", ip, err)
	}
	return nil
}

// ListEndpoints returns every endpoint by address.
func (m *Maps) ListEndpoints() (map[netip.Addr]Endpoint, error) {
	out := make(map[netip.Addr]Endpoint)
	var k loader.DatapathEndpointKey
	var ep Endpoint
	it := m.Endpoints.Iterate()
	for it.Next(&k, &ep) {
		out[netip.AddrFrom4(k.Ip)] = ep
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints: %w", err)
	}
	return out, nil
}

// SetConfig writes the node's config; the programs see it on their next packet.
func (m *Maps) SetConfig(c NodeConfig) error {
	if err := m.Config.Put(uint32(0), c); err != nil {
		return fmt.Errorf("set config: %w", err)
	}
	return nil
}

// NodeConfig reads the node's config.
func (m *Maps) NodeConfig() (NodeConfig, error) {
	var c NodeConfig
	if err := m.Config.Lookup(uint32(0), &c); err != nil {
		return c, fmt.Errorf("read config: %w", err)
	}
	return c, nil
}

func vnetKey(p netip.Prefix) (loader.DatapathVnetKey, error) {
	if !p.Addr().Is4() {
		return loader.DatapathVnetKey{}, fmt.Errorf("VNet prefix %s is not IPv4", p)
	}
	p = p.Masked()
	return loader.DatapathVnetKey{Prefixlen: uint32(p.Bits()), Ip: p.Addr().As4()}, nil
}

// AddVNetCIDR marks p as reachable directly through the NIC, next hop from the FIB.
func (m *Maps) AddVNetCIDR(p netip.Prefix) error {
	return m.PutVNetCIDR(VNetCIDR{Prefix: p})
}

// AddHostAddress marks one of the node's own addresses, which lies inside a VNet prefix, as
// the host's: containers reach it through the host stack, never the NIC.
func (m *Maps) AddHostAddress(a netip.Addr) error {
	return m.PutVNetCIDR(VNetCIDR{Prefix: netip.PrefixFrom(a, a.BitLen()), Host: true})
}

// PutVNetCIDR adds or replaces the entry for c.Prefix.
func (m *Maps) PutVNetCIDR(c VNetCIDR) error {
	k, err := vnetKey(c.Prefix)
	if err != nil {
		return err
	}
	var v loader.DatapathVnetCidr
	switch {
	case c.Host && (c.OnLink || c.Via.IsValid()):
		return fmt.Errorf("VNet prefix %s: a host address has no next hop", c.Prefix)
	case c.OnLink && c.Via.IsValid():
		return fmt.Errorf("VNet prefix %s: on-link or via %s, not both", c.Prefix, c.Via)
	case c.Host:
		v.Flags = uint32(loader.DatapathVnetCidrFlagsVNET_CIDR_F_HOST)
	case c.OnLink:
		v.Flags = uint32(loader.DatapathVnetCidrFlagsVNET_CIDR_F_ONLINK)
	case c.Via.IsValid():
		if !c.Via.Is4() {
			return fmt.Errorf("VNet prefix %s: next hop %s is not IPv4", c.Prefix, c.Via)
		}
		v.Flags = uint32(loader.DatapathVnetCidrFlagsVNET_CIDR_F_VIA)
		v.Nexthop = c.Via.As4()
	}
	if err := m.VNetCIDRs.Put(k, v); err != nil {
		return fmt.Errorf("add VNet prefix %s: %w", c.Prefix, err)
	}
	return nil
}

// DeleteVNetCIDR removes p (a prefix or a host address as /32); a missing one is not an error.
func (m *Maps) DeleteVNetCIDR(p netip.Prefix) error {
	k, err := vnetKey(p)
	if err != nil {
		return err
	}
	if err := m.VNetCIDRs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete VNet prefix %s: %w", p, err)
	}
	return nil
}

// VNetCIDR is an entry of the vnet_cidrs map. At most one of Host, OnLink and Via is set;
// with none, the programs ask the FIB for the next hop of every packet to Prefix.
type VNetCIDR struct {
	Prefix netip.Prefix
	Host   bool       // one of the node's own addresses
	OnLink bool       // on the NIC's link: each destination is its own next hop
	Via    netip.Addr // the gateway out of the NIC, or the zero Addr
}

// ListVNetCIDRs lists the entries of the vnet_cidrs map.
func (m *Maps) ListVNetCIDRs() ([]VNetCIDR, error) {
	var out []VNetCIDR
	var k loader.DatapathVnetKey
	var v loader.DatapathVnetCidr
	it := m.VNetCIDRs.Iterate()
	for it.Next(&k, &v) {
		c := VNetCIDR{
			Prefix: netip.PrefixFrom(netip.AddrFrom4(k.Ip), int(k.Prefixlen)),
			Host:   v.Flags&uint32(loader.DatapathVnetCidrFlagsVNET_CIDR_F_HOST) != 0,
			OnLink: v.Flags&uint32(loader.DatapathVnetCidrFlagsVNET_CIDR_F_ONLINK) != 0,
		}
		if v.Flags&uint32(loader.DatapathVnetCidrFlagsVNET_CIDR_F_VIA) != 0 {
			c.Via = netip.AddrFrom4(v.Nexthop)
		}
		out = append(out, c)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list VNet prefixes: %w", err)
	}
	return out, nil
}

// ReadStats sums the per-CPU counters of every reason.
func (m *Maps) ReadStats() (map[Reason]Stat, error) {
	out := make(map[Reason]Stat, len(loader.Reasons()))
	for _, r := range loader.Reasons() {
		var perCPU []Stat
		if err := m.Stats.Lookup(uint32(r), &perCPU); err != nil {
			return nil, fmt.Errorf("read stats %s: %w", loader.ReasonName(r), err)
		}
		var sum Stat
		for _, s := range perCPU {
			sum.Packets += s.Packets
			sum.Bytes += s.Bytes
		}
		out[r] = sum
	}
	return out, nil
}

// ReadEndpointStat returns the counts of the endpoint with the given id, summed over CPUs.
func (m *Maps) ReadEndpointStat(id uint32) (EndpointStat, error) {
	var sum EndpointStat
	var perCPU []EndpointStat
	if err := m.EndpointStats.Lookup(id, &perCPU); err != nil {
		return sum, fmt.Errorf("read endpoint stats %d: %w", id, err)
	}
	for _, s := range perCPU {
		sum.RxPackets += s.RxPackets
		sum.RxBytes += s.RxBytes
		sum.TxPackets += s.TxPackets
		sum.TxBytes += s.TxBytes
	}
	return sum, nil
}

// ResetEndpointStat zeroes the counts of id on every CPU, for an id handed to a new endpoint.
func (m *Maps) ResetEndpointStat(id uint32) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	if err := m.EndpointStats.Put(id, make([]EndpointStat, n)); err != nil {
		return fmt.Errorf("reset endpoint stats %d: %w", id, err)
	}
	return nil
}

// MaxEndpointIDs is one more than the largest endpoint id: the size of endpoint_stats.
func (m *Maps) MaxEndpointIDs() uint32 {
	return m.EndpointStats.MaxEntries()
}
