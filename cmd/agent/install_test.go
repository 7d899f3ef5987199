package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/cni/libcni"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/cni"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// runAgent runs vnetbpf-agent with args in-process and returns what it printed.
func runAgent(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := rootCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

// node is a fake node's CNI directories and a CNI binary to install.
type node struct {
	bin, conf, source string
}

const testSocket = "/run/vnetbpf/agent.sock"

func newNode(t *testing.T) node {
	t.Helper()
	tmp := t.TempDir()
	n := node{bin: filepath.Join(tmp, "opt/cni/bin"), conf: filepath.Join(tmp, "etc/cni/net.d"), source: filepath.Join(tmp, "image/vnetbpf")}
	if err := os.MkdirAll(filepath.Dir(n.source), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.source, []byte("\x7fELF the vnetbpf plugin, version 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return n
}

func (n node) install(t *testing.T, extra ...string) (string, error) {
	t.Helper()
	args := []string{"install-cni", "--cni-bin-dir", n.bin, "--cni-conf-dir", n.conf, "--source-binary", n.source, "--socket", testSocket}
	return runAgent(t, append(args, extra...)...)
}

func (n node) mustInstall(t *testing.T, extra ...string) string {
	t.Helper()
	out, err := n.install(t, extra...)
	if err != nil {
		t.Fatalf("install-cni: %v\n%s", err, out)
	}
	return out
}

func (n node) conflist() string { return filepath.Join(n.conf, defaultConflist) }

// networkConfigs is what a runtime reads from the conf directory: containerd and CRI-O list
// it with libcni.ConfFiles and these extensions.
func (n node) networkConfigs(t *testing.T) []string {
	t.Helper()
	files, err := libcni.ConfFiles(n.conf, networkConfigExts)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// readConflist parses the conflist as libcni does and returns its plugins' raw JSON too.
func (n node) readConflist(t *testing.T) (*libcni.NetworkConfigList, []map[string]any) {
	t.Helper()
	list, err := libcni.ConfListFromFile(n.conflist())
	if err != nil {
		t.Fatalf("libcni cannot read %s: %v", n.conflist(), err)
	}
	var plugins []map[string]any
	for _, p := range list.Plugins {
		var m map[string]any
		if err := json.Unmarshal(p.Bytes, &m); err != nil {
			t.Fatal(err)
		}
		plugins = append(plugins, m)
	}
	return list, plugins
}

func tempFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var tmps []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tempPrefix) {
			tmps = append(tmps, e.Name())
		}
	}
	return tmps
}

func TestInstallCNI(t *testing.T) {
	n := newNode(t)
	out := n.mustInstall(t)

	src, _ := os.ReadFile(n.source)
	dst := filepath.Join(n.bin, "vnetbpf")
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, src) {
		t.Fatalf("%s = %q, %v; want a copy of %s", dst, got, err, n.source)
	}
	if st, _ := os.Stat(dst); st.Mode().Perm() != 0o755 {
		t.Errorf("%s has mode %v, want 0755", dst, st.Mode())
	}
	if st, _ := os.Stat(n.conflist()); st.Mode().Perm() != 0o644 {
		t.Errorf("%s has mode %v, want 0644", n.conflist(), st.Mode())
	}

	list, plugins := n.readConflist(t)
	if list.Name != "vnetbpf" || list.CNIVersion != "1.0.0" {
		t.Errorf("conflist name %q, version %q; want vnetbpf, 1.0.0 (what containerd 1.6 reads)", list.Name, list.CNIVersion)
	}
	if len(plugins) != 1 {
		t.Fatalf("plugins = %v; want only vnetbpf (no portmap in the bin dir)", plugins)
	}
	want := map[string]any{"type": cni.Type, "agentSocket": testSocket}
	if !jsonEqual(plugins[0], want) {
		t.Errorf("plugin = %v, want %v", plugins[0], want)
	}
	if files := n.networkConfigs(t); len(files) != 1 || files[0] != n.conflist() {
		t.Errorf("the runtime would read %v, want only %s", files, n.conflist())
	}
	for _, s := range []string{"installed " + dst, "wrote " + n.conflist(), "portmap: not chained"} {
		if !strings.Contains(out, s) {
			t.Errorf("output does not say %q:\n%s", s, out)
		}
	}
}

