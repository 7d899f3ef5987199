package loader_test

import (
	"net/netip"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// TestLoadReplacesIncompatibleMaps: an upgrade over maps pinned by a version that defined one
// of them differently replaces that map with a new, empty one and keeps the others with their
// entries; the old map lives on for the programs still using it.
func TestLoadReplacesIncompatibleMaps(t *testing.T) {
	root := testutils.BPFRoot(t)
	old, err := loader.LoadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	// The previous release's endpoint_stats: one shared array entry per possible endpoint.
	old.Maps[loader.DatapathMapEndpointStats].Type = ebpf.Array
	old.Maps[loader.DatapathMapEndpointStats].MaxEntries = 65536
	prev, err := loader.Load(loader.Options{Root: root, Spec: old})
	if err != nil {
		t.Fatal(err)
	}
	defer prev.Close()
	ip := netip.MustParseAddr("10.0.0.10")
	if err := maps.FromObjects(&prev.Objects).PutEndpoint(ip, maps.Endpoint{Ifindex: 7, Id: 1}); err != nil {
		t.Fatal(err)
	}

	dp, err := loader.Load(loader.Options{Root: root})
	if err != nil {
		t.Fatalf("load over the previous version's maps: %v", err)
	}
	defer dp.Close()
	if want := []string{loader.DatapathMapEndpointStats}; !slices.Equal(dp.Replaced, want) {
		t.Errorf("Replaced %v, want %v", dp.Replaced, want)
	}
	if _, err := maps.FromObjects(&dp.Objects).Endpoint(ip); err != nil {
		t.Errorf("the compatible endpoints map lost its entry: %v", err)
	}
	pinned, err := ebpf.LoadPinnedMap(filepath.Join(root, loader.DatapathMapEndpointStats), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	if pinned.Type() != ebpf.PerCPUArray {
		t.Errorf("pinned endpoint_stats is a %s, want the new definition's %s", pinned.Type(), ebpf.PerCPUArray)
	}
	oldInfo, err := prev.Objects.EndpointStats.Info()
	if err != nil {
		t.Fatalf("the old map is gone while its programs are loaded: %v", err)
	}
	newInfo, _ := pinned.Info()
	oldID, _ := oldInfo.ID()
	newID, _ := newInfo.ID()
	if oldID == newID {
		t.Errorf("the old and the new endpoint_stats are the same map (%d)", oldID)
	}

	again, err := loader.Load(loader.Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if len(again.Replaced) != 0 {
		t.Errorf("a second load replaced %v, want nothing", again.Replaced)
	}
}
