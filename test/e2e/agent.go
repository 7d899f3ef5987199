package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"sigs.k8s.io/yaml"

	"github.com/vnetbpf/vnetbpf/pkg/agent"
	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// RepoRoot is the module's top directory, found from this file's location.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// builtDir is where Binaries built, for removal when the process is done with it.
var builtDir string

var buildOnce = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "vnetbpf-bin-")
	if err != nil {
		return "", err
	}
	builtDir = dir
	for out, pkg := range map[string]string{"vnetbpf-agent": "./cmd/agent", "vnetbpf": "./cmd/cni"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, out), pkg)
		cmd.Dir = RepoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
		}
	}
	return dir, nil
})

// Binaries builds bin/vnetbpf-agent and bin/vnetbpf (the CNI plugin) once per process and
// returns the directory holding them, which also serves as a CNI bin dir.
func Binaries() (string, error) { return buildOnce() }

// Agent is a real vnetbpf-agent process running in a node's network namespace.
type Agent struct {
	Node   *Node
	Config agent.Config
	Dir    string // config, log, state and socket live here
	Log    string
	bin    string
	cmd    *exec.Cmd
	exited chan struct{}
}

// NewAgentConfig is a configuration for an agent of node keeping everything under dir and
// under a bpffs root of its own, so that several agents share one machine.
func NewAgentConfig(node *Node, dir string, pool []string) agent.Config {
	cfg := agent.DefaultConfig()
	cfg.NIC = node.NIC
	// t.TempDir names repeat across tests ("001"), and test binaries may run side by side:
	// every agent gets a root of its own.
	suffix := make([]byte, 6)
	rand.Read(suffix)
	cfg.BPFRoot = filepath.Join("/sys/fs/bpf", "vnetbpf-e2e-"+hex.EncodeToString(suffix))
	cfg.Socket = filepath.Join(dir, "agent.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.MetricsAddr = "" // each node's loopback is its own, but tests read the API instead
	cfg.LogFormat = "text"
	cfg.LogLevel = "debug"
	cfg.VNetCIDRs = []string{node.fabric.Prefix.String()}
	cfg.IPAM.Static.Addresses = pool
	return cfg
}

// StartAgent writes cfg to dir and starts the agent in node's namespace; it returns once the
// agent reports ready.
func StartAgent(node *Node, dir string, cfg agent.Config) (*Agent, error) {
	bin, err := Binaries()
	if err != nil {
		return nil, err
	}
	a := &Agent{Node: node, Config: cfg, Dir: dir, Log: filepath.Join(dir, "agent.log"), bin: filepath.Join(bin, "vnetbpf-agent")}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "agent.yaml"), b, 0o600); err != nil {
		return nil, err
	}
	return a, a.Start()
}

// Start starts the agent process (again) and waits until it is ready.
func (a *Agent) Start() error {
	logf, err := os.OpenFile(a.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	a.cmd = exec.Command("nsenter", "--net="+a.Node.NS.Path(), "--", a.bin, "run", "--config", filepath.Join(a.Dir, "agent.yaml"))
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	if err := a.cmd.Start(); err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	a.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		cmd.Wait()
		close(exited)
	}(a.cmd, a.exited)
	return a.WaitReady(20 * time.Second)
}

// PID is the agent process's ID (nsenter execs the agent, so it is the agent's own).
func (a *Agent) PID() int {
	if a.cmd == nil || a.cmd.Process == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// Client talks to the agent's socket.
func (a *Agent) Client() *api.Client { return api.NewClient(a.Config.Socket, 5*time.Second) }

// WaitReady polls the agent's status until it is ready, it exits, or timeout passes.
func (a *Agent) WaitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-a.exited:
			return fmt.Errorf("agent exited during start; its log:\n%s", a.Tail(30))
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		s, err := a.Client().Status(ctx)
		cancel()
		if err == nil && s.Ready {
			return nil
		}
		last = err
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("agent not ready after %s (%v); its log:\n%s", timeout, last, a.Tail(30))
}

// Kill ends the agent with SIGKILL, as a crash would.
func (a *Agent) Kill() error { return a.signal(syscall.SIGKILL) }

// Stop ends the agent with SIGTERM, as kubelet does.
func (a *Agent) Stop() error { return a.signal(syscall.SIGTERM) }

func (a *Agent) signal(sig syscall.Signal) error {
	if a.cmd == nil || a.cmd.Process == nil {
		return nil
	}
	select {
	case <-a.exited:
		return nil
	default:
	}
	if err := a.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	select {
	case <-a.exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("agent did not exit within 10s of %s", sig)
	}
}

// Tail returns the last n lines of the agent's log.
func (a *Agent) Tail(n int) string {
	b, _ := os.ReadFile(a.Log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Cleanup stops the agent and removes its pins.
func (a *Agent) Cleanup() {
	a.Stop()
	os.RemoveAll(a.Config.BPFRoot)
}

// CNI runs CNI plugins through libcni, the library container runtimes use, from inside a
// node's network namespace (a child process inherits the namespace of the thread that forks
// it, and ns.Do locks that thread).
type CNI struct {
	Node *Node
	Conf *libcni.CNIConfig
	List *libcni.NetworkConfigList
}

// NewCNI loads conflist and runs plugins from binDirs with results cached under cacheDir.
func NewCNI(node *Node, conflist []byte, cacheDir string, binDirs ...string) (*CNI, error) {
	list, err := libcni.NetworkConfFromBytes(conflist)
	if err != nil {
		list, err = libcni.ConfListFromBytes(conflist)
	}
	if err != nil {
		return nil, err
	}
	return &CNI{Node: node, List: list, Conf: libcni.NewCNIConfigWithCacheDir(binDirs, cacheDir, nil)}, nil
}

// Runtime is what a runtime passes about one attachment.
func Runtime(containerID, netns, ifname string, podNS, podName string) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: containerID, NetNS: netns, IfName: ifname}
	if podName != "" {
		rt.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", podNS}, {"K8S_POD_NAME", podName}}
	}
	return rt
}

// Add runs ADD.
func (c *CNI) Add(ctx context.Context, rt *libcni.RuntimeConf) (types.Result, error) {
	var res types.Result
	err := c.Node.NS.Do(func(ns.NetNS) error {
		var err error
		res, err = c.Conf.AddNetworkList(ctx, c.List, rt)
		return err
	})
	return res, err
}

// Del runs DEL.
func (c *CNI) Del(ctx context.Context, rt *libcni.RuntimeConf) error {
	return c.Node.NS.Do(func(ns.NetNS) error { return c.Conf.DelNetworkList(ctx, c.List, rt) })
}

// Check runs CHECK.
func (c *CNI) Check(ctx context.Context, rt *libcni.RuntimeConf) error {
	return c.Node.NS.Do(func(ns.NetNS) error { return c.Conf.CheckNetworkList(ctx, c.List, rt) })
}

// Status runs STATUS.
func (c *CNI) Status(ctx context.Context) error {
	return c.Node.NS.Do(func(ns.NetNS) error { return c.Conf.GetStatusNetworkList(ctx, c.List) })
}

// GC runs GC with the attachments still valid.
func (c *CNI) GC(ctx context.Context, valid []types.GCAttachment) error {
	return c.Node.NS.Do(func(ns.NetNS) error {
		return c.Conf.GCNetworkList(ctx, c.List, &libcni.GCArgs{ValidAttachments: valid})
	})
}
