package cni

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// Del implements CNI DEL. It is idempotent and succeeds with the netns gone, CNI_NETNS
// empty (containerd's second DEL) or the agent down.
func Del(args *skel.CmdArgs) error {
	conf, err := loadConf(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := conf.logger("DEL")
	defer closeLog()
	log = log.With("containerID", args.ContainerID, "ifName", args.IfName)
	key := api.Key{ContainerID: args.ContainerID, IfName: args.IfName}

	// The agent goes first so that it detaches from_container and drops the map entry
	// while the veth still exists; the veth goes whatever the agent answers, since the
	// container is going away either way.
	agentErr := forget(conf.client(), key)
	if err := removeVeths(args.Netns, key, log); err != nil {
		log.Error("delete failed", "err", err)
		return cniError(err)
	}
	switch {
	case agentErr == nil:
		log.Info("deleted")
		return nil
	case agentUnavailable(agentErr):
		// The agent's reconcile frees every allocation whose host veth no longer exists, and
		// the veth is gone now, so the address is released when the agent is back. Failing
		// instead would leave the runtime retrying a DEL it cannot finish, and a local queue
		// of pending releases would be a second record the agent would have to reconcile.
		log.Warn("agent unavailable; its reconcile will release the address", "err", agentErr)
		return nil
	default:
		log.Error("agent refused the delete", "err", agentErr)
		return cniError(agentErr)
	}
}

// forget removes the endpoint and then releases the address. The release is not redundant:
// an ADD killed between Allocate and PutEndpoint leaves an allocation without an endpoint,
// and the API only promises that deleting an endpoint releases the endpoint's address.
func forget(client *api.Client, key api.Key) error {
	return callAgent(callTimeout, func(ctx context.Context) error {
		if err := client.DeleteEndpoint(ctx, key); err != nil {
			return err
		}
		return client.Release(ctx, key)
	})
}

// removeVeths deletes the attachment's veth pair. Deleting the host end takes the
// container end with it; the container end is deleted first anyway, by its own name, in
// case the host end was renamed or moved by hand.
func removeVeths(netnsPath string, k api.Key, log *slog.Logger) error {
	if netnsPath != "" {
		if err := deleteInNetns(netnsPath, k.IfName); err != nil {
			// Not fatal: the host end below is the one that decides.
			log.Warn("cannot delete the container's interface", "netns", netnsPath, "err", err)
		}
	}
	return deleteLink(api.HostVethName(k))
}

// deleteInNetns deletes ifName inside the namespace at path; a namespace that is gone (the
// file removed, or left behind unmounted) is success.
func deleteInNetns(path, ifName string) error {
	netns, err := ns.GetNS(path)
	if err != nil {
		var notExist ns.NSPathNotExistErr
		var notNS ns.NSPathNotNSErr
		if errors.As(err, &notExist) || errors.As(err, &notNS) {
			return nil
		}
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer netns.Close()
	return netns.Do(func(ns.NetNS) error { return deleteContainerVeth(ifName) })
}
