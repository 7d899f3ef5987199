package cni

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// TestChainWithPortmapAndBandwidth runs vnetbpf as the first link of a conflist through
// libcni, as containerd does, followed by the upstream portmap and bandwidth binaries, which
// must accept vnetbpf's result as prevResult. It needs those binaries, so it runs only when
// CNI_PLUGINS_DIR names a directory that holds them, e.g. after
//
//	GOBIN=/tmp/cnibin go install github.com/containernetworking/plugins/plugins/meta/{portmap,bandwidth}@v1.10.0
func TestChainWithPortmapAndBandwidth(t *testing.T) {
	upstream := os.Getenv("CNI_PLUGINS_DIR")
	for _, p := range []string{"portmap", "bandwidth"} {
		if _, err := os.Stat(filepath.Join(upstream, p)); upstream == "" || err != nil {
			t.Skipf("set CNI_PLUGINS_DIR to a directory with the upstream %s plugin", p)
		}
	}
	e := newTestEnv(t)
	bin := t.TempDir()
	if out, err := exec.Command("go", "build", "-o", filepath.Join(bin, Type), "../../cmd/cni").CombinedOutput(); err != nil {
		t.Fatalf("build the vnetbpf binary: %v\n%s", err, out)
	}

	list, err := libcni.ConfListFromBytes(fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":"vnet","plugins":[
		{"type":"vnetbpf","agentSocket":%q,"logFile":%q},
		{"type":"portmap","backend":"nftables","capabilities":{"portMappings":true}},
		{"type":"bandwidth","capabilities":{"bandwidth":true}}]}`, e.agent.socket, e.logFile))
	if err != nil {
		t.Fatal(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{bin, upstream}, t.TempDir(), nil)
	rt := &libcni.RuntimeConf{
		ContainerID: "chained", NetNS: e.cont.Path(), IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "team-a"}, {"K8S_POD_NAME", "web-0"}},
		CapabilityArgs: map[string]any{
			"portMappings": []map[string]any{{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}},
			"bandwidth":    map[string]any{"ingressRate": 1_000_000, "ingressBurst": 100_000},
		},
	}

	err = e.inHost(func() error {
		r, err := cni.AddNetworkList(t.Context(), list, rt)
		if err != nil {
			return fmt.Errorf("ADD: %w", err)
		}
		res, err := current.NewResultFromResult(r)
		if err != nil || len(res.IPs) != 1 || res.IPs[0].Address.String() != "10.1.0.10/32" {
			return fmt.Errorf("chained result %v (err %v), want vnetbpf's 10.1.0.10/32", r, err)
		}
		// bandwidth shapes traffic into the container with a tbf qdisc on the host veth.
		host, err := netlink.LinkByName(api.HostVethName(key(e.args("chained", nil))))
		if err != nil {
			return err
		}
		qdiscs, err := netlink.QdiscList(host)
		if err != nil || len(qdiscs) == 0 || qdiscs[0].Type() != "tbf" {
			return fmt.Errorf("host veth qdiscs %v (err %v), want bandwidth's tbf", qdiscs, err)
		}
		if err := cni.CheckNetworkList(t.Context(), list, rt); err != nil {
			return fmt.Errorf("CHECK: %w", err)
		}
		if err := cni.DelNetworkList(t.Context(), list, rt); err != nil {
			return fmt.Errorf("DEL: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	e.assertHostClean(e.args("chained", nil), netip.MustParseAddr("10.1.0.10"))
}
