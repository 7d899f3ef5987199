package cri

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// CrictlVersion is the cri-tools release whose crictl plays kubelet.
const CrictlVersion = "v1.37.0"

// PauseImage is the reference the pause image is imported under. It must be a full
// reference: an image imported under a bare tag poisons the CRI plugin's image cache until
// containerd restarts.
const PauseImage = "localhost/vnetbpf/pause:3.10"

// AptPackages provide containerd (with ctr and containerd-shim-runc-v2) and runc.
var AptPackages = []string{"containerd", "runc"}

// runtimeBinaries are what the test runs from PATH.
var runtimeBinaries = []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc", "nsenter"}

// MissingBinaries lists the runtime binaries not on PATH.
func MissingBinaries() []string {
	var missing []string
	for _, b := range runtimeBinaries {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	return missing
}

var installOnce = sync.OnceValue(func() error {
	if len(MissingBinaries()) == 0 {
		return nil
	}
	var out bytes.Buffer
	for _, args := range [][]string{{"update", "-qq"}, append([]string{"install", "-y", "-qq", "--no-install-recommends"}, AptPackages...)} {
		cmd := exec.Command("apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("apt-get %s: %v\n%s", strings.Join(args, " "), err, out.String())
		}
	}
	if missing := MissingBinaries(); len(missing) > 0 {
		return fmt.Errorf("still missing %v after installing %v", missing, AptPackages)
	}
	return nil
})

// InstallRuntime installs containerd and runc with apt-get when any runtime binary is missing.
func InstallRuntime() error { return installOnce() }

// CrictlBinary returns crictl, built by `go install` into e2e.ToolsCacheDir() once per machine.
func CrictlBinary() (string, error) { return crictlOnce() }

var crictlOnce = sync.OnceValues(func() (string, error) {
	dir := filepath.Join(e2e.ToolsCacheDir(), "crictl-"+CrictlVersion)
	return filepath.Join(dir, "crictl"), e2e.GoInstall(dir, "sigs.k8s.io/cri-tools/cmd/crictl@"+CrictlVersion)
})

// BuildPauseImage builds the pause command statically into dir and has it write its own
// image there as an OCI image-layout tar named ref; it returns the tar's path.
func BuildPauseImage(dir, ref string) (string, error) {
	bin := filepath.Join(dir, "pause")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./test/e2e/cri/pause")
	cmd.Dir = e2e.RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build pause: %v\n%s", err, out)
	}
	tar := filepath.Join(dir, "pause.tar")
	if out, err := exec.Command(bin, "-write-image", tar, "-name", ref).CombinedOutput(); err != nil {
		return "", fmt.Errorf("write pause image: %v\n%s", err, out)
	}
	return tar, nil
}
