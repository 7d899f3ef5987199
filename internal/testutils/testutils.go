// Package testutils holds what the kernel-facing tests share: root checks, network namespaces
// and bpffs directories that clean up after themselves, and packet builders.
package testutils

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	cnitestutils "github.com/containernetworking/plugins/pkg/testutils"
)

// RequireRoot skips t unless it runs as root: the kernel tests need CAP_BPF and CAP_NET_ADMIN.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (BPF, network namespaces)")
	}
}

// NewNS creates a network namespace that is removed when t ends.
func NewNS(t testing.TB) ns.NetNS {
	t.Helper()
	RequireRoot(t)
	n, err := cnitestutils.NewNS()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := cnitestutils.UnmountNS(n); err != nil {
			t.Logf("remove netns %s: %v", n.Path(), err)
		}
	})
	return n
}

// Do runs fn in n on a locked thread and fails t on error.
func Do(t testing.TB, n ns.NetNS, fn func() error) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error { return fn() }); err != nil {
		t.Fatal(err)
	}
}

// BPFRoot returns a fresh directory on bpffs for pins, removed (with every pin in it) when t
// ends.
func BPFRoot(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join("/sys/fs/bpf", "vnetbpf-test-"+hex.EncodeToString(b))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatalf("bpffs at /sys/fs/bpf: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Sysctl writes a /proc/sys value. /proc/sys/net belongs to the network namespace of the
// calling thread, so call it inside ns.Do to set a namespace's value.
func Sysctl(name, value string) error {
	p := filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/"))
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// Eventually polls cond every 10 ms until it returns nil or timeout passes, then fails t
// saying what was awaited and the last error.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s: %v", timeout, what, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
