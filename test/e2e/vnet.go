// Package e2e builds a simulated Azure VNet out of network namespaces, for the end-to-end
// tests and the demo.
//
// One "vnet" namespace plays Azure's SDN: a veth to each node's eth0, the gateway on its
// loopback, a /32 route and a permanent neighbour entry (the NIC's MAC) for every IP
// configuration of each node, proxy ARP on each node-facing veth so the gateway and every
// routed address answer ARP, and IP forwarding with strict reverse-path filtering, so a source
// that is not an IP configuration of the sending NIC is dropped as Azure drops it and an
// address no NIC holds is unreachable.
package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	cnitestutils "github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
)

// Fabric is the simulated VNet.
type Fabric struct {
	NS      ns.NetNS
	Prefix  netip.Prefix // the VNet's address space, e.g. 10.0.0.0/16
	Gateway netip.Addr   // .1 of the prefix
	nodes   []*Node
}

// Node is a simulated VM: a namespace whose eth0 is plugged into the fabric.
type Node struct {
	NS        ns.NetNS
	Name      string
	NIC       string // "eth0"
	MAC       net.HardwareAddr
	Primary   netip.Addr
	fabricDev string // the fabric's side of the node's veth
	fabric    *Fabric
}

// NewFabric creates the fabric namespace for prefix.
func NewFabric(prefix netip.Prefix) (*Fabric, error) {
	n, err := cnitestutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("create fabric netns: %w", err)
	}
	f := &Fabric{NS: n, Prefix: prefix.Masked(), Gateway: prefix.Masked().Addr().Next()}
	err = n.Do(func(ns.NetNS) error {
		if err := setUp("lo"); err != nil {
			return err
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(lo, addr32(f.Gateway)); err != nil {
			return fmt.Errorf("gateway address: %w", err)
		}
		return sysctls(map[string]string{
			"net.ipv4.ip_forward":             "1",
			"net.ipv4.conf.all.rp_filter":     "1",
			"net.ipv4.conf.default.rp_filter": "1",
		})
	})
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// AddNode creates a node namespace with eth0 (MAC mac, primary address primary) plugged into
// the fabric. Like an Azure VM, the node reaches the whole VNet on-link through eth0 and
// everything else through the gateway. The node does not forward: ip_forward=0.
func (f *Fabric) AddNode(name string, mac net.HardwareAddr, primary netip.Addr) (*Node, error) {
	n, err := cnitestutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("create node netns: %w", err)
	}
	node := &Node{NS: n, Name: name, NIC: "eth0", MAC: mac, Primary: primary,
		fabricDev: fmt.Sprintf("vn%d", len(f.nodes)), fabric: f}
	f.nodes = append(f.nodes, node)
	if err := f.plug(node); err != nil {
		return nil, fmt.Errorf("plug node %s: %w", name, err)
	}
	if err := f.AddIPConfig(node, primary); err != nil {
		return nil, err
	}
	return node, nil
}

func (f *Fabric) plug(node *Node) error {
	err := f.NS.Do(func(ns.NetNS) error {
		la := netlink.NewLinkAttrs()
		la.Name = node.fabricDev
		veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerHardwareAddr: node.MAC, PeerNamespace: netlink.NsFd(int(node.NS.Fd()))}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		if err := setUp(node.fabricDev); err != nil {
			return err
		}
		return sysctls(map[string]string{
			"net.ipv4.conf." + node.fabricDev + ".proxy_arp": "1",
			"net.ipv4.conf." + node.fabricDev + ".rp_filter": "1",
			// Linux delays proxy ARP answers by up to 0.8 s at random; Azure's SDN answers
			// at once, and a cross-node ping needs one answer each way.
			"net.ipv4.neigh." + node.fabricDev + ".proxy_delay": "0",
		})
	})
	if err != nil {
		return err
	}
	return node.NS.Do(func(ns.NetNS) error {
		for _, dev := range []string{"lo", "eth0"} {
			if err := setUp(dev); err != nil {
				return err
			}
		}
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: node.Primary.AsSlice(), Mask: net.CIDRMask(f.Prefix.Bits(), 32)}}
		if err := netlink.AddrAdd(eth0, a); err != nil {
			return fmt.Errorf("primary address: %w", err)
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: f.Gateway.AsSlice()}); err != nil {
			return fmt.Errorf("default route: %w", err)
		}
		return sysctls(map[string]string{"net.ipv4.ip_forward": "0"})
	})
}

// AddIPConfig makes ip routable to node, as Azure does once an IP configuration exists on
// the node's NIC.
func (f *Fabric) AddIPConfig(node *Node, ip netip.Addr) error {
	return f.NS.Do(func(ns.NetNS) error {
		dev, err := netlink.LinkByName(node.fabricDev)
		if err != nil {
			return err
		}
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: dev.Attrs().Index, Dst: prefix32(ip), Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("route %s to %s: %w", ip, node.Name, err)
		}
		neigh := &netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: node.MAC}
		if err := netlink.NeighSet(neigh); err != nil {
			return fmt.Errorf("neighbour %s on %s: %w", ip, node.Name, err)
		}
		return nil
	})
}

