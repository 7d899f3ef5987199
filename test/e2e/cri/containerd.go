// Package cri runs the path kubelet uses to give a pod its network, without a cluster: the
// CRI calls kubelet makes, sent with crictl to a real containerd, whose CRI plugin runs the
// vnetbpf CNI plugin through libcni inside a simulated node of package e2e.
package cri

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"text/template"
	"time"

	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// Containerd is a containerd process running in a node's network namespace with a root,
// state and socket of its own under Dir, so that it shares nothing with a containerd the
// machine may run. Its CRI plugin runs the CNI plugin from containerd's own process, so the
// pods' host-side veths land in the node, as on a real one; the shims (one per pod) start
// in that namespace too.
type Containerd struct {
	Node       *e2e.Node
	Dir        string
	Config     string // config.toml
	Root       string // persistent state: content, snapshots (overlay mounts), metadata
	State      string // runtime state: bundles, sandbox shm mounts, pod netns mounts
	Socket     string // the gRPC socket, which serves CRI too
	Log        string
	CNIBinDir  string
	CNIConfDir string
	cmd        *exec.Cmd
	exited     chan struct{}
}

// ContainerdOptions are what the test chooses about a containerd.
type ContainerdOptions struct {
	SandboxImage string // the pause image, already imported or imported before the first pod
	CNIBinDir    string // must hold every plugin of the conflist and loopback, which CRI adds itself
	CNIConfDir   string // must hold the conflist before containerd starts: 1.6 ignores later ones
}

// configTemplate is a version 2 config. What is not the default, and why:
//   - restrict_oom_score_adj: the machine refuses a negative oom_score_adj (no
//     CAP_SYS_RESOURCE), which runc would otherwise be asked to set for the sandbox.
//   - disable_apparmor: there is no AppArmor profile to load here.
//   - SystemdCgroup = false: there is no systemd; runc manages cgroupfs directly.
//   - runc Root and netns_mounts_under_state_dir: runc's state and the pods' namespace
//     mounts live under State rather than /run, where a crashed test would strand them
//     among other tests' namespaces.
//   - disabled_plugins: snapshotters that cannot work here and would log errors, and opt,
//     which would write to /opt/containerd. (The v1 runtime must stay: 1.6's tasks service,
//     which CRI needs, refuses to load without it.)
var configTemplate = template.Must(template.New("config").Parse(`version = 2
root = "{{.Root}}"
state = "{{.State}}"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{{.Socket}}"

[ttrpc]
  address = "{{.Socket}}.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{{.SandboxImage}}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{{.State}}/runc"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{{.CNIBinDir}}"
    conf_dir = "{{.CNIConfDir}}"
    max_conf_num = 1
`))

