package agent

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/ipam"
	"github.com/vnetbpf/vnetbpf/pkg/ipam/azure"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// DefaultConfigFile is where `vnetbpf-agent run` reads its configuration unless told otherwise.
const DefaultConfigFile = "/etc/vnetbpf/agent.yaml"

// Config is the agent's whole configuration: agent.yaml, overridden by flags.
// docs/configuration.md documents every field; keep the two in step.
type Config struct {
	// NIC is the host interface on the VNet.
	NIC string `json:"nic"`
	// BPFRoot is the bpffs directory the maps and links are pinned under.
	BPFRoot string `json:"bpfRoot"`
	// AttachMode is auto (TCX where the kernel has it, else clsact), tcx or tc.
	AttachMode loader.Mode `json:"attachMode"`
	// Socket is the Unix socket the CNI API is served on (mode 0600).
	Socket string `json:"socket"`
	// StateDir holds the agent's state (state.db, endpoints.db).
	StateDir string `json:"stateDir"`
	// MetricsAddr serves /metrics, /healthz and /readyz; empty disables it.
	MetricsAddr string `json:"metricsAddr"`
	// VNetCIDRs are the prefixes containers reach directly through the NIC: the VNet and
	// peered VNets. Anything else goes through the host stack.
	VNetCIDRs []string `json:"vnetCIDRs"`
	// MTU of container interfaces; 0 takes the NIC's.
	MTU int `json:"mtu"`
	// AllowIMDS lets containers reach the Instance Metadata Service at 169.254.169.254.
	// Off by default: a pod that reaches IMDS can take the node's managed identity.
	AllowIMDS bool `json:"allowIMDS"`
	// LogFormat is json or text.
	LogFormat string `json:"logFormat"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `json:"logLevel"`
	// IPAM configures the address pool.
	IPAM IPAMConfig `json:"ipam"`
}

// IPAMConfig configures the address pool.
type IPAMConfig struct {
	// Provider is where addresses come from: static or azure.
	Provider string `json:"provider"`
	// Cooldown is how long a released address rests before it is handed out again.
	Cooldown Duration `json:"cooldown"`
	// AllocateTimeout is how long an ADD that finds the pool empty waits for it to grow
	// before failing with CNI code 11.
	AllocateTimeout Duration `json:"allocateTimeout"`
	// Static is the static provider's configuration.
	Static StaticConfig `json:"static"`
	// Azure is the azure provider's configuration.
	Azure AzureConfig `json:"azure"`
}

// AzureConfig configures the azure provider: where IMDS and ARM are, the identity, the
// NIC (found from IMDS unless set) and the warm pool.
type AzureConfig struct {
	IMDSURL        string `json:"imdsURL"`
	ARMEndpoint    string `json:"armEndpoint"`
	CAFile         string `json:"caFile"`
	Credential     string `json:"credential"`
	ClientID       string `json:"clientID"`
	TokenFile      string `json:"tokenFile"`
	SubscriptionID string `json:"subscriptionID"`
	ResourceGroup  string `json:"resourceGroup"`
	NICName        string `json:"nicName"`
	MinFree        int    `json:"minFree"`
	Batch          int    `json:"batch"`
	MaxFree        int    `json:"maxFree"`
	MaxIPs         int    `json:"maxIPs"`
	// Interval is how often the pool is checked when nothing else wakes the loop.
	Interval Duration `json:"interval"`
}

// StaticConfig lists the addresses of the static provider.
type StaticConfig struct {
	// Addresses are IPv4 addresses and CIDRs owned by this node's NIC.
	Addresses []string `json:"addresses"`
}

// Duration is a time.Duration written as "30s" in YAML.
type Duration struct{ time.Duration }

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON reads "30s" or "1m30s".
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"30s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// DefaultConfig is the configuration with nothing set.
func DefaultConfig() Config {
	return Config{
		NIC:         "eth0",
		BPFRoot:     loader.DefaultRoot,
		AttachMode:  loader.ModeAuto,
		Socket:      api.DefaultSocket,
		StateDir:    "/var/lib/vnetbpf",
		MetricsAddr: "127.0.0.1:9962",
		LogFormat:   "json",
		LogLevel:    "info",
		IPAM: IPAMConfig{
			Provider:        "static",
			Cooldown:        Duration{ipam.DefaultCooldown},
			AllocateTimeout: Duration{30 * time.Second},
			Azure: AzureConfig{
				IMDSURL:     azure.DefaultIMDSURL,
				ARMEndpoint: azure.DefaultARMEndpoint,
				Credential:  azure.CredentialManagedIdentity,
				MinFree:     8,
				Batch:       16,
				MaxFree:     24,
				MaxIPs:      azure.MaxIPConfigs,
				Interval:    Duration{10 * time.Second},
			},
		},
	}
}

// LoadConfig reads path over the defaults. A missing file is an error only if mustExist;
// an unknown key is always one, so that a typo never turns into a silent default.
func LoadConfig(path string, mustExist bool) (Config, error) {
	cfg := DefaultConfig()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) && !mustExist {
		return cfg, nil
	}
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	if err := ParseConfig(b, &cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig decodes YAML into cfg, keeping what the document does not set.
func ParseConfig(b []byte, cfg *Config) error {
	j, err := yaml.YAMLToJSONStrict(b) // a key given twice is an error, not "the last one wins"
	if err != nil {
		return err
	}
	if bytes.Equal(bytes.TrimSpace(j), []byte("null")) {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		return err
	}
	return nil
}

// Validate checks cfg and returns the VNet prefixes parsed.
func (c *Config) Validate() ([]netip.Prefix, error) {
	if c.NIC == "" {
		return nil, fmt.Errorf("nic must name the host interface on the VNet")
	}
	for name, v := range map[string]string{"bpfRoot": c.BPFRoot, "socket": c.Socket, "stateDir": c.StateDir} {
		if v == "" {
			return nil, fmt.Errorf("%s must not be empty", name)
		}
	}
	switch c.AttachMode {
	case loader.ModeAuto, loader.ModeTCX, loader.ModeTC:
	default:
		return nil, fmt.Errorf("attachMode %q: want auto, tcx or tc", c.AttachMode)
	}
	switch c.LogFormat {
	case "json", "text":
	default:
		return nil, fmt.Errorf("logFormat %q: want json or text", c.LogFormat)
	}
	if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
		return nil, fmt.Errorf("mtu %d: want 0 (the NIC's) or 576..65535", c.MTU)
	}
	switch c.IPAM.Provider {
	case "static":
		if len(c.IPAM.Static.Addresses) == 0 {
			return nil, fmt.Errorf("ipam.static.addresses is empty: list the VNet addresses (or CIDRs) this node's NIC owns")
		}
	case "azure":
		az := c.azureProviderConfig(nil)
		if err := az.Validate(); err != nil {
			return nil, err
		}
		switch az.Credential {
		case azure.CredentialManagedIdentity, azure.CredentialDefault:
		case azure.CredentialTokenFile:
			if az.TokenFile == "" {
				return nil, fmt.Errorf("ipam.azure.credential tokenFile needs ipam.azure.tokenFile")
			}
		default:
			return nil, fmt.Errorf("ipam.azure.credential %q: want managedIdentity, default or tokenFile", az.Credential)
		}
	default:
		return nil, fmt.Errorf("ipam.provider %q: want static or azure", c.IPAM.Provider)
	}
	if c.IPAM.AllocateTimeout.Duration < 0 {
		return nil, fmt.Errorf("ipam.allocateTimeout must not be negative")
	}
	if len(c.VNetCIDRs) == 0 {
		return nil, fmt.Errorf("vnetCIDRs is empty: list the VNet's address space so containers can reach it")
	}
	var prefixes []netip.Prefix
	for _, s := range c.VNetCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil || !p.Addr().Is4() {
			return nil, fmt.Errorf("vnetCIDRs: %q is not an IPv4 prefix such as 10.0.0.0/16", s)
		}
		prefixes = append(prefixes, p.Masked())
	}
	return prefixes, nil
}

// azureProviderConfig is the azure provider's configuration for a NIC with the given MAC.
func (c *Config) azureProviderConfig(mac net.HardwareAddr) azure.Config {
	az := c.IPAM.Azure
	return azure.Config{
		IMDSURL: az.IMDSURL, ARMEndpoint: az.ARMEndpoint, CAFile: az.CAFile,
		Credential: az.Credential, ClientID: az.ClientID, TokenFile: az.TokenFile,
		SubscriptionID: az.SubscriptionID, ResourceGroup: az.ResourceGroup, NICName: az.NICName,
		MinFree: az.MinFree, Batch: az.Batch, MaxFree: az.MaxFree, MaxIPs: az.MaxIPs, MAC: mac,
		Interval: az.Interval.Duration,
	}
}
