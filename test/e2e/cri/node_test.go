package cri

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// Node is a simulated VM as kubelet would find it: a node of the fabric running the vnetbpf
// agent on a static pool and containerd with vnetbpf as its CNI network.
type Node struct {
	Fabric       *e2e.Fabric
	Node         *e2e.Node
	Agent        *e2e.Agent
	Containerd   *Containerd
	Crictl       *Crictl
	Pool         []netip.Addr
	Dir          string
	CNILog       string
	CgroupParent string // every pod's cgroups are under it

	mu   sync.Mutex
	held []ns.NetNS // pods' namespaces the test opened, closed at teardown
}

// holdNetns keeps n open until the node is torn down.
func (n *Node) holdNetns(netns ns.NetNS) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.held = append(n.held, netns)
}

// NodeOptions choose the pool and the conflist's CNI version.
type NodeOptions struct {
	Pool       []netip.Addr // the static pool, inside 10.0.0.0/16
	CNIVersion string       // of the conflist containerd loads
}

// StartNode builds the fabric, the node, its agent and its containerd, imports the pause
// image and waits until CRI reports the runtime and the network ready. Everything is undone
// in t.Cleanup, and the cleanup fails t if it finds a process, mount or namespace left.
func StartNode(t *testing.T, opts NodeOptions) *Node {
	t.Helper()
	// TempDir first: its removal then runs after every other cleanup, and fails the test if
	// a mount is still under it.
	n := &Node{Dir: t.TempDir(), Pool: opts.Pool}
	suffix := make([]byte, 4)
	rand.Read(suffix)
	n.CgroupParent = "/vnetbpf-e2e-cri-" + hex.EncodeToString(suffix)
	t.Cleanup(func() { n.checkNothingLeft(t) })

	// The builds are independent, and go build spends much of its time linking: run them
	// side by side.
	var (
		wg                  sync.WaitGroup
		tools               e2e.Tools
		crictl, bin, image  string
		toolsErr, crictlErr error
		binErr, imageErr    error
	)
	wg.Add(4)
	go func() { defer wg.Done(); tools, toolsErr = e2e.UpstreamTools() }() // loopback, which CRI runs itself
	go func() { defer wg.Done(); crictl, crictlErr = CrictlBinary() }()
	go func() { defer wg.Done(); bin, binErr = e2e.Binaries() }()
	go func() { defer wg.Done(); image, imageErr = BuildPauseImage(n.Dir, PauseImage) }()
	wg.Wait()
	if err := errors.Join(toolsErr, crictlErr, binErr, imageErr); err != nil {
		t.Fatal(err)
	}
	builtDirs = append(builtDirs, bin)

	f, err := e2e.NewFabric(netip.MustParsePrefix("10.0.0.0/16"))
	if err != nil {
		t.Fatal(err)
	}
	n.Fabric = f
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Errorf("remove the fabric's and node's namespaces: %v", err)
		}
	})
	node, err := f.AddNode("node1", mustMAC("02:00:0a:00:00:04"), netip.MustParseAddr("10.0.0.4"))
	if err != nil {
		t.Fatal(err)
	}
	n.Node = node
	// A static pool: IP configurations that already exist on the NIC, so the fabric routes
	// them to this node.
	var pool []string
	for _, ip := range n.Pool {
		if err := f.AddIPConfig(node, ip); err != nil {
			t.Fatal(err)
		}
		pool = append(pool, ip.String())
	}
	agentDir := filepath.Join(n.Dir, "agent")
	must(t, os.Mkdir(agentDir, 0o700))
	cfg := e2e.NewAgentConfig(node, agentDir, pool)
	cfg.IPAM.Cooldown.Duration = 0 // a released address may go to the next pod at once
	a, err := e2e.StartAgent(node, agentDir, cfg)
	if err != nil {
		t.Fatal(err)
	}
	n.Agent = a
	t.Cleanup(a.Cleanup)

	// The CNI bin dir holds vnetbpf and loopback: containerd 1.6 takes a single directory.
	binDir := filepath.Join(n.Dir, "cni-bin")
	confDir := filepath.Join(n.Dir, "cni-conf")
	must(t, os.Mkdir(binDir, 0o755))
	must(t, os.Mkdir(confDir, 0o755))
	must(t, os.Symlink(filepath.Join(bin, "vnetbpf"), filepath.Join(binDir, "vnetbpf")))
	must(t, os.Symlink(filepath.Join(tools.PluginsDir, "loopback"), filepath.Join(binDir, "loopback")))
	n.CNILog = filepath.Join(n.Dir, "cni.log")
	conflist := fmt.Sprintf(`{"cniVersion":%q,"name":"vnet","plugins":[{"type":"vnetbpf","agentSocket":%q,"logFile":%q,"logLevel":"debug"}]}`,
		opts.CNIVersion, a.Config.Socket, n.CNILog)
	// Written before containerd starts: 1.6 does not load a file that appears later.
	must(t, os.WriteFile(filepath.Join(confDir, "10-vnetbpf.conflist"), []byte(conflist), 0o644))

	ctrd, err := NewContainerd(node, filepath.Join(n.Dir, "containerd"), ContainerdOptions{
		SandboxImage: PauseImage, CNIBinDir: binDir, CNIConfDir: confDir,
	})
	if err != nil {
		t.Fatal(err)
	}
	n.Containerd = ctrd
	n.Crictl = &Crictl{Bin: crictl, Endpoint: "unix://" + ctrd.Socket, Slow: func(args []string, took time.Duration) {
		t.Logf("crictl %s took %s", strings.Join(args, " "), took.Round(time.Millisecond))
	}}
	t.Cleanup(func() { n.teardown(t) })
	if err := ctrd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := n.Crictl.WaitReady(20 * time.Second); err != nil {
		t.Fatalf("%v\ncontainerd log:\n%s", err, ctrd.Tail(30))
	}
	if err := n.importImage(image); err != nil {
		t.Fatal(err)
	}
	return n
}

