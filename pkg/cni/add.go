package cni

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// Add implements CNI ADD.
func Add(args *skel.CmdArgs) error {
	conf, err := loadConf(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := conf.logger("ADD")
	defer closeLog()
	log = log.With("containerID", args.ContainerID, "ifName", args.IfName)

	a, err := newAdder(conf, args, log)
	if err != nil {
		log.Error("add refused", "err", err)
		return cniError(err)
	}
	defer a.netns.Close()
	if err := a.run(); err != nil {
		log.Error("add failed", "err", err)
		return cniError(err)
	}
	return nil
}

// adder is one ADD. Everything it changes is recorded in undo as soon as it is known to
// be ADD's own, and every failure path calls undo explicitly.
type adder struct {
	conf   *NetConf
	args   *skel.CmdArgs
	owner  api.Owner
	client *api.Client
	netns  ns.NetNS
	log    *slog.Logger
	undo   undo
}

func newAdder(conf *NetConf, args *skel.CmdArgs, log *slog.Logger) (*adder, error) {
	if args.Netns == "" {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables,
			"CNI_NETNS is empty: ADD needs the path of the container's network namespace", "")
	}
	kargs, err := loadArgs(args.Args)
	if err != nil {
		return nil, err
	}
	netns, err := ns.GetNS(args.Netns)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("CNI_NETNS %q is not a network namespace", args.Netns), err.Error())
	}
	owner := api.Owner{
		Key:          api.Key{ContainerID: args.ContainerID, IfName: args.IfName},
		PodNamespace: string(kargs.K8S_POD_NAMESPACE),
		PodName:      string(kargs.K8S_POD_NAME),
		Netns:        args.Netns,
	}
	return &adder{
		conf: conf, args: args, owner: owner, client: conf.client(), netns: netns, log: log,
		undo: undo{log: log},
	}, nil
}

func (a *adder) run() error {
	hostName := api.HostVethName(a.owner.Key)
	if err := a.refuseExisting(hostName); err != nil {
		return err
	}
	// From here on the key has no veth and no endpoint, so an allocation the agent returns
	// for it, new or left over by an ADD that died half-way, is this ADD's to release.
	alloc, err := a.allocate()
	if err != nil {
		return err
	}
	a.undo.push("release "+alloc.IP.String(), a.release)
	if !alloc.IP.Is4() {
		return a.undo.fail(fmt.Errorf("agent allocated %v, not an IPv4 address", alloc.IP))
	}
	w := newWiring(a.owner.Key, net.IP(alloc.IP.AsSlice()), a.conf.mtu(alloc))
	a.log = a.log.With("ip", alloc.IP, "hostVeth", w.hostName)

	if err := a.wire(w); err != nil {
		return err // wire has rolled back, or knows that nothing may be
	}
	hostLink, err := w.configureHost()
	if err != nil {
		return a.undo.fail(err)
	}
	result, err := w.result(a.args.Netns).GetAsVersion(a.conf.CNIVersion)
	if err != nil {
		return a.undo.fail(types.NewError(types.ErrIncompatibleCNIVersion, "cannot express the result in cniVersion "+a.conf.CNIVersion, err.Error()))
	}
	// Queued before the call: a call that timed out may still have completed in the agent.
	a.undo.push("delete endpoint", a.deleteEndpoint)
	if err := a.register(w, alloc, hostLink); err != nil {
		return a.undo.fail(err)
	}
	if err := result.Print(); err != nil {
		return a.undo.fail(types.NewError(types.ErrIOFailure, "cannot write the result to stdout", err.Error()))
	}
	a.log.Info("added")
	return nil
}

// refuseExisting fails a second ADD for a live attachment before it changes anything. The
// agent answers Allocate for a known key with that key's address, so without this check a
// failing second ADD would release the address of the first, which is still in use.
func (a *adder) refuseExisting(hostName string) error {
	exists, err := hostLinkExists(hostName)
	if err != nil {
		return err
	}
	if exists {
		return a.alreadyAttached("host veth " + hostName + " exists")
	}
	var ep api.Endpoint
	err = callAgent(callTimeout, func(ctx context.Context) (err error) {
		ep, err = a.client.GetEndpoint(ctx, a.owner.Key)
		return err
	})
	switch {
	case err == nil:
		return a.alreadyAttached(fmt.Sprintf("the agent has endpoint %d with %v on %s", ep.ID, ep.IP, ep.HostIfName))
	case agentCode(err) == api.CodeUnknownContainer:
		return nil
	default:
		return err
	}
}

