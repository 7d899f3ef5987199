package cni

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// FuzzNetConf: any stdin is either a configuration whose every field the plugin can use, or a
// CNI error with code 6 (not JSON) or 7 (unusable value) — never a panic or a silent default.
func FuzzNetConf(f *testing.F) {
	for _, s := range []string{
		`{"cniVersion":"1.1.0","name":"vnet","type":"vnetbpf"}`,
		`{"cniVersion":"1.1.0","name":"vnet","type":"vnetbpf","agentSocket":"/run/x.sock","mtu":1400,"logFile":"/tmp/l","logLevel":"debug"}`,
		`{"cniVersion":"0.3.1","name":"vnet","type":"vnetbpf","mtu":67}`,
		`{"cniVersion":"1.1.0","name":"vnet","type":"vnetbpf","agentSocket":"relative"}`,
		`{"mtu":"1500"}`, `{`, `null`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, stdin []byte) {
		conf, err := loadConf(stdin)
		if err != nil {
			var cerr *types.Error
			if !errors.As(err, &cerr) || (cerr.Code != types.ErrDecodingFailure && cerr.Code != types.ErrInvalidNetworkConfig) {
				t.Fatalf("error %v is not a CNI error with code 6 or 7", err)
			}
			return
		}
		if !filepath.IsAbs(conf.AgentSocket) || (conf.MTU != 0 && (conf.MTU < 68 || conf.MTU > 65535)) ||
			(conf.LogFile != "" && !filepath.IsAbs(conf.LogFile)) {
			t.Fatalf("accepted an unusable configuration: %+v", conf)
		}
		if _, err := parseLevel(conf.LogLevel); err != nil {
			t.Fatalf("accepted log level %q", conf.LogLevel)
		}
	})
}

// FuzzArgs: CNI_ARGS parse into the known keys or fail with code 4.
func FuzzArgs(f *testing.F) {
	for _, s := range []string{
		"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u",
		"K8S_POD_NAME=x", "FOO=bar", "IgnoreUnknown=1;FOO=bar", "=", ";;", "K8S_POD_NAME", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		_, err := loadArgs(s)
		if err != nil {
			var cerr *types.Error
			if !errors.As(err, &cerr) || cerr.Code != types.ErrInvalidEnvironmentVariables {
				t.Fatalf("error %v is not a CNI error with code 4", err)
			}
		}
	})
}