// NewContainerd writes the configuration of a containerd for node that keeps everything
// under dir. It does not start it.
func NewContainerd(node *e2e.Node, dir string, opts ContainerdOptions) (*Containerd, error) {
	c := &Containerd{
		Node: node, Dir: dir,
		Config:    filepath.Join(dir, "config.toml"),
		Root:      filepath.Join(dir, "root"),
		State:     filepath.Join(dir, "state"),
		Socket:    filepath.Join(dir, "containerd.sock"),
		Log:       filepath.Join(dir, "containerd.log"),
		CNIBinDir: opts.CNIBinDir, CNIConfDir: opts.CNIConfDir,
	}
	// A unix socket path has room for 107 bytes; containerd would fail with a terse error.
	if len(c.Socket)+len(".ttrpc") > 107 {
		return nil, fmt.Errorf("socket path %s is too long for a unix socket", c.Socket)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.Create(c.Config)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data := struct {
		ContainerdOptions
		Root, State, Socket string
	}{opts, c.Root, c.State, c.Socket}
	if err := configTemplate.Execute(f, data); err != nil {
		return nil, fmt.Errorf("write %s: %w", c.Config, err)
	}
	return c, f.Close()
}

// Start starts containerd in the node's network namespace. It returns once the socket
// accepts connections; callers wait for the CRI plugin's own readiness through crictl.
func (c *Containerd) Start() error {
	logf, err := os.OpenFile(c.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	// nsenter execs containerd, so cmd's PID is containerd's own.
	c.cmd = exec.Command("nsenter", "--net="+c.Node.NS.Path(), "--", "containerd", "--config", c.Config)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("start containerd: %w", err)
	}
	c.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		cmd.Wait()
		close(exited)
	}(c.cmd, c.exited)

	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-c.exited:
			return fmt.Errorf("containerd exited during start; its log:\n%s", c.Tail(30))
		default:
		}
		conn, err := dialUnix(c.Socket)
		if err == nil {
			conn.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd socket %s not accepting after 20s (%v); its log:\n%s", c.Socket, err, c.Tail(30))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// PID is containerd's process ID, 0 when it is not running.
func (c *Containerd) PID() int {
	if c.cmd == nil || c.cmd.Process == nil || !c.Running() {
		return 0
	}
	return c.cmd.Process.Pid
}

// Running reports whether the process started last is still running.
func (c *Containerd) Running() bool {
	if c.exited == nil {
		return false
	}
	select {
	case <-c.exited:
		return false
	default:
		return true
	}
}

// Kill ends containerd with SIGKILL, as a crash or an OOM kill would; the shims, and so the
// pods, live on.
func (c *Containerd) Kill() error { return c.signal(syscall.SIGKILL, 10*time.Second) }

// Stop ends containerd with SIGTERM, and SIGKILL if it is still there after 10 s.
func (c *Containerd) Stop() error {
	if err := c.signal(syscall.SIGTERM, 10*time.Second); err != nil {
		return errors.Join(err, c.Kill())
	}
	return nil
}

func (c *Containerd) signal(sig syscall.Signal, wait time.Duration) error {
	if !c.Running() {
		return nil
	}
	if err := c.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	select {
	case <-c.exited:
		return nil
	case <-time.After(wait):
		return fmt.Errorf("containerd did not exit within %s of %s", wait, sig)
	}
}

// Tail returns the last n lines of containerd's log.
func (c *Containerd) Tail(n int) string { return tail(c.Log, n) }

// Shims returns the PIDs of the shims this containerd started: they name its socket in
// their command line (`containerd-shim-runc-v2 -namespace k8s.io -id ID -address SOCKET`).
func (c *Containerd) Shims() []int { return processesNaming("-address " + c.Socket + " ") }

// shimSocket is where containerd 1.6 puts the socket of the shim for id: not under State
// but under /run/containerd/s, named by a hash (runtime/v2/shim.SocketAddress). A shim
// removes it when it exits, but not when it is killed.
func shimSocket(address, namespace, id string) string {
	sum := sha256.Sum256([]byte(filepath.Join(address, namespace, id)))
	return filepath.Join("/run/containerd/s", hex.EncodeToString(sum[:]))
}

// Cleanup stops containerd and ends what it left: its shims, the pods' processes and the
// mounts under Dir (overlay rootfs, sandbox shm, namespace mounts). Removing the pods
// through CRI first does all this in order; Cleanup is for what a failed test leaves.
func (c *Containerd) Cleanup() error {
	var errs []error
	if err := c.Stop(); err != nil {
		errs = append(errs, err)
	}
	var sockets []string
	for _, pid := range c.Shims() {
		args := cmdline(pid)
		if i := slices.Index(args, "-id"); i >= 0 && i+1 < len(args) {
			sockets = append(sockets, shimSocket(c.Socket, flagValue(args, "-namespace"), args[i+1]))
		}
		// The pod's processes are the shim's children; they do not die with it.
		for _, child := range children(pid) {
			syscall.Kill(child, syscall.SIGKILL)
		}
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if err := waitGone(c.Shims, 10*time.Second); err != nil {
		errs = append(errs, err)
	}
	for _, s := range sockets {
		os.Remove(s)
	}
	if err := unmountUnder(c.Dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func cmdline(pid int) []string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

func flagValue(args []string, name string) string {
	if i := slices.Index(args, name); i >= 0 && i+1 < len(args) {
		return args[i+1]
	}
	return ""
}

// unmountUnder detaches every mount at or below dir, deepest first.
func unmountUnder(dir string) error {
	points, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	var errs []error
	for _, p := range points {
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// mountsUnder lists the mount points at or below dir in this process's mount namespace.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		p := unescapeMountPoint(fields[4])
		if p == dir || strings.HasPrefix(p, dir+"/") {
			points = append(points, p)
		}
	}
	return points, sc.Err()
}

// unescapeMountPoint undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPoint(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// processesNaming returns the PIDs of processes whose command line contains s.
func processesNaming(s string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if strings.Contains(strings.ReplaceAll(string(b), "\x00", " ")+" ", s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// children returns the PIDs whose parent is pid.
func children(pid int) []int {
	entries, _ := os.ReadDir("/proc")
	var kids []int
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// The command name, in parentheses, may hold spaces: the fields after it are fixed.
		s := string(b)
		rest := s[strings.LastIndexByte(s, ')')+1:]
		var state string
		var ppid, self int
		if _, err := fmt.Sscanf(rest, " %s %d", &state, &ppid); err != nil || ppid != pid {
			continue
		}
		if _, err := fmt.Sscanf(e.Name(), "%d", &self); err == nil {
			kids = append(kids, self)
		}
	}
	return kids
}

func waitGone(list func() []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		left := list()
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v still running after %s", left, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func dialUnix(path string) (net.Conn, error) { return net.DialTimeout("unix", path, time.Second) }
