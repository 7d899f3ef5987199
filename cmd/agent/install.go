package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

const (
	// pluginType is the CNI type of the plugin and the name of its binary (pkg/cni.Type).
	pluginType = "vnetbpf"
	// networkName is the network's name in the conflist we write.
	networkName = "vnetbpf"
	// defaultConflist sorts early, so that a runtime that takes the first configuration in
	// its directory (containerd, CRI-O) takes ours.
	defaultConflist = "10-vnetbpf.conflist"
	// tempPrefix names our temporary files. It starts with a dot and has no extension:
	// runtimes read only *.conf, *.conflist and *.json, so a temporary file that a kill
	// leaves behind is never taken for a network configuration.
	tempPrefix = ".vnetbpf-install-"
)

// beforeRename runs between writing a temporary file and renaming it into place. Tests
// replace it to stop the command exactly there.
var beforeRename = func(tmp string) error { return nil }

// cniInstall is what `install-cni` does: the CNI binary into the runtime's bin directory,
// then the conflist into its configuration directory.
type cniInstall struct {
	binDir, confDir, conflist string
	socket, source            string
	mtu                       int
	cniVersion                string
	portmap                   string // auto, always or never
	out                       io.Writer
}

func installCNICmd() *cobra.Command {
	o := &cniInstall{}
	cmd := &cobra.Command{
		Use:   "install-cni",
		Short: "Install the vnetbpf CNI plugin and its network configuration on this node",
		Long: `install-cni copies the vnetbpf CNI binary into the runtime's CNI bin directory and writes
the network configuration (a conflist) that points the runtime at it. Both are written to a
temporary file in the target directory and renamed into place, so the runtime never reads a
half-written file, even if the command is killed. Running it again with the same flags changes
nothing. The DaemonSet runs it as an init container with the host's directories mounted.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.socket, _ = cmd.Root().PersistentFlags().GetString("socket")
			o.out = cmd.OutOrStdout()
			return o.run()
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.binDir, "cni-bin-dir", "/opt/cni/bin", "the runtime's CNI plugin directory")
	f.StringVar(&o.confDir, "cni-conf-dir", "/etc/cni/net.d", "the runtime's CNI configuration directory")
	f.StringVar(&o.conflist, "conflist-name", defaultConflist, "file name of the network configuration")
	f.StringVar(&o.source, "source-binary", "", "the vnetbpf CNI binary to install (default: vnetbpf next to this executable)")
	f.IntVar(&o.mtu, "mtu", 0, "MTU of container interfaces written into the configuration (default: the agent's)")
	// 1.0.0 by default: containerd 1.6 and 1.7 refuse a 1.1.0 result ("unsupported CNI result
	// version") and fail every pod, while reporting the network ready. 1.1.0 adds STATUS and GC.
	f.StringVar(&o.cniVersion, "cni-version", "1.0.0", "cniVersion of the configuration: 1.0.0 (containerd 1.6+, CRI-O) or 1.1.0 (containerd 2.x: adds STATUS and GC)")
	f.StringVar(&o.portmap, "chain-portmap", "auto", "chain the portmap plugin (hostPort): auto (if it is in the bin directory), always or never")
	return cmd
}

func (o *cniInstall) validate() error {
	if !filepath.IsAbs(o.socket) {
		return fmt.Errorf("--socket %q must be an absolute path: the plugin runs from the runtime's working directory", o.socket)
	}
	if err := validConflistName(o.conflist); err != nil {
		return err
	}
	if o.cniVersion != "1.0.0" && o.cniVersion != "1.1.0" {
		return fmt.Errorf("--cni-version %q: want 1.0.0 or 1.1.0", o.cniVersion)
	}
	if o.mtu != 0 && (o.mtu < 68 || o.mtu > 65535) {
		return fmt.Errorf("--mtu %d: want 68..65535, or 0 for the agent's", o.mtu)
	}
	switch o.portmap {
	case "auto", "always", "never":
	default:
		return fmt.Errorf("--chain-portmap %q: want auto, always or never", o.portmap)
	}
	return nil
}

// validConflistName refuses names the runtime would not read, or that point elsewhere.
func validConflistName(name string) error {
	if name == "" || strings.ContainsRune(name, '/') || strings.HasPrefix(name, ".") {
		return fmt.Errorf("--conflist-name %q: want a plain file name such as %s", name, defaultConflist)
	}
	if filepath.Ext(name) != ".conflist" {
		return fmt.Errorf("--conflist-name %q must end in .conflist", name)
	}
	return nil
}

func (o *cniInstall) run() error {
	if err := o.validate(); err != nil {
		return err
	}
	if o.source == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find the CNI binary next to this executable: %w (pass --source-binary)", err)
		}
		o.source = filepath.Join(filepath.Dir(exe), pluginType)
	}
	bin, err := os.ReadFile(o.source)
	if err != nil {
		return fmt.Errorf("read the CNI binary: %w (pass --source-binary)", err)
	}
	for _, dir := range []string{o.binDir, o.confDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		removeStaleTemps(dir)
	}

	// The binary goes first: a runtime that sees the configuration must find the plugin.
	dst := filepath.Join(o.binDir, pluginType)
	changed, err := writeIfChanged(o.binDir, pluginType, bin, 0o755)
	if err != nil {
		return fmt.Errorf("install the CNI binary: %w", err)
	}
	if changed {
		fmt.Fprintf(o.out, "installed %s (%.1f MB, from %s)\n", dst, float64(len(bin))/1e6, o.source)
	} else {
		fmt.Fprintf(o.out, "%s is up to date\n", dst)
	}

	chain, why := o.chainPortmap()
	conf, err := conflistJSON(o.cniVersion, o.socket, o.mtu, chain)
	if err != nil {
		return err
	}
	path := filepath.Join(o.confDir, o.conflist)
	changed, err = writeIfChanged(o.confDir, o.conflist, conf, 0o644)
	if err != nil {
		return fmt.Errorf("write the network configuration: %w", err)
	}
	plugins := pluginType + " (agentSocket " + o.socket + ")"
	if chain {
		plugins += ", portmap"
	}
	if changed {
		fmt.Fprintf(o.out, "wrote %s: %s\n", path, plugins)
	} else {
		fmt.Fprintf(o.out, "%s is up to date: %s\n", path, plugins)
	}
	fmt.Fprintln(o.out, why)
	if first := firstNetworkConfig(o.confDir); first != "" && first != o.conflist {
		fmt.Fprintf(o.out, "warning: %s sorts before %s; containerd and CRI-O use the first network configuration in %s, so pods do not get vnetbpf addresses until it is removed\n",
			first, o.conflist, o.confDir)
	}
	return nil
}

// chainPortmap decides whether the conflist chains portmap, and says why.
func (o *cniInstall) chainPortmap() (bool, string) {
	switch o.portmap {
	case "always":
		return true, "portmap: chained (--chain-portmap always)"
	case "never":
		return false, "portmap: not chained (--chain-portmap never); hostPort does not work"
	}
	p := filepath.Join(o.binDir, "portmap")
	if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
		return true, "portmap: chained (found " + p + ")"
	}
	return false, "portmap: not chained (" + p + " not found); hostPort does not work"
}

// conflist is the network configuration; field order is the order written.
type conflist struct {
	CNIVersion string `json:"cniVersion"`
	Name       string `json:"name"`
	Plugins    []any  `json:"plugins"`
}

type vnetbpfPluginConf struct {
	Type        string `json:"type"`
	AgentSocket string `json:"agentSocket"`
	MTU         int    `json:"mtu,omitempty"`
}

type portmapPluginConf struct {
	Type         string          `json:"type"`
	Capabilities map[string]bool `json:"capabilities"`
	Backend      string          `json:"backend"`
}

func conflistJSON(version, socket string, mtu int, portmap bool) ([]byte, error) {
	c := conflist{CNIVersion: version, Name: networkName, Plugins: []any{
		vnetbpfPluginConf{Type: pluginType, AgentSocket: socket, MTU: mtu},
	}}
	if portmap {
		c.Plugins = append(c.Plugins, portmapPluginConf{
			Type: "portmap", Capabilities: map[string]bool{"portMappings": true}, Backend: "nftables",
		})
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// writeIfChanged puts data at dir/name with mode unless the file already holds exactly
// that, in which case nothing is touched (the mtime stays, and a runtime watching the
// directory sees no event).
func writeIfChanged(dir, name string, data []byte, mode os.FileMode) (bool, error) {
	path := filepath.Join(dir, name)
	if st, err := os.Lstat(path); err == nil && st.Mode().IsRegular() && st.Mode().Perm() == mode {
		if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
			return false, nil
		}
	}
	return true, writeAtomic(dir, name, data, mode)
}

// writeAtomic writes a temporary file in dir, syncs it, and renames it over dir/name, then
// syncs dir so that the rename survives a crash. Whoever opens dir/name sees the old file or
// the new one, never part of one. On failure the temporary file is removed; if the process
// is killed first, its name (tempPrefix, no extension) keeps runtimes from reading it and
// the next install removes it.
func writeAtomic(dir, name string, data []byte, mode os.FileMode) (err error) {
	f, err := os.CreateTemp(dir, tempPrefix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = beforeRename(tmp); err != nil {
		return err
	}
	if err = os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// removeStaleTemps removes temporary files an install that was killed left in dir. Only one
// install runs per node (the DaemonSet's init container), so none of them is in use.
func removeStaleTemps(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tempPrefix) && e.Type().IsRegular() {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// networkConfigExts are the files libcni (containerd, CRI-O) reads from the conf directory.
var networkConfigExts = []string{".conf", ".conflist", ".json"}

// firstNetworkConfig is the name of the configuration file a runtime that takes the first one
// in lexical order would use, or "".
func firstNetworkConfig(dir string) string {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return ""
	}
	for _, e := range ents { // sorted by name
		if !e.IsDir() && slices.Contains(networkConfigExts, filepath.Ext(e.Name())) {
			return e.Name()
		}
	}
	return ""
}

// uninstall is what `uninstall` does.
type uninstall struct {
	bpfRoot, binDir, confDir, conflist, nic string
	socket                                  string
	force                                   bool
	out                                     io.Writer
}

func uninstallCmd() *cobra.Command {
	o := &uninstall{}
	cmd := &cobra.Command{
		Use:   "uninstall",
		Short: "Remove vnetbpf from this node: CNI configuration and binary, programs, pins",
		Long: `uninstall removes vnetbpf from this node, in this order: the CNI network configuration (so
the runtime wires no new pod), the CNI binary, the datapath's programs from every device
(pinned TCX links and clsact filters) and every pin under --bpf-root (maps and links).

Running containers that use vnetbpf LOSE CONNECTIVITY: their packets were forwarded by the
programs this removes. Delete the DaemonSet first (kubectl delete -k deploy/kubernetes); the
command refuses to run while an agent answers on --socket unless --force is given. The
agent's state (--state-dir of run) and the IP configurations it added to the NIC in Azure
are left alone. Running it again is harmless.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.socket, _ = cmd.Root().PersistentFlags().GetString("socket")
			o.out = cmd.OutOrStdout()
			return o.run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.bpfRoot, "bpf-root", loader.DefaultRoot, "bpffs directory of the pinned maps and links")
	f.StringVar(&o.binDir, "cni-bin-dir", "/opt/cni/bin", "the runtime's CNI plugin directory")
	f.StringVar(&o.confDir, "cni-conf-dir", "/etc/cni/net.d", "the runtime's CNI configuration directory")
	f.StringVar(&o.conflist, "conflist-name", defaultConflist, "file name of the network configuration")
	f.StringVar(&o.nic, "nic", "eth0", "host interface on the VNet (from_vnet is removed from it)")
	f.BoolVar(&o.force, "force", false, "uninstall even though an agent answers on --socket")
	return cmd
}

