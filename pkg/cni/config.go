package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// Type is the CNI "type" of the plugin, which is also the name of its binary.
const Type = "vnetbpf"

// defaultMTU is used when neither the config nor the agent names an MTU.
const defaultMTU = 1500

// NetConf is the plugin's network configuration, read from stdin.
type NetConf struct {
	types.PluginConf

	// AgentSocket is the agent's Unix socket; default api.DefaultSocket.
	AgentSocket string `json:"agentSocket,omitempty"`
	// MTU of both veth ends; default the MTU in the agent's Allocation (the NIC's), else 1500.
	MTU int `json:"mtu,omitempty"`
	// LogFile receives the plugin's log; without it nothing is logged, because stdout
	// carries only the result and runtimes do not reliably keep stderr.
	LogFile string `json:"logFile,omitempty"`
	// LogLevel is debug, info (default), warn or error.
	LogLevel string `json:"logLevel,omitempty"`
	// RuntimeConfig holds the capability arguments the runtime passes, for the capabilities
	// the configuration declares: "bandwidth", so that the plugin knows when a chained
	// bandwidth plugin will shape the pod's egress.
	RuntimeConfig struct {
		Bandwidth *Bandwidth `json:"bandwidth,omitempty"`
	} `json:"runtimeConfig,omitempty"`
}

// Bandwidth is the "bandwidth" capability's argument (kubernetes.io/ingress-bandwidth and
// egress-bandwidth), in bits per second and bits.
type Bandwidth struct {
	IngressRate  uint64 `json:"ingressRate,omitempty"`
	IngressBurst uint64 `json:"ingressBurst,omitempty"`
	EgressRate   uint64 `json:"egressRate,omitempty"`
	EgressBurst  uint64 `json:"egressBurst,omitempty"`
}

// shapesEgress says whether a chained bandwidth plugin will shape the pod's egress: it then
// mirrors the host veth's ingress to an ifb through an ingress qdisc (its own rule: rate and
// burst both set).
func (c *NetConf) shapesEgress() bool {
	b := c.RuntimeConfig.Bandwidth
	return b != nil && b.EgressRate > 0 && b.EgressBurst > 0
}

// loadConf parses and validates the network configuration. Malformed JSON is a decoding
// failure (code 6); well-formed JSON with a value the plugin cannot use is an invalid
// configuration (code 7), and the message names the field.
func loadConf(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		var syn *json.SyntaxError
		if errors.As(err, &syn) {
			return nil, types.NewError(types.ErrDecodingFailure, "vnetbpf network configuration is not valid JSON: "+err.Error(), "")
		}
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid vnetbpf network configuration: "+err.Error(), "")
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = api.DefaultSocket
	}
	if err := conf.validate(); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid vnetbpf network configuration: "+err.Error(), "")
	}
	return conf, nil
}

func (c *NetConf) validate() error {
	if !filepath.IsAbs(c.AgentSocket) {
		return fmt.Errorf("agentSocket %q must be an absolute path", c.AgentSocket)
	}
	// 68 is the smallest MTU IPv4 allows; 65535 the largest a veth takes.
	if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
		return fmt.Errorf("mtu %d is outside 68..65535", c.MTU)
	}
	if c.LogFile != "" && !filepath.IsAbs(c.LogFile) {
		return fmt.Errorf("logFile %q must be an absolute path", c.LogFile)
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		return err
	}
	return nil
}

// mtu picks the configured MTU, else the agent's (the NIC's), else 1500.
func (c *NetConf) mtu(alloc api.Allocation) int {
	switch {
	case c.MTU != 0:
		return c.MTU
	case alloc.MTU != 0:
		return alloc.MTU
	default:
		return defaultMTU
	}
}

func parseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "", "info":
		return slog.LevelInfo, nil
	case "debug":
		return slog.LevelDebug, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("logLevel %q is not one of debug, info, warn, error", s)
}

// logger opens the configured log. The returned close function must be called when the
// command ends. A log file that cannot be opened never fails a command (a DEL must not
// fail over logging); the reason goes to stderr instead.
func (c *NetConf) logger(command string) (*slog.Logger, func()) {
	if c.LogFile == "" {
		return slog.New(slog.NewTextHandler(io.Discard, nil)), func() {}
	}
	level, _ := parseLevel(c.LogLevel) // validated in loadConf
	opts := &slog.HandlerOptions{Level: level}
	f, err := os.OpenFile(c.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vnetbpf: cannot open logFile: %v\n", err)
		return slog.New(slog.NewTextHandler(os.Stderr, opts)).With("cmd", command), func() {}
	}
	return slog.New(slog.NewTextHandler(f, opts)).With("cmd", command, "pid", os.Getpid()), func() { f.Close() }
}

// k8sArgs are the CNI_ARGS the plugin understands; the field names must be the keys, as
// the CNI conventions spell them. types.LoadArgs rejects any other key unless
// IgnoreUnknown=1 is among them, which is how the conventions let a runtime pass
// arguments a plugin may not know. Only ADD reads them: DEL must not fail over arguments.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
}

func loadArgs(s string) (*k8sArgs, error) {
	a := &k8sArgs{}
	if err := types.LoadArgs(s, a); err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables,
			"CNI_ARGS holds an argument vnetbpf does not know; add IgnoreUnknown=1 to pass it anyway", err.Error())
	}
	return a, nil
}
