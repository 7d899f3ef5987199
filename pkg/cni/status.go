package cni

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// Status implements CNI STATUS: success only when the agent would give an address now.
// Every other answer is code 50, since each means an ADD would fail.
func Status(args *skel.CmdArgs) error {
	conf, err := loadConf(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := conf.logger("STATUS")
	defer closeLog()

	client := conf.client()
	var st api.Status
	err = callAgent(callTimeout, func(ctx context.Context) (err error) {
		st, err = client.Status(ctx)
		return err
	})
	switch {
	case err != nil:
		// The client's message for an unreachable agent names the socket already; an
		// answer that is an error says which agent gave it.
		e := cniError(err)
		msg := e.Msg
		if !agentUnavailable(err) {
			msg = fmt.Sprintf("vnetbpf agent on %s cannot report its status: %s", conf.AgentSocket, msg)
		}
		err = types.NewError(types.ErrPluginNotAvailable, msg, e.Details)
	case !st.Ready:
		err = types.NewError(types.ErrPluginNotAvailable,
			fmt.Sprintf("vnetbpf agent on %s is not ready yet", conf.AgentSocket), st.Reason)
	case !st.CanAllocate:
		reason := st.Reason
		if reason == "" {
			reason = "the agent cannot give an address now"
		}
		err = types.NewError(types.ErrPluginNotAvailable, reason, "agent on "+conf.AgentSocket)
	}
	if err != nil {
		log.Warn("not available", "err", err)
		return err
	}
	return nil
}

// GC implements CNI GC: the agent releases every allocation and endpoint whose key the
// runtime no longer lists. Interfaces need no sweep: the spec lets a plugin assume the
// namespaces of stale attachments are gone, which takes their veths with them.
func GC(args *skel.CmdArgs) error {
	conf, err := loadConf(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := conf.logger("GC")
	defer closeLog()

	valid, err := validAttachments(conf, args.StdinData)
	if err != nil {
		return err
	}
	client := conf.client()
	var resp api.GCResponse
	err = callAgent(callTimeout, func(ctx context.Context) (err error) {
		resp, err = client.GC(ctx, valid)
		return err
	})
	if err != nil {
		log.Error("gc failed", "err", err)
		return cniError(err)
	}
	log.Info("gc", "valid", len(valid), "released", resp.Released)
	return nil
}

// validAttachments returns the runtime's list as agent keys. A config without the key is
// refused rather than read as "nothing is valid", which would release every address of
// the node; an explicit null or [] does mean that (libcni sends null for no attachments).
func validAttachments(conf *NetConf, stdin []byte) ([]api.Key, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "network configuration is not valid JSON", err.Error())
	}
	if _, ok := raw["cni.dev/valid-attachments"]; !ok {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "GC needs cni.dev/valid-attachments in the network configuration", "")
	}
	keys := make([]api.Key, 0, len(conf.ValidAttachments))
	for _, a := range conf.ValidAttachments {
		keys = append(keys, api.Key{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	return keys, nil
}
