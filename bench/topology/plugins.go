package topology

import (
	"path/filepath"

	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// upstreamPlugins are the containernetworking/plugins binaries the comparison needs.
var upstreamPlugins = []string{"main/ptp", "main/bridge", "ipam/host-local", "main/loopback"}

// UpstreamPlugins returns a CNI bin dir holding ptp, bridge, host-local and loopback at
// e2e.PluginsVersion, building them with `go install` from the module proxy on first use.
// They live next to the end-to-end tests' tools (e2e.ToolsCacheDir), keyed by version, so a
// machine builds them once.
func UpstreamPlugins() (string, error) {
	dir := filepath.Join(e2e.ToolsCacheDir(), "bench-plugins-"+e2e.PluginsVersion)
	var pkgs []string
	for _, p := range upstreamPlugins {
		pkgs = append(pkgs, "github.com/containernetworking/plugins/plugins/"+p+"@"+e2e.PluginsVersion)
	}
	return dir, e2e.GoInstall(dir, pkgs...)
}
