package topology

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

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
	missing := false
	for _, p := range upstreamPlugins {
		if _, err := os.Stat(filepath.Join(dir, filepath.Base(p))); err != nil {
			missing = true
		}
	}
	if !missing {
		return dir, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// Build into a scratch directory and rename, so an interrupted build never leaves a
	// truncated binary that a later run would take for a good one.
	scratch, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(scratch)
	var pkgs []string
	for _, p := range upstreamPlugins {
		pkgs = append(pkgs, "github.com/containernetworking/plugins/plugins/"+p+"@"+e2e.PluginsVersion)
	}
	cmd := exec.Command("go", append([]string{"install"}, pkgs...)...)
	cmd.Dir = os.TempDir() // outside any module, so that path@version names what is built
	cmd.Env = append(os.Environ(), "GOBIN="+scratch, "CGO_ENABLED=0", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install %s: %v\n%s", strings.Join(pkgs, " "), err, out)
	}
	for _, p := range upstreamPlugins {
		name := filepath.Base(p)
		if err := os.Rename(filepath.Join(scratch, name), filepath.Join(dir, name)); err != nil {
			return "", err
		}
	}
	return dir, nil
}
