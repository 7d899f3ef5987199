// Package cni is the vnetbpf CNI plugin: ADD asks the agent for a VNet address, wires a
// veth pair between the container's and the host's network namespaces and registers the
// endpoint, so that the agent's datapath forwards to it; DEL, CHECK, STATUS and GC keep the
// agent and the namespaces in step. The plugin never touches BPF maps: the agent does.
package cni

import (
	"context"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// Versions are the CNI spec versions the plugin accepts. 0.1.0 and 0.2.0 are left out on
// purpose: their results cannot name interfaces, so chained plugins such as bandwidth could
// not find the host veth, and 0.3.0 was superseded by 0.3.1 within weeks.
var Versions = version.PluginSupports("0.3.1", "0.4.0", "1.0.0", "1.1.0")

// Funcs are the plugin's commands, for skel.PluginMainFuncs.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: Add, Del: Del, Check: Check, Status: Status, GC: GC}
}

// About is what the binary prints to stderr when run without CNI_COMMAND.
const About = "vnetbpf CNI plugin: containers on Azure VNet addresses, forwarded by eBPF"

const (
	// allocateTimeout is long because the agent may first have to grow the pool through
	// ARM, which takes tens of seconds; the runtime's own deadline still bounds ADD.
	allocateTimeout = 2 * time.Minute
	// callTimeout bounds every other agent call, which only reads or writes local state.
	callTimeout = 30 * time.Second
)

// callAgent runs one agent call under its own deadline, so that a rollback after a
// timed-out call still gets its full time.
func callAgent(timeout time.Duration, fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return fn(ctx)
}

func (c *NetConf) client() *api.Client { return api.NewClient(c.AgentSocket, 0) }
