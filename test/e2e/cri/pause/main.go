// Command pause is the sandbox ("infra") container of the CRI end-to-end test: like the
// Kubernetes pause image, it holds the pod's namespaces open, does nothing else, reaps
// zombies when it is PID 1, and exits 0 on SIGINT or SIGTERM.
//
// Built with CGO_ENABLED=0 it needs nothing else in its image, and it writes that image
// itself: `pause -write-image pause.tar -name localhost/vnetbpf/pause:3.10` writes an OCI
// image-layout tar of its own executable for `ctr images import`.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/vnetbpf/vnetbpf/test/e2e/cri/ociimage"
)

// DefaultName is the reference -write-image uses without -name (the CRI test passes its own).
const DefaultName = "localhost/vnetbpf/pause:3.10"

func main() {
	image := flag.String("write-image", "", "write an OCI image-layout tar of this binary to `file` and exit")
	name := flag.String("name", DefaultName, "image reference for -write-image")
	flag.Parse()
	if *image != "" {
		if err := writeImage(*image, *name); err != nil {
			fmt.Fprintln(os.Stderr, "pause:", err)
			os.Exit(1)
		}
		return
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	os.Exit(pause(sigs))
}

// pause waits on sigs: on SIGCHLD it reaps, since as PID 1 of a pod's shared PID namespace it
// inherits orphans; on SIGINT or SIGTERM it returns 0, the status for a clean stop. It
// returns 2 if sigs is closed, which only a test does.
func pause(sigs <-chan os.Signal) int {
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			return 0
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
	return 2
}

func writeImage(out, name string) error {
	self, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	err = ociimage.Write(&buf, ociimage.Image{
		Name: name, OS: "linux", Architecture: runtime.GOARCH,
		Entrypoint: []string{"/pause"},
		User:       "65535:65535", // as the upstream pause image: nothing needs root
		Files:      []ociimage.File{{Path: "/pause", Mode: 0o755, Data: self}},
	})
	if err != nil {
		return err
	}
	return os.WriteFile(out, buf.Bytes(), 0o644)
}
