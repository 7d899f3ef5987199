package cni

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// Check implements CNI CHECK: the live state must still be what prevResult says ADD built.
// Every difference is reported, not only the first, so one CHECK tells the whole story.
func Check(args *skel.CmdArgs) error {
	conf, err := loadConf(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := conf.logger("CHECK")
	defer closeLog()
	log = log.With("containerID", args.ContainerID, "ifName", args.IfName)

	if err := check(conf, args); err != nil {
		log.Error("check failed", "err", err)
		return cniError(err)
	}
	return nil
}

func check(conf *NetConf, args *skel.CmdArgs) error {
	key := api.Key{ContainerID: args.ContainerID, IfName: args.IfName}
	w, err := expected(conf, key)
	if err != nil {
		return err
	}
	netns, err := ns.GetNS(args.Netns)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("CNI_NETNS %q is not a network namespace", args.Netns), err.Error())
	}
	defer netns.Close()

	var p problems
	if err := netns.Do(func(ns.NetNS) error { w.checkContainer(&p); return nil }); err != nil {
		return err
	}
	hostIndex := w.checkHost(&p)
	if err := checkAgent(conf, key, w, hostIndex, &p); err != nil {
		return err
	}
	return p.err()
}

// expected rebuilds from prevResult what ADD made: the container interface named
// CNI_IFNAME with a sandbox, the host veth of this key, and the /32 address on the former.
func expected(conf *NetConf, key api.Key) (*wiring, error) {
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "cannot parse prevResult", err.Error())
	}
	if conf.PrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "CHECK needs prevResult in the network configuration", "")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "cannot convert prevResult", err.Error())
	}
	w := &wiring{ifName: key.IfName, hostName: api.HostVethName(key)}
	cont, host := -1, -1
	for i, iface := range prev.Interfaces {
		var mac *net.HardwareAddr
		switch {
		case iface.Name == w.ifName && iface.Sandbox != "":
			cont, mac = i, &w.containerMAC
		case iface.Name == w.hostName && iface.Sandbox == "":
			host, mac = i, &w.hostMAC
		default:
			continue // another plugin's interface, e.g. bandwidth's ifb
		}
		m, err := net.ParseMAC(iface.Mac)
		if err != nil {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("prevResult interface %s has a bad MAC %q", iface.Name, iface.Mac), err.Error())
		}
		*mac = m
	}
	if cont < 0 || host < 0 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("prevResult does not list both %s (in a sandbox) and host veth %s", w.ifName, w.hostName), "")
	}
	for _, ipc := range prev.IPs {
		if ipc.Interface != nil && *ipc.Interface == cont && ipc.Address.IP.To4() != nil {
			w.ip = ipc.Address.IP.To4()
		}
	}
	if w.ip == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "prevResult has no IPv4 address on "+w.ifName, "")
	}
	return w, nil
}

// problems collects what CHECK found wrong.
type problems []string

func (p *problems) addf(format string, args ...any) { *p = append(*p, fmt.Sprintf(format, args...)) }

func (p problems) err() error {
	if len(p) == 0 {
		return nil
	}
	return types.NewError(types.ErrInternal,
		fmt.Sprintf("vnetbpf CHECK found %d difference(s) from prevResult: %s", len(p), strings.Join(p, "; ")), "")
}

// checkContainer runs in the container's netns.
func (w *wiring) checkContainer(p *problems) {
	link, err := netlink.LinkByName(w.ifName)
	if err != nil {
		p.addf("container interface %s: %v", w.ifName, err)
		return
	}
	a := link.Attrs()
	if !bytes.Equal(a.HardwareAddr, w.containerMAC) {
		p.addf("container interface %s has MAC %s, prevResult says %s", w.ifName, a.HardwareAddr, w.containerMAC)
	}
	if a.Flags&net.FlagUp == 0 {
		p.addf("container interface %s is down", w.ifName)
	}
	w.checkAddress(link, p)
	routes, err := retryDump(func() ([]netlink.Route, error) { return netlink.RouteList(link, netlink.FAMILY_V4) })
	if err != nil {
		p.addf("list routes of %s: %v", w.ifName, err)
		return
	}
	if !hasRoute(routes, hostPrefix(gatewayIP), nil, netlink.SCOPE_LINK) {
		p.addf("container route %s/32 dev %s scope link is missing", gatewayIP, w.ifName)
	}
	if !hasRoute(routes, defaultDst, gatewayIP, netlink.SCOPE_UNIVERSE) {
		p.addf("container default route via %s dev %s is missing", gatewayIP, w.ifName)
	}
	w.checkNeighbour(link, p)
}