func (a *adder) alreadyAttached(why string) error {
	return types.NewError(types.ErrInvalidEnvironmentVariables,
		fmt.Sprintf("CNI_CONTAINERID %q with CNI_IFNAME %q is already attached (%s); the runtime must DEL it before adding it again",
			a.owner.ContainerID, a.owner.IfName, why), "")
}

func (a *adder) allocate() (alloc api.Allocation, err error) {
	err = callAgent(allocateTimeout, func(ctx context.Context) (err error) {
		alloc, err = a.client.Allocate(ctx, api.AllocationRequest{Owner: a.owner})
		return err
	})
	return alloc, err
}

func (a *adder) release() error {
	return callAgent(callTimeout, func(ctx context.Context) error { return a.client.Release(ctx, a.owner.Key) })
}

// wire creates the veth pair and configures the container's end. If the pair could not be
// created because its host-side name appeared since refuseExisting (a concurrent ADD for
// the same key, which the spec forbids but a broken runtime may send), the address belongs
// to the winner's endpoint: nothing is undone and the ADD fails.
func (a *adder) wire(w *wiring) error {
	created := false
	err := a.netns.Do(func(hostNS ns.NetNS) error {
		link, err := w.createVeth(hostNS)
		if err != nil {
			return err
		}
		created = true
		return w.configureContainer(link)
	})
	if created {
		a.undo.push("delete veth "+w.hostName, func() error { return deleteLink(w.hostName) })
	}
	if err == nil {
		return nil
	}
	if !created {
		taken, lookErr := hostLinkExists(w.hostName)
		if lookErr != nil {
			// Leaking the address until GC is better than releasing one in use.
			return fmt.Errorf("%w; address kept: cannot tell whether %s is another ADD's: %v", err, w.hostName, lookErr)
		}
		if taken {
			a.log.Warn("host veth appeared during ADD; leaving it and its address alone")
			return a.alreadyAttached("host veth " + w.hostName + " appeared during this ADD")
		}
	}
	return a.undo.fail(err)
}

func (a *adder) deleteEndpoint() error {
	return callAgent(callTimeout, func(ctx context.Context) error { return a.client.DeleteEndpoint(ctx, a.owner.Key) })
}

// register hands the endpoint to the agent, which attaches from_container to the host veth
// and writes the endpoints map.
func (a *adder) register(w *wiring, alloc api.Allocation, hostLink netlink.Link) error {
	req := api.EndpointRequest{
		Owner:        a.owner,
		IP:           alloc.IP,
		HostIfName:   w.hostName,
		HostIfIndex:  hostLink.Attrs().Index,
		HostMAC:      w.hostMAC.String(),
		ContainerMAC: w.containerMAC.String(),
		AttachTCX:    a.conf.shapesEgress(),
	}
	return callAgent(callTimeout, func(ctx context.Context) error {
		_, err := a.client.PutEndpoint(ctx, req)
		return err
	})
}

// result is the ADD result in the current spec version: the host veth first (no sandbox,
// which is how bandwidth finds it), then the container interface the IP points at (with a
// sandbox and the name in CNI_IFNAME, which is what portmap requires).
func (w *wiring) result(netnsPath string) *current.Result {
	return &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: w.hostName, Mac: w.hostMAC.String(), Mtu: w.mtu},
			{Name: w.ifName, Mac: w.containerMAC.String(), Mtu: w.mtu, Sandbox: netnsPath},
		},
		IPs: []*current.IPConfig{{
			Interface: current.Int(1),
			Address:   *hostPrefix(w.ip),
			Gateway:   gatewayIP,
		}},
		Routes: []*types.Route{{Dst: *defaultDst, GW: gatewayIP}},
	}
}

// undo holds the steps that take back what ADD did, run newest first.
type undo struct {
	log   *slog.Logger
	steps []undoStep
}

type undoStep struct {
	what string
	fn   func() error
}

func (u *undo) push(what string, fn func() error) {
	u.steps = append(u.steps, undoStep{what, fn})
}

// fail rolls everything back and returns err, with what could not be undone added to its
// details. Every step runs even when an earlier one fails, so as little as possible leaks.
func (u *undo) fail(err error) error {
	var errs []error
	for i := len(u.steps) - 1; i >= 0; i-- {
		s := u.steps[i]
		if e := s.fn(); e != nil {
			u.log.Error("rollback step failed", "step", s.what, "err", e)
			errs = append(errs, fmt.Errorf("%s: %w", s.what, e))
			continue
		}
		u.log.Debug("rolled back", "step", s.what)
	}
	u.steps = nil
	return withRollbackFailure(err, errors.Join(errs...))
}
