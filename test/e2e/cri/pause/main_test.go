package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vnetbpf/vnetbpf/test/e2e/cri/ociimage"
)

// TestMain lets the test binary act as pause when asked to, so that the tests run the very
// code the image holds.
func TestMain(m *testing.M) {
	if os.Getenv("VNETBPF_PAUSE_MAIN") == "1" {
		os.Args = append([]string{"pause"}, strings.Fields(os.Getenv("VNETBPF_PAUSE_ARGS"))...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func pauseCommand(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "VNETBPF_PAUSE_MAIN=1", "VNETBPF_PAUSE_ARGS="+strings.Join(args, " "))
	return cmd
}

// TestPause: SIGCHLD reaps a dead child and pause goes on; SIGTERM and SIGINT end it with 0.
func TestPause(t *testing.T) {
	child := exec.Command("true")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	pid := child.Process.Pid
	waitState(t, pid, "Z") // dead, not yet reaped

	sigs := make(chan os.Signal, 1)
	sigs <- syscall.SIGCHLD
	close(sigs)
	if code := pause(sigs); code != 2 {
		t.Fatalf("pause returned %d on SIGCHLD; want it to go on until its signals end (2)", code)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("child %d not reaped on SIGCHLD (%v)", pid, err)
	}

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		sigs := make(chan os.Signal, 1)
		sigs <- sig
		if code := pause(sigs); code != 0 {
			t.Errorf("pause returned %d on %s, want 0", code, sig)
		}
	}
}

// waitState waits until process pid is in state (R, S, Z...), per /proc/PID/stat.
func waitState(t *testing.T, pid int, state string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		// The fields after the command name, which is in parentheses, start with the state.
		s := string(b)
		if fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:]); len(fields) > 0 && fields[0] == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d not in state %s after 5s: %s", pid, state, s)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestWriteImage: -write-image puts the running binary itself at /pause in the image.
func TestWriteImage(t *testing.T) {
	out := filepath.Join(t.TempDir(), "pause.tar")
	if b, err := pauseCommand("-write-image", out, "-name", "localhost/test/pause:1").CombinedOutput(); err != nil {
		t.Fatalf("pause -write-image: %v\n%s", err, b)
	}
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	layout, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	files := untar(t, layout)
	var idx ociimage.Index
	if err := json.Unmarshal(files["index.json"], &idx); err != nil || len(idx.Manifests) != 1 {
		t.Fatalf("index.json: %v %+v", err, idx)
	}
	if name := idx.Manifests[0].Annotations[ociimage.AnnotationImageName]; name != "localhost/test/pause:1" {
		t.Errorf("image name %q, want localhost/test/pause:1", name)
	}
	var m ociimage.Manifest
	if err := json.Unmarshal(files[blob(idx.Manifests[0])], &m); err != nil || len(m.Layers) != 1 {
		t.Fatalf("manifest: %v %+v", err, m)
	}
	layer := untar(t, files[blob(m.Layers[0])])
	if !bytes.Equal(layer["pause"], self) {
		t.Errorf("/pause in the image (%d bytes) is not the binary that wrote it (%d bytes)", len(layer["pause"]), len(self))
	}
}

func blob(d ociimage.Descriptor) string { return "blobs/" + strings.Replace(d.Digest, ":", "/", 1) }

func untar(t *testing.T, b []byte) map[string][]byte {
	t.Helper()
	files := make(map[string][]byte)
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = data
	}
}