func jsonEqual(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

func TestInstallCNIIsIdempotent(t *testing.T) {
	n := newNode(t)
	n.mustInstall(t, "--mtu", "1400")
	dst := filepath.Join(n.bin, "vnetbpf")
	old := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, p := range []string{dst, n.conflist()} {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	conf, _ := os.ReadFile(n.conflist())

	out := n.mustInstall(t, "--mtu", "1400")
	for _, p := range []string{dst, n.conflist()} {
		if st, _ := os.Stat(p); !st.ModTime().Equal(old) {
			t.Errorf("%s was rewritten (mtime %v) although nothing changed", p, st.ModTime())
		}
	}
	if again, _ := os.ReadFile(n.conflist()); !bytes.Equal(again, conf) {
		t.Errorf("conflist changed:\n%s\nwas:\n%s", again, conf)
	}
	if strings.Count(out, "is up to date") != 2 {
		t.Errorf("second run should say both files are up to date:\n%s", out)
	}
	for _, dir := range []string{n.bin, n.conf} {
		if tmps := tempFiles(t, dir); len(tmps) > 0 {
			t.Errorf("temporary files left in %s: %v", dir, tmps)
		}
	}
}

func TestInstallCNIRewritesWhatChanged(t *testing.T) {
	n := newNode(t)
	n.mustInstall(t)

	out := n.mustInstall(t, "--mtu", "1400")
	if _, plugins := n.readConflist(t); plugins[0]["mtu"] != float64(1400) {
		t.Errorf("after --mtu 1400 the plugin is %v", plugins[0])
	}
	if !strings.Contains(out, "wrote "+n.conflist()) || !strings.Contains(out, "vnetbpf is up to date") {
		t.Errorf("want the conflist rewritten and the binary kept:\n%s", out)
	}

	// A new image brings a new binary.
	if err := os.WriteFile(n.source, []byte("\x7fELF the vnetbpf plugin, version 2\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out = n.mustInstall(t, "--mtu", "1400")
	if got, _ := os.ReadFile(filepath.Join(n.bin, "vnetbpf")); !strings.Contains(string(got), "version 2") {
		t.Errorf("binary not replaced: %q\n%s", got, out)
	}
}

func TestInstallCNIChainsPortmap(t *testing.T) {
	for _, tc := range []struct {
		name    string
		portmap os.FileMode // 0: no portmap binary in the bin dir
		flag    string
		chained bool
	}{
		{"auto without portmap", 0, "auto", false},
		{"auto with portmap", 0o755, "auto", true},
		{"auto with a portmap that is not executable", 0o644, "auto", false},
		{"always", 0, "always", true},
		{"never", 0o755, "never", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			if tc.portmap != 0 {
				if err := os.MkdirAll(n.bin, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(n.bin, "portmap"), []byte("portmap"), tc.portmap); err != nil {
					t.Fatal(err)
				}
			}
			n.mustInstall(t, "--chain-portmap", tc.flag)
			_, plugins := n.readConflist(t)
			if !tc.chained {
				if len(plugins) != 1 {
					t.Errorf("plugins = %v, want vnetbpf alone", plugins)
				}
				return
			}
			want := map[string]any{"type": "portmap", "capabilities": map[string]any{"portMappings": true}, "backend": "nftables"}
			if len(plugins) != 2 || plugins[0]["type"] != cni.Type || !jsonEqual(plugins[1], want) {
				t.Errorf("plugins = %v, want vnetbpf then %v", plugins, want)
			}
		})
	}
}

func TestInstallCNIWarnsAboutAnEarlierConfig(t *testing.T) {
	n := newNode(t)
	if err := os.MkdirAll(n.conf, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(n.conf, "05-kubenet.conflist"), []byte(`{}`), 0o644); err != nil {
		t.Fatal(err)
	}
	out := n.mustInstall(t)
	if !strings.Contains(out, "warning: 05-kubenet.conflist sorts before "+defaultConflist) {
		t.Errorf("no warning about the configuration the runtime would take instead:\n%s", out)
	}
}

func TestInstallCNIRejectsBadFlags(t *testing.T) {
	n := newNode(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--chain-portmap", "sometimes"}, "want auto, always or never"},
		{[]string{"--mtu", "40"}, "want 68..65535"},
		{[]string{"--socket", "agent.sock"}, "must be an absolute path"},
		{[]string{"--conflist-name", "10-vnetbpf.conf"}, "must end in .conflist"},
		{[]string{"--conflist-name", "../10-vnetbpf.conflist"}, "plain file name"},
		{[]string{"--source-binary", filepath.Join(t.TempDir(), "missing")}, "pass --source-binary"},
	} {
		out, err := n.install(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("install-cni %v: err %v, want one saying %q\n%s", tc.args, err, tc.want, out)
		}
	}
	if _, err := os.Stat(n.conf); err == nil {
		if files := n.networkConfigs(t); len(files) > 0 {
			t.Errorf("refused installs wrote %v", files)
		}
	}
}

// A rename that fails half way (here: a directory is in the way) leaves nothing a runtime
// would read, and no temporary file.
func TestInstallCNIFailedRenameLeavesNoConfig(t *testing.T) {
	n := newNode(t)
	if err := os.MkdirAll(filepath.Join(n.conflist(), "in-the-way"), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := n.install(t)
	if err == nil {
		t.Fatalf("install-cni succeeded with a directory where the conflist goes:\n%s", out)
	}
	if files := n.networkConfigs(t); len(files) != 0 {
		t.Errorf("a runtime would read %v after the failed install", files)
	}
	if tmps := tempFiles(t, n.conf); len(tmps) != 0 {
		t.Errorf("temporary files left in %s: %v", n.conf, tmps)
	}

	// The binary goes first, so when it cannot be installed no configuration points at it.
	m := newNode(t)
	if err := os.MkdirAll(filepath.Join(m.bin, "vnetbpf", "in-the-way"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := m.install(t); err == nil {
		t.Fatalf("install-cni succeeded with a directory where the binary goes:\n%s", out)
	}
	if files := m.networkConfigs(t); len(files) != 0 {
		t.Errorf("a configuration was written although its plugin could not be installed: %v", files)
	}
	if tmps := tempFiles(t, m.bin); len(tmps) != 0 {
		t.Errorf("temporary files left in %s: %v", m.bin, tmps)
	}
}

const killEnv = "VNETBPF_TEST_INSTALL_KILLED"

// TestInstallCNIKilledHelper is the install that TestInstallCNIKilled kills with SIGKILL
// between writing the new conflist and renaming it into place. It does nothing unless run
// as that helper process.
func TestInstallCNIKilledHelper(t *testing.T) {
	spec := os.Getenv(killEnv)
	if spec == "" {
		return
	}
	var args []string
	if err := json.Unmarshal([]byte(spec), &args); err != nil {
		t.Fatal(err)
	}
	ready, conf := args[0], args[1]
	beforeRename = func(tmp string) error {
		if filepath.Dir(tmp) == conf {
			os.WriteFile(ready, []byte(tmp), 0o644)
			select {} // wait for the kill
		}
		return nil
	}
	runAgent(t, args[2:]...)
	t.Fatal("the helper was not stopped before the rename")
}

func TestInstallCNIKilled(t *testing.T) {
	n := newNode(t)
	n.mustInstall(t)
	before, _ := os.ReadFile(n.conflist())

	ready := filepath.Join(t.TempDir(), "ready")
	args := []string{ready, n.conf, "install-cni", "--cni-bin-dir", n.bin, "--cni-conf-dir", n.conf,
		"--source-binary", n.source, "--socket", testSocket, "--mtu", "1400"}
	spec, _ := json.Marshal(args)
	helper := exec.Command(os.Args[0], "-test.run=^TestInstallCNIKilledHelper$", "-test.count=1")
	helper.Env = append(os.Environ(), killEnv+"="+string(spec))
	var stderr bytes.Buffer
	helper.Stdout, helper.Stderr = &stderr, &stderr
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	testutils.Eventually(t, 30*time.Second, "the install to write its temporary conflist", func() error {
		_, err := os.Stat(ready)
		return err
	})
	if err := helper.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	helper.Wait()

	tmp, _ := os.ReadFile(ready)
	if _, err := os.Stat(string(tmp)); err != nil {
		t.Fatalf("the killed install should have left its temporary file %s: %v\n%s", tmp, err, stderr.String())
	}
	if files := n.networkConfigs(t); len(files) != 1 || files[0] != n.conflist() {
		t.Errorf("after the kill a runtime would read %v, want only %s", files, n.conflist())
	}
	if after, _ := os.ReadFile(n.conflist()); !bytes.Equal(after, before) {
		t.Errorf("the conflist changed although the install was killed before the rename:\n%s", after)
	}

	// The next install finishes the job and removes the leftover.
	n.mustInstall(t, "--mtu", "1400")
	if tmps := tempFiles(t, n.conf); len(tmps) != 0 {
		t.Errorf("leftover temporary files not removed: %v", tmps)
	}
	if _, plugins := n.readConflist(t); plugins[0]["mtu"] != float64(1400) {
		t.Errorf("conflist not updated after the kill: %v", plugins[0])
	}
}

// fakeAgent answers GET /v1/status on a Unix socket, as a running agent does.
func fakeAgent(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"ready":true}`))
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestUninstallRefusesWhileAnAgentRuns(t *testing.T) {
	n := newNode(t)
	n.mustInstall(t)
	sock := fakeAgent(t)
	out, err := runAgent(t, "uninstall", "--socket", sock, "--bpf-root", filepath.Join(t.TempDir(), "pins"),
		"--cni-bin-dir", n.bin, "--cni-conf-dir", n.conf)
	if err == nil || !strings.Contains(err.Error(), "delete the DaemonSet first") {
		t.Fatalf("uninstall with an agent running: err %v\n%s", err, out)
	}
	if files := n.networkConfigs(t); len(files) != 1 {
		t.Errorf("the refused uninstall removed the configuration: %v", files)
	}
}

// TestUninstall removes a real pinned datapath, attached with TCX and with clsact, inside a
// network namespace of its own.
func TestUninstall(t *testing.T) {
	root := testutils.BPFRoot(t)
	netns := testutils.NewNS(t)
	n := newNode(t)
	n.mustInstall(t)

	ifindex := map[string]int{}
	testutils.Do(t, netns, func() error {
		for _, name := range []string{"eth0", "vnbtcx0", "vnbtc0"} {
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "p" + name}
			if err := netlink.LinkAdd(veth); err != nil {
				return err
			}
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			ifindex[name] = l.Attrs().Index
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		tcx, err := loader.Load(loader.Options{Root: root, Mode: loader.ModeTCX})
		if err != nil {
			return err
		}
		defer tcx.Close()
		if err := tcx.Attach("eth0", loader.FromVNet); err != nil {
			return err
		}
		if err := tcx.Attach("vnbtcx0", loader.FromContainer); err != nil {
			return err
		}
		tc, err := loader.Load(loader.Options{Root: root, Mode: loader.ModeTC})
		if err != nil {
			return err
		}
		defer tc.Close()
		return tc.Attach("vnbtc0", loader.FromContainer)
	})

	// What the datapath looks like from the namespace: programs on TCX, filters on clsact.
	attached := func() (tcx map[string]int, filters int) {
		tcx = map[string]int{}
		testutils.Do(t, netns, func() error {
			for _, name := range []string{"eth0", "vnbtcx0"} {
				res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex[name], Attach: ebpf.AttachTCXIngress})
				if err != nil {
					return err
				}
				tcx[name] = len(res.Programs)
			}
			l, err := netlink.LinkByName("vnbtc0")
			if err != nil {
				return err
			}
			fs, err := netlink.FilterList(l, netlink.HANDLE_MIN_INGRESS)
			if err != nil {
				return err
			}
			for _, f := range fs {
				if _, ok := f.(*netlink.BpfFilter); ok {
					filters++
				}
			}
			return nil
		})
		return tcx, filters
	}
	if tcx, filters := attached(); tcx["eth0"] != 1 || tcx["vnbtcx0"] != 1 || filters != 1 {
		t.Fatalf("before uninstall: TCX programs %v, clsact filters %d; want one each", tcx, filters)
	}

	uninstall := func() string {
		var out string
		testutils.Do(t, netns, func() error {
			var err error
			out, err = runAgent(t, "uninstall", "--socket", filepath.Join(t.TempDir(), "none.sock"), "--bpf-root", root,
				"--cni-bin-dir", n.bin, "--cni-conf-dir", n.conf, "--nic", "eth0")
			if err != nil {
				t.Errorf("uninstall: %v\n%s", err, out)
			}
			return nil
		})
		return out
	}
	out := uninstall()
	t.Logf("uninstall:\n%s", out)

	if tcx, filters := attached(); tcx["eth0"] != 0 || tcx["vnbtcx0"] != 0 || filters != 0 {
		t.Errorf("after uninstall: TCX programs %v, clsact filters %d; want none", tcx, filters)
	}
	if _, err := os.Stat(root); !os.IsNotExist(err) {
		ents, _ := os.ReadDir(root)
		t.Errorf("pins remain under %s: %v (%v)", root, ents, err)
	}
	if files := n.networkConfigs(t); len(files) != 0 {
		t.Errorf("network configurations remain: %v", files)
	}
	if _, err := os.Stat(filepath.Join(n.bin, "vnetbpf")); !os.IsNotExist(err) {
		t.Errorf("the CNI binary remains: %v", err)
	}
	for _, s := range []string{"lose connectivity", "detached the pinned link from vnbtcx0", "removed pinned maps and links"} {
		if !strings.Contains(out, s) {
			t.Errorf("output does not say %q", s)
		}
	}

	again := uninstall()
	if !strings.Contains(again, "already gone") {
		t.Errorf("second uninstall should find nothing to remove:\n%s", again)
	}
}