// importImage imports the pause image's tar into the namespace the CRI plugin uses and
// checks that CRI finds it under its full reference.
func (n *Node) importImage(tar string) error {
	out, err := exec.Command("ctr", "--address", n.Containerd.Socket, "--namespace", "k8s.io",
		"images", "import", "--all-platforms", tar).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import %s: %v\n%s", tar, err, out)
	}
	if _, err := n.Crictl.Run("inspecti", PauseImage); err != nil {
		return fmt.Errorf("CRI does not see the imported pause image: %w", err)
	}
	return nil
}

// Logs are the last lines of the agent's, the plugin's and containerd's logs, for a failure
// message.
func (n *Node) Logs() string {
	return fmt.Sprintf("agent log:\n%s\nCNI plugin log:\n%s\ncontainerd log:\n%s",
		n.Agent.Tail(15), tail(n.CNILog, 15), n.Containerd.Tail(15))
}

// teardown removes every pod through CRI, as a drained node would, then stops containerd and
// ends whatever it left.
func (n *Node) teardown(t *testing.T) {
	if t.Failed() {
		t.Log(n.Logs())
	}
	for _, netns := range n.held {
		netns.Close()
	}
	c := n.Containerd
	if !c.Running() {
		if err := c.Start(); err != nil {
			t.Errorf("start containerd to remove the pods: %v", err)
		}
	}
	if c.Running() {
		if _, err := n.Crictl.Run("rmp", "--all", "--force"); err != nil {
			t.Errorf("remove every pod: %v", err)
		}
	}
	if err := c.Cleanup(); err != nil {
		t.Errorf("clean up containerd: %v", err)
	}
	for _, h := range cgroupMounts() {
		if err := removeCgroup(filepath.Join(h, n.CgroupParent)); err != nil {
			t.Errorf("remove cgroup: %v", err)
		}
	}
}

// checkNothingLeft runs after every other cleanup and fails t for each thing left behind.
func (n *Node) checkNothingLeft(t *testing.T) {
	if n.Containerd != nil {
		if pids := processesNaming(n.Dir); len(pids) > 0 {
			t.Errorf("processes %v left running from %s", pids, n.Dir)
		}
	}
	if points, err := mountsUnder(n.Dir); err != nil || len(points) > 0 {
		t.Errorf("mounts left under %s: %v %v", n.Dir, points, err)
	}
	if n.Fabric != nil {
		for _, p := range []string{n.Fabric.NS.Path(), n.Node.NS.Path()} {
			if _, err := os.Lstat(p); err == nil {
				t.Errorf("namespace %s left", p)
			}
		}
	}
	for _, h := range cgroupMounts() {
		if _, err := os.Stat(filepath.Join(h, n.CgroupParent)); err == nil {
			t.Errorf("cgroup %s left in %s", n.CgroupParent, h)
		}
	}
}

// cgroupMounts lists the cgroup hierarchies mounted (v1 and v2): runc's cgroupfs driver
// makes the pods' directories in each.
func cgroupMounts() []string {
	b, _ := os.ReadFile("/proc/self/mounts")
	var dirs []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && (f[2] == "cgroup" || f[2] == "cgroup2") {
			dirs = append(dirs, unescapeMountPoint(f[1]))
		}
	}
	return dirs
}

// removeCgroup removes the cgroup directory dir and those below it, deepest first; the
// files in them are the kernel's and go with their directory.
func removeCgroup(dir string) error {
	var subdirs []string
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			subdirs = append(subdirs, path)
		}
		return nil
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for i := len(subdirs) - 1; i >= 0; i-- {
		if err := os.Remove(subdirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// builtDirs are e2e.Binaries' output directories, removed by TestMain.
var builtDirs []string

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// pathIsGone is nil once nothing exists at path.
func pathIsGone(path string) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%s exists", path)
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
