package resources

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
)

// TestTeardownRemovesWhatASavedListNames plays a run that was killed: a registry saved to a
// file records a namespace, a process, a bpffs directory and a scratch directory; a second
// registry loaded from the file (as `vnetbpf-bench down` does) removes all of them.
func TestTeardownRemovesWhatASavedListNames(t *testing.T) {
	testutils.RequireRoot(t)
	file := filepath.Join(t.TempDir(), "resources.json")
	run := New(file)
	n, err := run.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	root, err := run.NewBPFRoot("vnetbpf-bench-test")
	if err != nil {
		t.Fatal(err)
	}
	dir, err := run.NewDir(t.TempDir(), "scratch")
	if err != nil {
		t.Fatal(err)
	}
	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { sleeper.Wait(); close(exited) }()
	run.TrackPID(sleeper.Process.Pid)

	down, err := Load(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := down.Teardown(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{n.Path(), root, dir} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s still exists", p)
		}
	}
	select {
	case <-exited:
	default:
		t.Error("the recorded process is still running")
	}
	if _, err := os.Stat(file); err == nil {
		t.Error("the list is still there after a clean teardown")
	}
}

func TestNilRegistryRecordsNothing(t *testing.T) {
	var r *Registry
	r.TrackPID(1)
	r.TrackBPFRoot("/nonexistent")
	r.TrackDir("/nonexistent")
	if err := r.Teardown(); err != nil {
		t.Fatal(err)
	}
}
