package azurefake

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// NICState is a snapshot of a network interface as ARM has committed it. It is a plain value:
// holding one never blocks the fake, and changing it changes nothing in the fake.
type NICState struct {
	// ID is the NIC's full ARM resource ID.
	ID string
	// Subscription, ResourceGroup and Name locate the NIC (Name as it was created).
	Subscription, ResourceGroup, Name string
	// Location is the NIC's Azure region, as given when it was created.
	Location string
	// MAC is the NIC's hardware address; the simulated VNet keys its neighbour entries on it.
	MAC net.HardwareAddr
	// ETag is the NIC's current etag (W/"…"), which If-Match must quote to update it.
	ETag string
	// ProvisioningState is "Succeeded", "Updating" while an operation runs, or "Failed" after an
	// operation failed (as Azure leaves it until the next successful PUT).
	ProvisioningState string
	// IPConfigurations are the committed IP configurations, in ARM's order.
	IPConfigurations []IPConfigState
}

// IPConfigState is one committed IP configuration of a NIC.
type IPConfigState struct {
	// Name is the configuration's name, unique within the NIC.
	Name string
	// ID is the configuration's ARM resource ID (the NIC's ID + /ipConfigurations/Name).
	ID string
	// Address is the private IPv4 address ARM assigned.
	Address netip.Addr
	// Primary marks the NIC's one primary configuration.
	Primary bool
	// Static is true for allocation method Static, false for Dynamic.
	Static bool
	// SubnetID is the subnet's ARM resource ID.
	SubnetID string
	// Subnet is the subnet's prefix, which IMDS reports as ipv4.subnet[].
	Subnet netip.Prefix
	// ApplicationSecurityGroupIDs are the ASGs the configuration belongs to.
	ApplicationSecurityGroupIDs []string
}

// Addresses returns every address of the NIC, the primary's first, because consumers (the VNet's
// routes, IMDS's ipAddress list) want the full set and IMDS lists the primary first.
func (s NICState) Addresses() []netip.Addr {
	out := make([]netip.Addr, 0, len(s.IPConfigurations))
	if p, ok := s.Primary(); ok {
		out = append(out, p.Address)
	}
	for _, c := range s.IPConfigurations {
		if !c.Primary {
			out = append(out, c.Address)
		}
	}
	return out
}

// Primary returns the NIC's primary IP configuration; ok is false only for a NIC whose creation
// failed before any configuration was committed.
func (s NICState) Primary() (cfg IPConfigState, ok bool) {
	for _, c := range s.IPConfigurations {
		if c.Primary {
			return c, true
		}
	}
	return IPConfigState{}, false
}

// clone deep-copies the snapshot so that callbacks and callers never share slices with the fake.
func (s NICState) clone() NICState {
	out := s
	out.MAC = append(net.HardwareAddr(nil), s.MAC...)
	out.IPConfigurations = make([]IPConfigState, len(s.IPConfigurations))
	for i, c := range s.IPConfigurations {
		c.ApplicationSecurityGroupIDs = append([]string(nil), c.ApplicationSecurityGroupIDs...)
		out.IPConfigurations[i] = c
	}
	return out
}

// NICID returns the ARM resource ID of a network interface.
func NICID(sub, rg, name string) string {
	return fmt.Sprintf("/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Network/networkInterfaces/%s", sub, rg, name)
}

// SubnetID returns the ARM resource ID of a subnet, for AddSubnet and the NICs that use it.
func SubnetID(sub, rg, vnet, subnet string) string {
	return fmt.Sprintf("/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Network/virtualNetworks/%s/subnets/%s", sub, rg, vnet, subnet)
}

// armMAC formats a MAC the way ARM's NIC resource does: uppercase, dash-separated.
func armMAC(mac net.HardwareAddr) string {
	return strings.ToUpper(strings.ReplaceAll(mac.String(), ":", "-"))
}

// imdsMAC formats a MAC the way IMDS does: 12 uppercase hex digits without separators.
func imdsMAC(mac net.HardwareAddr) string {
	return strings.ToUpper(strings.ReplaceAll(mac.String(), ":", ""))
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func newETag() string { return `W/"` + newUUID() + `"` }

// newMAC returns a MAC in Microsoft's 00:0D:3A range, like the NICs Azure creates.
func newMAC() net.HardwareAddr {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return net.HardwareAddr{0x00, 0x0d, 0x3a, b[0], b[1], b[2]}
}
