package agent

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// TestDefaultConfig pins the defaults that docs/configuration.md documents.
func TestDefaultConfig(t *testing.T) {
	want := Config{
		NIC:         "eth0",
		BPFRoot:     "/sys/fs/bpf/vnetbpf",
		AttachMode:  loader.ModeAuto,
		Socket:      "/run/vnetbpf/agent.sock",
		StateDir:    "/var/lib/vnetbpf",
		MetricsAddr: "127.0.0.1:9962",
		LogFormat:   "json",
		LogLevel:    "info",
		IPAM: IPAMConfig{
			Provider:        "static",
			Cooldown:        Duration{30 * time.Second},
			AllocateTimeout: Duration{30 * time.Second},
			Azure: AzureConfig{
				IMDSURL:     "http://169.254.169.254",
				ARMEndpoint: "https://management.azure.com",
				Credential:  "managedIdentity",
				MinFree:     8,
				Batch:       16,
				MaxFree:     24,
				MaxIPs:      256,
				Interval:    Duration{10 * time.Second},
			},
		},
	}
	if got := DefaultConfig(); !reflect.DeepEqual(got, want) {
		t.Errorf("DefaultConfig() =\n%+v\nwant (as docs/configuration.md says)\n%+v", got, want)
	}
}

// TestDefaultConfigNeedsAddressesAndPrefixes: the defaults alone are not a configuration,
// and the message says what to add.
func TestDefaultConfigNeedsAddressesAndPrefixes(t *testing.T) {
	cfg := DefaultConfig()
	_, err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "ipam.static.addresses is empty") {
		t.Fatalf("Validate(defaults) = %v, want the ipam.static.addresses is empty error", err)
	}
	cfg.IPAM.Static.Addresses = []string{"10.1.0.10"}
	_, err = cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "vnetCIDRs is empty") {
		t.Fatalf("Validate(defaults + addresses) = %v, want the vnetCIDRs is empty error", err)
	}
}

func parse(t *testing.T, doc string) (Config, error) {
	t.Helper()
	cfg := DefaultConfig()
	err := ParseConfig([]byte(doc), &cfg)
	return cfg, err
}

