package topology

import (
	"os"
	"testing"

	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/internal/testutils"
)

// TestBuildReachesEveryServer builds every setup the datapath comparison uses and relies on
// Build's own check that each client pings its server; it then checks that the pairs are
// the ones the report labels them as, and that teardown leaves no namespace behind.
func TestBuildReachesEveryServer(t *testing.T) {
	testutils.RequireRoot(t)
	if testing.Short() {
		t.Skip("builds three simulated VNets with agents and upstream plugins")
	}
	plugins, err := UpstreamPlugins()
	if err != nil {
		t.Fatal(err)
	}
	reg := resources.New("")
	t.Cleanup(func() { reg.Teardown() })
	env, err := Build(t.Context(), Options{Reg: reg, WorkDir: t.TempDir(), PluginsDir: plugins, Progress: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	want := map[Scope][]Mode{
		SameNode:    {VNetBPF, PTP, Bridge, Direct},
		AcrossNodes: {VNetBPF, PTP, Bridge, Direct, Fabric},
	}
	got := map[Scope][]Mode{}
	for _, p := range env.Pairs {
		got[p.Scope] = append(got[p.Scope], p.Mode)
		if p.Client.NS == p.Server.NS {
			t.Errorf("%s: client and server share a namespace", p.Label())
		}
	}
	for s, modes := range want {
		if len(got[s]) != len(modes) {
			t.Fatalf("%s: modes %v, want %v", s, got[s], modes)
		}
		for i := range modes {
			if got[s][i] != modes[i] {
				t.Errorf("%s: modes %v, want %v (the interleaving order)", s, got[s], modes)
			}
		}
	}
	var paths []string
	for _, p := range env.Pairs {
		paths = append(paths, p.Client.NS.Path(), p.Server.NS.Path())
	}
	if err := env.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if err := reg.Teardown(); err != nil {
		t.Errorf("teardown: %v", err)
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("namespace %s still exists after teardown", p)
		}
	}
}
