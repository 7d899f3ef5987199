// Package resources records what a benchmark run creates on the machine (network namespaces,
// bpffs pin directories, processes, scratch directories), so that the run removes all of it
// on success, on failure and on Ctrl-C, and `vnetbpf-bench -down` removes what a killed run
// left behind.
package resources

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	cnitestutils "github.com/containernetworking/plugins/pkg/testutils"
	"golang.org/x/sys/unix"
)

// Registry is the list of what a run created. Its methods are safe for concurrent use; a nil
// *Registry records nothing, for callers that clean up by themselves.
type Registry struct {
	mu   sync.Mutex
	file string // where the list is saved after every change; "" keeps it in memory

	Netns    []string `json:"netns"`
	PIDs     []int    `json:"pids"`
	BPFRoots []string `json:"bpfRoots"`
	Dirs     []string `json:"dirs"`

	open map[string]ns.NetNS
}

// New returns a registry saved to file ("" for none).
func New(file string) *Registry {
	return &Registry{file: file, open: make(map[string]ns.NetNS)}
}

// Load reads a registry an earlier run saved.
func Load(file string) (*Registry, error) {
	r := New(file)
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return r, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	return r, nil
}

func (r *Registry) saveLocked() {
	if r.file == "" {
		return
	}
	b, _ := json.MarshalIndent(r, "", "  ")
	tmp := r.file + ".tmp"
	if os.WriteFile(tmp, b, 0o600) == nil {
		os.Rename(tmp, r.file)
	}
}

// NewNS creates a network namespace and records it.
func (r *Registry) NewNS() (ns.NetNS, error) {
	n, err := cnitestutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("create netns: %w", err)
	}
	if r == nil {
		return n, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Netns = append(r.Netns, n.Path())
	r.open[n.Path()] = n
	r.saveLocked()
	return n, nil
}

// TrackNS records a namespace created elsewhere (by test/e2e).
func (r *Registry) TrackNS(n ns.NetNS) {
	if r == nil || n == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Netns = append(r.Netns, n.Path())
	r.open[n.Path()] = n
	r.saveLocked()
}

// RemoveNS removes a namespace now and forgets it.
func (r *Registry) RemoveNS(n ns.NetNS) error {
	if n == nil {
		return nil
	}
	if r != nil {
		r.mu.Lock()
		r.Netns = slices.DeleteFunc(r.Netns, func(p string) bool { return p == n.Path() })
		delete(r.open, n.Path())
		r.saveLocked()
		r.mu.Unlock()
	}
	n.Close()
	return cnitestutils.UnmountNS(n)
}

// TrackPID records a process to kill at teardown.
func (r *Registry) TrackPID(pid int) {
	if r == nil || pid <= 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.PIDs = append(r.PIDs, pid)
	r.saveLocked()
}

// ForgetPID drops a process that has exited.
func (r *Registry) ForgetPID(pid int) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.PIDs = slices.DeleteFunc(r.PIDs, func(p int) bool { return p == pid })
	r.saveLocked()
}

// TrackBPFRoot records a bpffs directory to remove with everything pinned in it.
func (r *Registry) TrackBPFRoot(dir string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.BPFRoots = append(r.BPFRoots, dir)
	r.saveLocked()
}

// TrackDir records a scratch directory to remove.
func (r *Registry) TrackDir(dir string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Dirs = append(r.Dirs, dir)
	r.saveLocked()
}

// Teardown kills the processes, removes the pins (which detaches programs held by pinned
// links), then the namespaces (and with them every veth, bridge and route in them), then
// the directories. It keeps going past errors and returns them all.
func (r *Registry) Teardown() error {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, pid := range r.PIDs {
		killAndWait(pid)
	}
	r.PIDs = nil
	for _, dir := range r.BPFRoots {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove pins %s: %w", dir, err))
		}
	}
	r.BPFRoots = nil
	for _, p := range r.Netns {
		if n, ok := r.open[p]; ok {
			n.Close()
		}
		if err := removeNetnsPath(p); err != nil {
			errs = append(errs, err)
		}
	}
	r.Netns = nil
	r.open = make(map[string]ns.NetNS)
	for _, d := range r.Dirs {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	r.Dirs = nil
	r.saveLocked()
	if r.file != "" && len(errs) == 0 {
		os.Remove(r.file)
	}
	return errors.Join(errs...)
}

// killAndWait sends SIGKILL to pid and waits briefly until it is gone. Only processes this
// run started are ever recorded, so the pid is ours (or already reaped and unused: a pid is
// not reused within the milliseconds between our wait and this kill).
func killAndWait(pid int) {
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return
	}
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// removeNetnsPath unmounts a namespace's bind mount and removes the file, as UnmountNS does
// for a path that no open handle names.
func removeNetnsPath(p string) error {
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", p, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", p, err)
	}
	return nil
}

// NewBPFRoot makes a fresh directory on bpffs named after prefix and records it.
func (r *Registry) NewBPFRoot(prefix string) (string, error) {
	dir, err := os.MkdirTemp("/sys/fs/bpf", prefix+"-")
	if err != nil {
		return "", fmt.Errorf("bpffs at /sys/fs/bpf: %w", err)
	}
	r.TrackBPFRoot(dir)
	return dir, nil
}

// NewDir makes a scratch directory under base and records it.
func (r *Registry) NewDir(base, prefix string) (string, error) {
	if err := os.MkdirAll(base, 0o700); err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp(base, prefix+"-")
	if err != nil {
		return "", err
	}
	r.TrackDir(dir)
	return filepath.Clean(dir), nil
}