func TestParseConfigSetsEveryKey(t *testing.T) {
	doc := `
nic: ens5
bpfRoot: /sys/fs/bpf/node-a
attachMode: tc
socket: /run/node-a/agent.sock
stateDir: /var/lib/node-a
metricsAddr: ":9000"
vnetCIDRs: [10.1.0.0/16, 10.2.0.0/16]
mtu: 1400
allowIMDS: true
logFormat: text
logLevel: debug
ipam:
  provider: static
  cooldown: 1m30s
  allocateTimeout: 45s
  static:
    addresses:
      - 10.1.0.10
      - 10.1.0.16/28
  azure:
    imdsURL: http://127.0.0.1:8080
    armEndpoint: https://127.0.0.1:8443
    caFile: /etc/vnetbpf/ca.pem
    credential: tokenFile
    clientID: 00000000-0000-0000-0000-000000000001
    tokenFile: /var/run/secrets/azure/token
    subscriptionID: sub-1
    resourceGroup: rg-nodes
    nicName: node-a-nic
    minFree: 4
    batch: 8
    maxFree: 12
    maxIPs: 64
    interval: 1m
`
	got, err := parse(t, doc)
	if err != nil {
		t.Fatalf("ParseConfig: %v", err)
	}
	want := Config{
		NIC:         "ens5",
		BPFRoot:     "/sys/fs/bpf/node-a",
		AttachMode:  loader.ModeTC,
		Socket:      "/run/node-a/agent.sock",
		StateDir:    "/var/lib/node-a",
		MetricsAddr: ":9000",
		VNetCIDRs:   []string{"10.1.0.0/16", "10.2.0.0/16"},
		MTU:         1400,
		AllowIMDS:   true,
		LogFormat:   "text",
		LogLevel:    "debug",
		IPAM: IPAMConfig{
			Provider:        "static",
			Cooldown:        Duration{90 * time.Second},
			AllocateTimeout: Duration{45 * time.Second},
			Static:          StaticConfig{Addresses: []string{"10.1.0.10", "10.1.0.16/28"}},
			Azure: AzureConfig{
				IMDSURL:        "http://127.0.0.1:8080",
				ARMEndpoint:    "https://127.0.0.1:8443",
				CAFile:         "/etc/vnetbpf/ca.pem",
				Credential:     "tokenFile",
				ClientID:       "00000000-0000-0000-0000-000000000001",
				TokenFile:      "/var/run/secrets/azure/token",
				SubscriptionID: "sub-1",
				ResourceGroup:  "rg-nodes",
				NICName:        "node-a-nic",
				MinFree:        4,
				Batch:          8,
				MaxFree:        12,
				MaxIPs:         64,
				Interval:       Duration{time.Minute},
			},
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseConfig =\n%+v\nwant\n%+v", got, want)
	}
	if _, err := got.Validate(); err != nil {
		t.Errorf("Validate of a complete configuration: %v", err)
	}
}

// TestParseConfigKeepsUnsetKeys: a file sets only what it names, at every level, so that
// setting ipam.static.addresses does not reset ipam.cooldown or ipam.provider, and setting
// one warm-pool number keeps the others.
func TestParseConfigKeepsUnsetKeys(t *testing.T) {
	got, err := parse(t, "ipam:\n  static:\n    addresses: [10.1.0.10]\n  azure:\n    minFree: 2\nvnetCIDRs: [10.1.0.0/16]\n")
	if err != nil {
		t.Fatalf("ParseConfig: %v", err)
	}
	want := DefaultConfig()
	want.IPAM.Static.Addresses = []string{"10.1.0.10"}
	want.IPAM.Azure.MinFree = 2
	want.VNetCIDRs = []string{"10.1.0.0/16"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseConfig =\n%+v\nwant the defaults with only the three keys set\n%+v", got, want)
	}
}

// TestParseConfigEmptyKeepsDefaults: a file with nothing in it is the defaults, not an error
// and not a zeroed configuration.
func TestParseConfigEmptyKeepsDefaults(t *testing.T) {
	for name, doc := range map[string]string{
		"empty":         "",
		"blank lines":   "\n\n",
		"comments only": "# nothing configured yet\n",
		"document mark": "---\n",
	} {
		t.Run(name, func(t *testing.T) {
			got, err := parse(t, doc)
			if err != nil {
				t.Fatalf("ParseConfig(%q): %v", doc, err)
			}
			if want := DefaultConfig(); !reflect.DeepEqual(got, want) {
				t.Errorf("ParseConfig(%q) =\n%+v\nwant the defaults\n%+v", doc, got, want)
			}
		})
	}
}

func TestParseConfigRejectsUnknownKeys(t *testing.T) {
	for _, tc := range []struct {
		name, doc, key string
	}{
		{"top level", "nics: eth0\n", "nics"},
		{"top level snake case", "bpf_root: /sys/fs/bpf/x\n", "bpf_root"},
		{"ipam", "ipam:\n  cooldwn: 10s\n", "cooldwn"},
		{"ipam.static", "ipam:\n  static:\n    adresses: [10.1.0.10]\n", "adresses"},
		{"ipam.azure", "ipam:\n  azure:\n    minfre: 2\n", "minfre"},
		{"provider section at the wrong level", "azure:\n  minFree: 2\n", "azure"},
		{"next to valid keys", "nic: eth0\nvnetCIDRs: [10.1.0.0/16]\nmetrics: :9000\n", "metrics"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse(t, tc.doc)
			if err == nil {
				t.Fatalf("ParseConfig(%q) accepted the unknown key %q", tc.doc, tc.key)
			}
			if !strings.Contains(err.Error(), `"`+tc.key+`"`) {
				t.Errorf("ParseConfig(%q) = %v, want an error naming %q", tc.doc, err, tc.key)
			}
		})
	}
}

func TestParseConfigDuration(t *testing.T) {
	for _, tc := range []struct {
		doc  string
		want time.Duration
	}{
		{"ipam:\n  cooldown: 45s\n", 45 * time.Second},
		{"ipam:\n  cooldown: 1m30s\n", 90 * time.Second},
		{"ipam:\n  cooldown: \"2m\"\n", 2 * time.Minute},
		{"ipam:\n  cooldown: 0s\n", 0},
	} {
		got, err := parse(t, tc.doc)
		if err != nil {
			t.Errorf("ParseConfig(%q): %v", tc.doc, err)
			continue
		}
		if got.IPAM.Cooldown.Duration != tc.want {
			t.Errorf("ParseConfig(%q): cooldown %v, want %v", tc.doc, got.IPAM.Cooldown.Duration, tc.want)
		}
	}
}