// RemoveIPConfig makes ip unroutable again.
func (f *Fabric) RemoveIPConfig(node *Node, ip netip.Addr) error {
	return f.NS.Do(func(ns.NetNS) error {
		dev, err := netlink.LinkByName(node.fabricDev)
		if err != nil {
			return err
		}
		netlink.NeighDel(&netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: netlink.FAMILY_V4, IP: ip.AsSlice()})
		err = netlink.RouteDel(&netlink.Route{LinkIndex: dev.Attrs().Index, Dst: prefix32(ip), Scope: netlink.SCOPE_LINK})
		if err != nil && !errors.Is(err, os.ErrNotExist) && !strings.Contains(err.Error(), "no such process") {
			return fmt.Errorf("remove route %s: %w", ip, err)
		}
		return nil
	})
}

// Close removes the nodes' and the fabric's namespaces.
func (f *Fabric) Close() error {
	var errs []error
	for _, n := range f.nodes {
		errs = append(errs, removeNS(n.NS))
	}
	return errors.Join(append(errs, removeNS(f.NS))...)
}

// Container is a container namespace wired to a node as the CNI plugin wires it.
type Container struct {
	NS      ns.NetNS
	IP      netip.Addr
	MAC     net.HardwareAddr
	HostMAC net.HardwareAddr
	HostDev string
	HostIdx int
}

// WireContainer creates a container namespace attached to node by a veth (host side hostDev
// in the node) the way DESIGN.md describes: eth0 with ip/32 and an explicit MAC, a link
// route to 169.254.1.1, the default route through it and a permanent neighbour entry for it;
// on the host side an explicit MAC and a /32 route to the container. It is the test's own
// wiring, independent of the CNI plugin's.
func WireContainer(node *Node, hostDev string, ip netip.Addr, mac, hostMAC net.HardwareAddr) (*Container, error) {
	n, err := cnitestutils.NewNS()
	if err != nil {
		return nil, err
	}
	c := &Container{NS: n, IP: ip, MAC: mac, HostMAC: hostMAC, HostDev: hostDev}
	gw := net.IPv4(169, 254, 1, 1).To4()
	err = node.NS.Do(func(ns.NetNS) error {
		la := netlink.NewLinkAttrs()
		la.Name = hostDev
		la.HardwareAddr = hostMAC
		veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerHardwareAddr: mac, PeerNamespace: netlink.NsFd(int(n.Fd()))}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", hostDev, err)
		}
		if err := setUp(hostDev); err != nil {
			return err
		}
		host, err := netlink.LinkByName(hostDev)
		if err != nil {
			return err
		}
		c.HostIdx = host.Attrs().Index
		return netlink.RouteAdd(&netlink.Route{LinkIndex: c.HostIdx, Dst: prefix32(ip), Scope: netlink.SCOPE_LINK})
	})
	if err != nil {
		removeNS(n)
		return nil, err
	}
	err = n.Do(func(ns.NetNS) error {
		for _, dev := range []string{"lo", "eth0"} {
			if err := setUp(dev); err != nil {
				return err
			}
		}
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		idx := eth0.Attrs().Index
		if err := netlink.AddrAdd(eth0, addr32(ip)); err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: idx, Dst: &net.IPNet{IP: gw, Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("gateway route: %w", err)
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: idx, Gw: gw}); err != nil {
			return fmt.Errorf("default route: %w", err)
		}
		return netlink.NeighAdd(&netlink.Neigh{LinkIndex: idx, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: gw, HardwareAddr: hostMAC})
	})
	if err != nil {
		c.Close(node)
		return nil, fmt.Errorf("wire container %s: %w", ip, err)
	}
	return c, nil
}

// Close removes the container's namespace and its host-side veth.
func (c *Container) Close(node *Node) error {
	err := removeNS(c.NS)
	node.NS.Do(func(ns.NetNS) error {
		if l, err := netlink.LinkByName(c.HostDev); err == nil {
			netlink.LinkDel(l)
		}
		return nil
	})
	return err
}

func removeNS(n ns.NetNS) error {
	if n == nil {
		return nil
	}
	n.Close()
	return cnitestutils.UnmountNS(n)
}

func setUp(dev string) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("find %s: %w", dev, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", dev, err)
	}
	return nil
}

func sysctls(kv map[string]string) error {
	for k, v := range kv {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
		}
	}
	return nil
}

func prefix32(ip netip.Addr) *net.IPNet {
	return &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}
}

func addr32(ip netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: prefix32(ip)}
}
