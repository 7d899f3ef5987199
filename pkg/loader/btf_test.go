package loader_test

import (
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

func bpftool(t *testing.T, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("bpftool"); err != nil {
		t.Skip("bpftool is not installed (make deps installs it)")
	}
	out, err := exec.Command("bpftool", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestObjectBTF: the committed object describes the endpoint struct with its field names.
func TestObjectBTF(t *testing.T) {
	out := bpftool(t, "btf", "dump", "file", "datapath_bpfel.o")
	for _, want := range []string{"STRUCT 'endpoint' size=24", "'ifindex'", "'mac'", "'host_mac'", "STRUCT 'endpoint_key' size=4", "ENUM 'stat_reason'"} {
		if !strings.Contains(out, want) {
			t.Errorf("bpftool btf dump of datapath_bpfel.o lacks %q", want)
		}
	}
}

// TestPinnedMapsReadable: every pinned map carries BTF, so bpftool prints field names, not
// hex. (An enum-typed array key once made the kernel refuse the stats map's BTF.)
func TestPinnedMapsReadable(t *testing.T) {
	root := testutils.BPFRoot(t)
	dp, err := loader.Load(loader.Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	m := maps.FromObjects(&dp.Objects)
	if err := m.PutEndpoint(netip.MustParseAddr("10.0.1.4"), maps.Endpoint{Ifindex: 6, Id: 4, Mac: [6]byte{2, 0, 0, 0, 0, 1}, HostMac: [6]byte{2, 0, 0, 0, 0, 2}}); err != nil {
		t.Fatal(err)
	}
	if err := m.AddVNetCIDR(netip.MustParsePrefix("10.0.0.0/16")); err != nil {
		t.Fatal(err)
	}
	for name, fields := range map[string][]string{
		"endpoints":      {`"ip":[10,0,1,4]`, `"host_mac"`, `"ifindex":6`},
		"vnet_cidrs":     {`"prefixlen":16`, `"flags"`},
		"config":         {`"nic_ifindex"`, `"nic_mac"`},
		"stats":          {`"packets"`, `"bytes"`},
		"endpoint_stats": {`"rx_packets"`, `"tx_bytes"`},
	} {
		out := strings.ReplaceAll(bpftool(t, "-j", "map", "dump", "pinned", filepath.Join(root, name)), " ", "")
		for _, f := range fields {
			if !strings.Contains(out, f) {
				t.Errorf("bpftool map dump of %s lacks %s: %.300s", name, f, out)
			}
		}
	}
}
