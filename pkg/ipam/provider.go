package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Provider supplies the addresses this node may hand out. The pool never asks a provider
// itself: the agent polls it and passes the answer to Pool.SetAddresses, so that a slow or
// failing cloud API delays growth but never blocks an allocation.
type Provider interface {
	// Name identifies the provider in PoolState and in logs.
	Name() string
	// Addresses returns every address the pool may own now; a provider that shrinks the set
	// must leave out only addresses it has taken away from the node.
	Addresses(ctx context.Context) ([]netip.Addr, error)
}

// MaxStaticAddresses bounds what a static configuration may expand to, so that a typo such
// as "10.0.0.0/8" fails loudly instead of building a pool of millions of addresses; it is
// the size of the datapath's endpoints map, which no more containers can fit in anyway.
const MaxStaticAddresses = 65536

// Static is the provider for addresses listed in the configuration: bare metal, tests and
// the demo, where nothing needs to be asked of a cloud.
type Static struct {
	addrs []netip.Addr
}

var _ Provider = (*Static)(nil)

// NewStatic parses addresses ("10.0.0.5") and CIDRs ("10.0.1.0/28"). A CIDR shorter than /31
// contributes every address but its network and broadcast address, which a host on that
// subnet cannot use. Duplicates and overlaps are merged. Only IPv4 is accepted until the
// datapath handles IPv6, so that a container never gets an address nothing forwards.
func NewStatic(entries []string) (*Static, error) {
	if len(entries) == 0 {
		return nil, errors.New("static provider: no addresses configured")
	}
	seen := make(map[netip.Addr]struct{})
	for _, entry := range entries {
		addrs, err := parseStaticEntry(entry)
		if err != nil {
			return nil, fmt.Errorf("static provider: entry %q: %w", entry, err)
		}
		for _, a := range addrs {
			seen[a] = struct{}{}
		}
		if len(seen) > MaxStaticAddresses {
			return nil, fmt.Errorf("static provider: entry %q: the entries add up to more than %d addresses", entry, MaxStaticAddresses)
		}
	}
	s := &Static{addrs: make([]netip.Addr, 0, len(seen))}
	for a := range seen {
		s.addrs = append(s.addrs, a)
	}
	slices.SortFunc(s.addrs, netip.Addr.Compare)
	return s, nil
}

func parseStaticEntry(entry string) ([]netip.Addr, error) {
	e := strings.TrimSpace(entry)
	if e == "" {
		return nil, errors.New("empty entry")
	}
	if !strings.Contains(e, "/") {
		a, err := netip.ParseAddr(e)
		if err != nil {
			return nil, errors.New("not an IPv4 address or CIDR")
		}
		if !a.Is4() {
			return nil, errors.New("IPv6 is not supported yet")
		}
		if err := checkUsable(a); err != nil {
			return nil, err
		}
		return []netip.Addr{a}, nil
	}
	p, err := netip.ParsePrefix(e)
	if err != nil {
		return nil, errors.New("not an IPv4 address or CIDR")
	}
	if !p.Addr().Is4() {
		return nil, errors.New("IPv6 is not supported yet")
	}
	if m := p.Masked(); m != p {
		// "10.0.1.5/28" is more likely a typo than a wish for the whole /28.
		return nil, fmt.Errorf("host bits are set; did you mean %s?", m)
	}
	if n := 1 << (32 - p.Bits()); n > MaxStaticAddresses {
		return nil, fmt.Errorf("%d addresses is more than the %d allowed", n, MaxStaticAddresses)
	}
	var addrs []netip.Addr
	for a := p.Addr(); a.IsValid() && p.Contains(a); a = a.Next() {
		addrs = append(addrs, a)
	}
	if p.Bits() < 31 {
		addrs = addrs[1 : len(addrs)-1]
	}
	for _, a := range addrs {
		if err := checkUsable(a); err != nil {
			return nil, err
		}
	}
	return addrs, nil
}

// checkUsable refuses addresses no container can be reached on; link-local matters most,
// since 169.254.1.1 is every container's gateway.
func checkUsable(a netip.Addr) error {
	if !a.IsGlobalUnicast() {
		return fmt.Errorf("%s is not a unicast address a container can use (loopback, link-local, multicast or broadcast)", a)
	}
	return nil
}

// Name is "static", as the configuration spells the provider.
func (s *Static) Name() string { return "static" }

// Addresses returns a copy, so that a caller sorting or trimming it cannot change the
// provider's answer for the next poll.
func (s *Static) Addresses(context.Context) ([]netip.Addr, error) {
	return slices.Clone(s.addrs), nil
}
