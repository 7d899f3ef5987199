package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha512"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Versions of the upstream CNI tools the end-to-end tests run vnetbpf with.
const (
	CNIToolVersion = "v1.3.1"  // github.com/containernetworking/cni/cnitool
	PluginsVersion = "v1.10.0" // github.com/containernetworking/plugins
)

// Tools are upstream CNI binaries built by `go install`.
type Tools struct {
	CNITool    string // the cnitool binary
	PluginsDir string // a CNI bin dir holding portmap, bandwidth and loopback
}

// ToolsCacheDir is where the upstream tools are built, once per machine rather than once per
// run: they depend only on their versions, which are part of the path.
func ToolsCacheDir() string { return filepath.Join(os.TempDir(), "vnetbpf-e2e-tools") }

var toolsOnce = sync.OnceValues(func() (Tools, error) {
	base := ToolsCacheDir()
	t := Tools{
		CNITool:    filepath.Join(base, "cni-"+CNIToolVersion, "cnitool"),
		PluginsDir: filepath.Join(base, "plugins-"+PluginsVersion),
	}
	if err := GoInstall(filepath.Dir(t.CNITool), "github.com/containernetworking/cni/cnitool@"+CNIToolVersion); err != nil {
		return Tools{}, err
	}
	var pkgs []string
	for _, p := range []string{"meta/portmap", "meta/bandwidth", "main/loopback"} {
		pkgs = append(pkgs, "github.com/containernetworking/plugins/plugins/"+p+"@"+PluginsVersion)
	}
	if err := GoInstall(t.PluginsDir, pkgs...); err != nil {
		return Tools{}, err
	}
	return t, nil
})

// UpstreamTools returns cnitool and the upstream plugins, building those not yet in
// ToolsCacheDir.
func UpstreamTools() (Tools, error) { return toolsOnce() }

// GoInstall installs pkgs (path@version) into dir unless every binary is there already. It
// builds into a scratch directory and renames, so that an interrupted build never leaves a
// truncated binary that later runs would take for a good one.
func GoInstall(dir string, pkgs ...string) error {
	missing := false
	for _, p := range pkgs {
		if _, err := os.Stat(filepath.Join(dir, binaryName(p))); err != nil {
			missing = true
		}
	}
	if !missing {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	scratch, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(scratch)
	cmd := exec.Command("go", append([]string{"install"}, pkgs...)...)
	cmd.Dir = os.TempDir() // outside any module, so that path@version names what is built
	cmd.Env = append(os.Environ(), "GOBIN="+scratch, "CGO_ENABLED=0", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go install %s: %v\n%s", strings.Join(pkgs, " "), err, out)
	}
	for _, p := range pkgs {
		name := binaryName(p)
		if err := os.Rename(filepath.Join(scratch, name), filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	return nil
}

func binaryName(pkg string) string {
	pkg, _, _ = strings.Cut(pkg, "@")
	return filepath.Base(pkg)
}

// CNITool runs cnitool as an operator would, inside a node's network namespace. cnitool
// always keeps its results under /var/lib/cni; each run gets a private mount namespace in
// which CacheDir is bind-mounted over /var/lib, so that tests neither share nor leave a cache.
type CNITool struct {
	Bin        string
	Node       *Node
	NetConfDir string   // NETCONFPATH: where the network's conflist is
	Path       []string // CNI_PATH: the plugin bin dirs
	CacheDir   string   // results land in CacheDir/cni/results
}

// CNIToolContainerID is the container ID cnitool derives from a namespace path.
func CNIToolContainerID(netnsPath string) string {
	abs, err := filepath.Abs(netnsPath)
	if err != nil {
		abs = netnsPath
	}
	s := sha512.Sum512([]byte(abs))
	return fmt.Sprintf("cnitool-%x", s[:10])
}

// Run runs `cnitool args...` with the extra environment env (CNI_ARGS, CAP_ARGS) and returns
// its stdout and stderr.
func (c *CNITool) Run(ctx context.Context, env []string, args ...string) (stdout, stderr string, err error) {
	if err := os.MkdirAll(c.CacheDir, 0o700); err != nil {
		return "", "", err
	}
	script := `mount --bind "$0" /var/lib && exec "$@"`
	argv := append([]string{"--net=" + c.Node.NS.Path(), "--", "unshare", "--mount", "--propagation", "private",
		"--", "sh", "-c", script, c.CacheDir, c.Bin}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
	cmd.Env = append(os.Environ(), "NETCONFPATH="+c.NetConfDir, "CNI_PATH="+strings.Join(c.Path, string(os.PathListSeparator)))
	cmd.Env = append(cmd.Env, env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	if err != nil {
		err = fmt.Errorf("cnitool %s: %w; stderr: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), errb.String(), err
}

// AgentCLI runs the agent binary's debug subcommands against an agent's socket, as an
// operator on the node would.
type AgentCLI struct {
	Bin    string
	Socket string
}

// NewAgentCLI is the CLI for a.
func NewAgentCLI(a *Agent) *AgentCLI { return &AgentCLI{Bin: a.bin, Socket: a.Config.Socket} }

// Run runs `vnetbpf-agent --socket <socket> args...` and returns its stdout.
func (c *AgentCLI) Run(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, c.Bin, append([]string{"--socket", c.Socket}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("vnetbpf-agent %s: %w; stderr: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// Stream is a long-running subcommand, such as monitor, whose output is read line by line.
type Stream struct {
	cmd    *exec.Cmd
	lines  chan string
	stderr bytes.Buffer
	done   chan struct{}
	err    error
}

// Start starts `vnetbpf-agent --socket <socket> args...` in the background.
func (c *AgentCLI) Start(args ...string) (*Stream, error) {
	s := &Stream{lines: make(chan string, 1024), done: make(chan struct{})}
	s.cmd = exec.Command(c.Bin, append([]string{"--socket", c.Socket}, args...)...)
	s.cmd.Stderr = &syncWriter{w: &s.stderr}
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		close(s.lines)
		s.err = s.cmd.Wait()
		close(s.done)
	}()
	return s, nil
}

// Lines delivers the output, one line at a time; it is closed when the process exits.
func (s *Stream) Lines() <-chan string { return s.lines }

// Stop interrupts the process as Ctrl-C would and returns how it exited.
func (s *Stream) Stop(timeout time.Duration) error {
	if err := s.cmd.Process.Signal(syscall.SIGINT); err != nil {
		select {
		case <-s.done:
			return s.err
		default:
			return err
		}
	}
	go func() {
		for range s.lines { // drain so the reader reaches Wait
		}
	}()
	select {
	case <-s.done:
		return s.err
	case <-time.After(timeout):
		s.cmd.Process.Kill()
		<-s.done
		return fmt.Errorf("still running %s after SIGINT", timeout)
	}
}

// Stderr is what the process wrote to stderr so far.
func (s *Stream) Stderr() string {
	w := s.cmd.Stderr.(*syncWriter)
	w.mu.Lock()
	defer w.mu.Unlock()
	return s.stderr.String()
}

type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.w.Write(p)
}