func TestParseConfigRejectsBadDuration(t *testing.T) {
	for _, tc := range []struct {
		name, doc, msg string
	}{
		{"bare number", "ipam:\n  cooldown: 30\n", `duration must be a string such as "30s"`},
		{"space before unit", "ipam:\n  cooldown: 30 s\n", "unknown unit"},
		{"no unit", "ipam:\n  cooldown: \"30\"\n", "missing unit"},
		{"words", "ipam:\n  cooldown: soon\n", "invalid duration"},
		{"list", "ipam:\n  cooldown: [30s]\n", `duration must be a string such as "30s"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := parse(t, tc.doc)
			if err == nil {
				t.Fatalf("ParseConfig(%q) accepted it: cooldown %v", tc.doc, cfg.IPAM.Cooldown)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("ParseConfig(%q) = %v, want an error containing %q", tc.doc, err, tc.msg)
			}
		})
	}
}

func TestParseConfigRejectsWrongTypes(t *testing.T) {
	for _, doc := range []string{
		"mtu: \"1500\"\n",
		"mtu: 1500.5\n",
		"vnetCIDRs: 10.1.0.0/16\n", // a string where a list belongs
		"ipam:\n  static:\n    addresses: 10.1.0.10\n",
		"ipam: static\n",
		"- nic\n", // a list where the document should be a mapping
		"nic: [eth0, eth1]\n",
		"allowIMDS: \"true\"\n",        // a string where a boolean belongs
		"nic: eth0\n  bad indent: x\n", // not YAML
	} {
		if cfg, err := parse(t, doc); err == nil {
			t.Errorf("ParseConfig(%q) accepted it: %+v", doc, cfg)
		}
	}
}

func TestDurationRoundTrip(t *testing.T) {
	in := Duration{90 * time.Second}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != `"1m30s"` {
		t.Errorf("Marshal(%v) = %s, want \"1m30s\"", in.Duration, b)
	}
	var out Duration
	if err := json.Unmarshal(b, &out); err != nil || out != in {
		t.Errorf("Unmarshal(%s) = %v, %v; want %v", b, out.Duration, err, in.Duration)
	}
}

func writeConfig(t *testing.T, doc string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLoadConfig(t *testing.T) {
	t.Run("empty file keeps defaults", func(t *testing.T) {
		cfg, err := LoadConfig(writeConfig(t, ""), true)
		if err != nil {
			t.Fatalf("LoadConfig(empty file): %v", err)
		}
		if want := DefaultConfig(); !reflect.DeepEqual(cfg, want) {
			t.Errorf("LoadConfig(empty file) =\n%+v\nwant the defaults\n%+v", cfg, want)
		}
	})
	t.Run("file over defaults", func(t *testing.T) {
		cfg, err := LoadConfig(writeConfig(t, "nic: ens5\nipam:\n  cooldown: 5s\n"), true)
		if err != nil {
			t.Fatalf("LoadConfig: %v", err)
		}
		if cfg.NIC != "ens5" || cfg.IPAM.Cooldown.Duration != 5*time.Second {
			t.Errorf("LoadConfig: nic %q cooldown %v, want ens5 and 5s", cfg.NIC, cfg.IPAM.Cooldown)
		}
		if cfg.Socket != DefaultConfig().Socket || cfg.IPAM.Provider != "static" {
			t.Errorf("LoadConfig lost defaults the file does not set: socket %q provider %q", cfg.Socket, cfg.IPAM.Provider)
		}
	})
	t.Run("missing default file means defaults", func(t *testing.T) {
		cfg, err := LoadConfig(filepath.Join(t.TempDir(), "absent.yaml"), false)
		if err != nil {
			t.Fatalf("LoadConfig(absent, !mustExist): %v", err)
		}
		if want := DefaultConfig(); !reflect.DeepEqual(cfg, want) {
			t.Errorf("LoadConfig(absent) = %+v, want the defaults", cfg)
		}
	})
	t.Run("missing named file is an error", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "absent.yaml")
		if _, err := LoadConfig(path, true); err == nil || !strings.Contains(err.Error(), path) {
			t.Errorf("LoadConfig(absent, mustExist) = %v, want an error naming %s", err, path)
		}
	})
	t.Run("unknown key names the file", func(t *testing.T) {
		path := writeConfig(t, "ipam:\n  static:\n    adresses: [10.1.0.10]\n")
		_, err := LoadConfig(path, false)
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "adresses") {
			t.Errorf("LoadConfig(typo) = %v, want an error naming %s and the key", err, path)
		}
	})
}

// validConfig is the smallest configuration Validate accepts.
func validConfig() Config {
	cfg := DefaultConfig()
	cfg.VNetCIDRs = []string{"10.1.0.0/16"}
	cfg.IPAM.Static.Addresses = []string{"10.1.0.10"}
	return cfg
}

func TestValidateAccepts(t *testing.T) {
	for _, tc := range []struct {
		name   string
		modify func(*Config)
	}{
		{"minimal", func(*Config) {}},
		{"attachMode tcx", func(c *Config) { c.AttachMode = loader.ModeTCX }},
		{"attachMode tc", func(c *Config) { c.AttachMode = loader.ModeTC }},
		{"logFormat text", func(c *Config) { c.LogFormat = "text" }},
		{"mtu 0 takes the NIC's", func(c *Config) { c.MTU = 0 }},
		{"mtu 576", func(c *Config) { c.MTU = 576 }},
		{"mtu 9000", func(c *Config) { c.MTU = 9000 }},
		{"mtu 65535", func(c *Config) { c.MTU = 65535 }},
		{"metrics off", func(c *Config) { c.MetricsAddr = "" }},
		{"cooldown off", func(c *Config) { c.IPAM.Cooldown = Duration{} }},
		{"allocateTimeout 0", func(c *Config) { c.IPAM.AllocateTimeout = Duration{} }},
		{"azure with defaults and no static addresses", func(c *Config) {
			c.IPAM.Provider = "azure"
			c.IPAM.Static.Addresses = nil
		}},
		{"azure smallest pool", func(c *Config) {
			c.IPAM.Provider = "azure"
			c.IPAM.Azure.MaxIPs, c.IPAM.Azure.Batch, c.IPAM.Azure.MinFree, c.IPAM.Azure.MaxFree = 2, 1, 0, 0
		}},
		{"azure minFree equal to maxFree", func(c *Config) {
			c.IPAM.Provider = "azure"
			c.IPAM.Azure.MinFree, c.IPAM.Azure.MaxFree = 5, 5
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := validConfig()
			tc.modify(&cfg)
			if _, err := cfg.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

func TestValidateRejects(t *testing.T) {
	for _, tc := range []struct {
		name   string
		modify func(*Config)
		msg    string // the error must contain this: the key and what to do
	}{
		{"empty nic", func(c *Config) { c.NIC = "" }, "nic must name the host interface"},
		{"empty bpfRoot", func(c *Config) { c.BPFRoot = "" }, "bpfRoot must not be empty"},
		{"empty socket", func(c *Config) { c.Socket = "" }, "socket must not be empty"},
		{"empty stateDir", func(c *Config) { c.StateDir = "" }, "stateDir must not be empty"},
		{"attachMode xdp", func(c *Config) { c.AttachMode = "xdp" }, `attachMode "xdp": want auto, tcx or tc`},
		{"attachMode empty", func(c *Config) { c.AttachMode = "" }, `attachMode "": want auto, tcx or tc`},
		{"attachMode upper case", func(c *Config) { c.AttachMode = "TCX" }, `attachMode "TCX"`},
		{"logFormat yaml", func(c *Config) { c.LogFormat = "yaml" }, `logFormat "yaml": want json or text`},
		{"logFormat empty", func(c *Config) { c.LogFormat = "" }, `logFormat "": want json or text`},
		{"mtu below 576", func(c *Config) { c.MTU = 575 }, "mtu 575: want 0 (the NIC's) or 576..65535"},
		{"mtu above 65535", func(c *Config) { c.MTU = 65536 }, "mtu 65536"},
		{"negative mtu", func(c *Config) { c.MTU = -1 }, "mtu -1"},
		{"provider aws", func(c *Config) { c.IPAM.Provider = "aws" }, `ipam.provider "aws": want static or azure`},
		{"provider empty", func(c *Config) { c.IPAM.Provider = "" }, `ipam.provider "": want static or azure`},
		{"negative allocateTimeout", func(c *Config) { c.IPAM.AllocateTimeout = Duration{-time.Second} }, "ipam.allocateTimeout must not be negative"},
		{"allocateTimeout -1ns", func(c *Config) { c.IPAM.AllocateTimeout = Duration{-1} }, "ipam.allocateTimeout must not be negative"},
		{"azure maxIPs 1", func(c *Config) { c.IPAM.Provider = "azure"; c.IPAM.Azure.MaxIPs = 1 }, "ipam.azure.maxIPs 1: want 2..256"},
		{"azure maxIPs 257", func(c *Config) { c.IPAM.Provider = "azure"; c.IPAM.Azure.MaxIPs = 257 }, "ipam.azure.maxIPs 257: want 2..256"},
		{"azure batch 0", func(c *Config) { c.IPAM.Provider = "azure"; c.IPAM.Azure.Batch = 0 }, "ipam.azure.batch 0: want at least 1"},
		{"azure negative minFree", func(c *Config) { c.IPAM.Provider = "azure"; c.IPAM.Azure.MinFree = -1 }, "want 0 <= minFree <= maxFree"},
		{"azure maxFree below minFree", func(c *Config) {
			c.IPAM.Provider = "azure"
			c.IPAM.Azure.MinFree, c.IPAM.Azure.MaxFree = 10, 5
		}, "ipam.azure.minFree 10 and maxFree 5: want 0 <= minFree <= maxFree"},
		{"empty pool", func(c *Config) { c.IPAM.Static.Addresses = nil }, "ipam.static.addresses is empty"},
		{"empty pool list", func(c *Config) { c.IPAM.Static.Addresses = []string{} }, "ipam.static.addresses is empty"},
		{"empty vnetCIDRs", func(c *Config) { c.VNetCIDRs = nil }, "vnetCIDRs is empty"},
		{"IPv6 prefix", func(c *Config) { c.VNetCIDRs = []string{"fd00::/64"} }, `vnetCIDRs: "fd00::/64" is not an IPv4 prefix`},
		{"IPv4-mapped IPv6 prefix", func(c *Config) { c.VNetCIDRs = []string{"::ffff:10.1.0.0/112"} }, `"::ffff:10.1.0.0/112" is not an IPv4 prefix`},
		{"address without length", func(c *Config) { c.VNetCIDRs = []string{"10.1.0.0"} }, `vnetCIDRs: "10.1.0.0" is not an IPv4 prefix`},
		{"not a prefix", func(c *Config) { c.VNetCIDRs = []string{"vnet"} }, `vnetCIDRs: "vnet" is not an IPv4 prefix`},
		{"bad prefix after a good one", func(c *Config) { c.VNetCIDRs = []string{"10.1.0.0/16", "10.2.0.0/33"} }, `"10.2.0.0/33" is not an IPv4 prefix`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := validConfig()
			tc.modify(&cfg)
			prefixes, err := cfg.Validate()
			if err == nil {
				t.Fatalf("Validate accepted it (prefixes %v)", prefixes)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Validate = %q, want it to contain %q", err, tc.msg)
			}
		})
	}
}

// TestValidateReturnsPrefixes: the prefixes come back parsed and masked, in order, as the
// agent writes them to vnet_cidrs.
func TestValidateReturnsPrefixes(t *testing.T) {
	cfg := validConfig()
	cfg.VNetCIDRs = []string{"10.1.0.0/16", "10.2.3.4/24", "192.168.7.7/32"}
	got, err := cfg.Validate()
	if err != nil {
		t.Fatalf("Validate: %v", err)
	}
	want := []netip.Prefix{
		netip.MustParsePrefix("10.1.0.0/16"),
		netip.MustParsePrefix("10.2.3.0/24"),
		netip.MustParsePrefix("192.168.7.7/32"),
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Validate prefixes = %v, want %v", got, want)
	}
}

func TestParseConfigRejectsDuplicateKeys(t *testing.T) {
	cfg := DefaultConfig()
	if err := ParseConfig([]byte("nic: eth0\nnic: eth1\n"), &cfg); err == nil {
		t.Fatal("a key given twice was accepted")
	}
}

func TestValidateAzureCredential(t *testing.T) {
	for _, tc := range []struct {
		cred, tokenFile, want string
	}{
		{"managedIdentity", "", ""},
		{"default", "", ""},
		{"tokenFile", "/run/token", ""},
		{"tokenFile", "", "needs ipam.azure.tokenFile"},
		{"managedidentity", "", `credential "managedidentity"`},
	} {
		cfg := DefaultConfig()
		cfg.VNetCIDRs = []string{"10.0.0.0/16"}
		cfg.IPAM.Provider = "azure"
		cfg.IPAM.Azure.Credential, cfg.IPAM.Azure.TokenFile = tc.cred, tc.tokenFile
		_, err := cfg.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("credential %q: %v", tc.cred, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("credential %q, tokenFile %q: %v, want an error containing %q", tc.cred, tc.tokenFile, err, tc.want)
		}
	}
}