func (o *uninstall) run(ctx context.Context) error {
	if err := validConflistName(o.conflist); err != nil {
		return err
	}
	if o.bpfRoot == "" || o.bpfRoot == "/" || filepath.Clean(o.bpfRoot) == "/sys/fs/bpf" {
		return fmt.Errorf("--bpf-root %q: want the agent's own directory, such as %s", o.bpfRoot, loader.DefaultRoot)
	}
	if o.agentRunning(ctx) {
		if !o.force {
			return fmt.Errorf("an agent is running on this node (it answers on %s): delete the DaemonSet first, or pass --force", o.socket)
		}
		fmt.Fprintf(o.out, "warning: an agent answers on %s; it will fail to wire new pods\n", o.socket)
	}
	fmt.Fprintln(o.out, "Uninstalling vnetbpf from this node. Running containers that use vnetbpf lose connectivity now.")

	var errs []error
	step := func(what string, err error) {
		if err != nil {
			errs = append(errs, err)
			fmt.Fprintf(o.out, "  failed: %s: %v\n", what, err)
		}
	}
	// The configuration first: from here on the runtime wires no new pod with vnetbpf.
	conf := filepath.Join(o.confDir, o.conflist)
	step("remove "+conf, o.remove(conf, o.confDir))
	bin := filepath.Join(o.binDir, pluginType)
	step("remove "+bin, o.remove(bin, o.binDir))

	pinned, err := loader.LinkPins(o.bpfRoot)
	step("list pinned links", err)
	devices := slices.Concat(pinned, []string{o.nic})
	// Filters of clsact mode have no pin: look for them on every host veth of ours.
	var veths int
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if name := l.Attrs().Name; strings.HasPrefix(name, api.HostVethPrefix) {
				devices = append(devices, name)
				veths++
			}
		}
	}
	slices.Sort(devices)
	for _, dev := range slices.Compact(devices) {
		if err := loader.Detach(o.bpfRoot, dev); err != nil {
			step("detach from "+dev, err)
			continue
		}
		switch {
		case slices.Contains(pinned, dev):
			fmt.Fprintf(o.out, "detached the pinned link from %s\n", dev)
		case dev == o.nic:
			fmt.Fprintf(o.out, "%s: no vnetbpf program attached\n", dev)
		}
	}
	if veths > 0 {
		fmt.Fprintf(o.out, "%d host veths (%s*): no vnetbpf program attached\n", veths, api.HostVethPrefix)
	}

	if _, err := os.Stat(o.bpfRoot); err == nil {
		if err := loader.Unpin(o.bpfRoot); err != nil {
			step("remove pins", err)
		} else {
			fmt.Fprintf(o.out, "removed pinned maps and links under %s\n", o.bpfRoot)
		}
	} else if errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(o.out, "%s does not exist\n", o.bpfRoot)
	} else {
		step("look at "+o.bpfRoot, err)
	}

	if len(errs) > 0 {
		return fmt.Errorf("uninstall left something behind (run it again after fixing the cause): %w", errors.Join(errs...))
	}
	fmt.Fprintln(o.out, "vnetbpf is uninstalled. Left in place: the agent's state directory, the NIC's IP configurations in Azure, and the veths of running containers (removed when their pods are deleted).")
	return nil
}

// remove deletes path (a missing file is fine) and syncs its directory.
func (o *uninstall) remove(path, dir string) error {
	err := os.Remove(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		fmt.Fprintf(o.out, "%s is already gone\n", path)
		return nil
	case err != nil:
		return err
	}
	fmt.Fprintf(o.out, "removed %s\n", path)
	return syncDir(dir)
}

func (o *uninstall) agentRunning(ctx context.Context) bool {
	if _, err := os.Stat(o.socket); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err := api.NewClient(o.socket, 2*time.Second).Status(ctx)
	return err == nil
}