func (w *wiring) checkAddress(link netlink.Link, p *problems) {
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(link, netlink.FAMILY_V4) })
	if err != nil {
		p.addf("list addresses of %s: %v", w.ifName, err)
		return
	}
	for _, addr := range addrs {
		if addr.IPNet.IP.Equal(w.ip) && bytes.Equal(addr.IPNet.Mask, net.CIDRMask(32, 32)) {
			return
		}
	}
	p.addf("container interface %s lacks address %s/32", w.ifName, w.ip)
}

func (w *wiring) checkNeighbour(link netlink.Link, p *problems) {
	neighs, err := retryDump(func() ([]netlink.Neigh, error) { return netlink.NeighList(link.Attrs().Index, netlink.FAMILY_V4) })
	if err != nil {
		p.addf("list neighbours of %s: %v", w.ifName, err)
		return
	}
	for _, n := range neighs {
		if n.IP.Equal(gatewayIP) && n.State&netlink.NUD_PERMANENT != 0 && bytes.Equal(n.HardwareAddr, w.hostMAC) {
			return
		}
	}
	p.addf("container has no permanent neighbour %s lladdr %s on %s", gatewayIP, w.hostMAC, w.ifName)
}

func hasRoute(routes []netlink.Route, dst *net.IPNet, gw net.IP, scope netlink.Scope) bool {
	for _, r := range routes {
		rdst := r.Dst
		if rdst == nil {
			rdst = defaultDst
		}
		if rdst.String() == dst.String() && r.Gw.Equal(gw) && r.Scope == scope {
			return true
		}
	}
	return false
}

// checkHost runs in the host netns and returns the host veth's ifindex (0 if missing) for
// the comparison with the agent's endpoint.
func (w *wiring) checkHost(p *problems) int {
	link, err := netlink.LinkByName(w.hostName)
	if err != nil {
		p.addf("host veth %s: %v", w.hostName, err)
		return 0
	}
	a := link.Attrs()
	if !bytes.Equal(a.HardwareAddr, w.hostMAC) {
		p.addf("host veth %s has MAC %s, prevResult says %s", w.hostName, a.HardwareAddr, w.hostMAC)
	}
	if a.Flags&net.FlagUp == 0 {
		p.addf("host veth %s is down", w.hostName)
	}
	routes, err := retryDump(func() ([]netlink.Route, error) { return netlink.RouteList(link, netlink.FAMILY_V4) })
	if err != nil {
		p.addf("list routes of %s: %v", w.hostName, err)
	} else if !hasRoute(routes, hostPrefix(w.ip), nil, netlink.SCOPE_LINK) {
		p.addf("host route %s/32 dev %s scope link is missing", w.ip, w.hostName)
	}
	return a.Index
}

// checkAgent compares the agent's endpoint with the live host veth. An agent that cannot
// be asked fails CHECK with its own error, since nothing can be said about the datapath.
func checkAgent(conf *NetConf, key api.Key, w *wiring, hostIndex int, p *problems) error {
	client := conf.client()
	var ep api.Endpoint
	err := callAgent(callTimeout, func(ctx context.Context) (err error) {
		ep, err = client.GetEndpoint(ctx, key)
		return err
	})
	if agentCode(err) == api.CodeUnknownContainer {
		p.addf("the agent has no endpoint for %s", key)
		return nil
	}
	if err != nil {
		return err
	}
	if !net.IP(ep.IP.AsSlice()).Equal(w.ip) {
		p.addf("the agent's endpoint has IP %v, prevResult says %s", ep.IP, w.ip)
	}
	if hostIndex != 0 && (ep.HostIfIndex != hostIndex || ep.HostIfName != w.hostName) {
		p.addf("the agent's endpoint is on %s (ifindex %d), the host veth is %s (ifindex %d)", ep.HostIfName, ep.HostIfIndex, w.hostName, hostIndex)
	}
	if !sameMAC(ep.ContainerMAC, w.containerMAC) || !sameMAC(ep.HostMAC, w.hostMAC) {
		p.addf("the agent's endpoint has MACs host %s container %s, prevResult says %s and %s", ep.HostMAC, ep.ContainerMAC, w.hostMAC, w.containerMAC)
	}
	return nil
}

func sameMAC(s string, mac net.HardwareAddr) bool {
	m, err := net.ParseMAC(s)
	return err == nil && bytes.Equal(m, mac)
}
