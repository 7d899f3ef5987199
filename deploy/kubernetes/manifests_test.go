// Package kubernetes holds the manifests that run vnetbpf-agent on a cluster, and the test
// that checks them against what the agent relies on.
package kubernetes

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/vnetbpf/vnetbpf/pkg/agent"
)

// kustomization is the part of kustomize's Kustomization these manifests use.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace"`
	Resources  []string `json:"resources"`
	Images     []image  `json:"images"`
}

// image is a kustomize image override.
type image struct {
	Name    string `json:"name"`
	NewName string `json:"newName,omitempty"`
	NewTag  string `json:"newTag,omitempty"`
	Digest  string `json:"digest,omitempty"`
}

// manifests is every object in the directory, decoded strictly: a misspelt field is an
// error, as it would be (or worse, silently dropped) when applied.
type manifests struct {
	files     []string
	kust      kustomization
	ds        appsv1.DaemonSet
	cm        corev1.ConfigMap
	sa        corev1.ServiceAccount
	namespace map[string]string // file → metadata.namespace
}

func load(t *testing.T) *manifests {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := &manifests{files: files, namespace: map[string]string{}}
	seen := map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte("\n---")) {
			t.Fatalf("%s holds several documents; keep one object per file", f)
		}
		var head struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(b, &head); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		var into any
		switch head.Kind {
		case "Kustomization":
			into = &m.kust
		case "DaemonSet":
			into = &m.ds
		case "ConfigMap":
			into = &m.cm
		case "ServiceAccount":
			into = &m.sa
		default:
			t.Fatalf("%s: kind %q is not one this test checks; add it", f, head.Kind)
		}
		if seen[head.Kind] {
			t.Fatalf("%s: a second %s", f, head.Kind)
		}
		seen[head.Kind] = true
		if err := yaml.UnmarshalStrict(b, into); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if head.Kind != "Kustomization" {
			m.namespace[f] = head.Metadata.Namespace
		}
	}
	for _, k := range []string{"Kustomization", "DaemonSet", "ConfigMap", "ServiceAccount"} {
		if !seen[k] {
			t.Fatalf("no %s among %v", k, files)
		}
	}
	return m
}

// agentConfig is the agent.yaml of the ConfigMap, read and checked as the agent does.
func (m *manifests) agentConfig(t *testing.T, name string) agent.Config {
	t.Helper()
	data, ok := m.cm.Data[name]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %q (the agent's --config file)", m.cm.Name, name)
	}
	cfg := agent.DefaultConfig()
	if err := agent.ParseConfig([]byte(data), &cfg); err != nil {
		t.Fatalf("ConfigMap %s, %s: %v", m.cm.Name, name, err)
	}
	if _, err := cfg.Validate(); err != nil {
		t.Fatalf("ConfigMap %s, %s: the agent would refuse it: %v", m.cm.Name, name, err)
	}
	return cfg
}

func container(t *testing.T, cs []corev1.Container, name string) *corev1.Container {
	t.Helper()
	for i := range cs {
		if cs[i].Name == name {
			return &cs[i]
		}
	}
	t.Fatalf("no container %q", name)
	return nil
}

// flag finds --name=value or --name value in args.
func flag(args []string, name string) (string, bool) {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name && i+1 < len(args) {
			return args[i+1], true
		}
	}
	return "", false
}

// hostPathOf is where path inside container c lies on the host, through the hostPath
// mount that holds it (the deepest). ok is false if no hostPath mount holds it: then the
// path lives and dies with the container.
func hostPathOf(spec *corev1.PodSpec, c *corev1.Container, p string) (host string, mount corev1.VolumeMount, ok bool) {
	best := -1
	for _, vm := range c.VolumeMounts {
		rel, err := filepath.Rel(vm.MountPath, p)
		if err != nil || rel == ".." || strings.HasPrefix(rel, "../") || len(vm.MountPath) <= best {
			continue
		}
		vol := volume(spec, vm.Name)
		if vol == nil || vol.HostPath == nil {
			continue
		}
		best, mount = len(vm.MountPath), vm
		host = filepath.Join(vol.HostPath.Path, vm.SubPath, rel)
	}
	return host, mount, best >= 0
}

func volume(spec *corev1.PodSpec, name string) *corev1.Volume {
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == name {
			return &spec.Volumes[i]
		}
	}
	return nil
}

func propagation(vm corev1.VolumeMount) corev1.MountPropagationMode {
	if vm.MountPropagation == nil {
		return corev1.MountPropagationNone
	}
	return *vm.MountPropagation
}

func under(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

func TestKustomizationListsEveryManifest(t *testing.T) {
	m := load(t)
	var want []string
	for _, f := range m.files {
		if f != "kustomization.yaml" {
			want = append(want, f)
		}
	}
	got := slices.Clone(m.kust.Resources)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("kustomization.yaml resources %v; the directory holds %v", m.kust.Resources, want)
	}
	if m.kust.APIVersion != "kustomize.config.k8s.io/v1beta1" || m.kust.Namespace != "kube-system" {
		t.Errorf("kustomization: apiVersion %q, namespace %q", m.kust.APIVersion, m.kust.Namespace)
	}
	for f, ns := range m.namespace {
		if ns != "kube-system" {
			t.Errorf("%s: namespace %q, want kube-system", f, ns)
		}
	}
	// Every image a container runs is one `kustomize edit set image` can point elsewhere.
	spec := m.ds.Spec.Template.Spec
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		if !slices.ContainsFunc(m.kust.Images, func(i image) bool { return i.Name == c.Image }) {
			t.Errorf("container %s runs %q, which kustomization.yaml's images does not list", c.Name, c.Image)
		}
	}
}

func TestDaemonSetRunsOnEveryNode(t *testing.T) {
	m := load(t)
	spec := m.ds.Spec.Template.Spec
	if m.ds.Name != "vnetbpf-agent" {
		t.Errorf("DaemonSet is named %q; docs/kubernetes.md says vnetbpf-agent", m.ds.Name)
	}
	if !spec.HostNetwork {
		t.Error("hostNetwork must be true: the agent works on the node's devices and serves kubelet before pods have a network")
	}
	if spec.DNSPolicy != corev1.DNSDefault {
		t.Errorf("dnsPolicy %q: the agent cannot depend on cluster DNS, which runs in pods it must wire first", spec.DNSPolicy)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q, want system-node-critical", spec.PriorityClassName)
	}
	if !slices.ContainsFunc(spec.Tolerations, func(tol corev1.Toleration) bool {
		return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
	}) {
		t.Errorf("tolerations %v: want {operator: Exists}, so tainted nodes get the agent too", spec.Tolerations)
	}
	if spec.ServiceAccountName != m.sa.Name {
		t.Errorf("serviceAccountName %q, but serviceaccount.yaml defines %q", spec.ServiceAccountName, m.sa.Name)
	}
	if m.sa.AutomountServiceAccountToken == nil || *m.sa.AutomountServiceAccountToken ||
		spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Error("the agent never calls the API server: its token must not be mounted")
	}
	sel := m.ds.Spec.Selector
	for k, v := range sel.MatchLabels {
		if m.ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod template's labels", k, v)
		}
	}
	u := m.ds.Spec.UpdateStrategy
	if u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil || u.RollingUpdate.MaxUnavailable == nil {
		t.Fatalf("updateStrategy %+v: want RollingUpdate with maxUnavailable", u)
	}
	if s := u.RollingUpdate.MaxSurge; s == nil || s.IntValue() != 0 || s.String() != "0" {
		t.Errorf("maxSurge %v: two agents on one node would fight over the socket and the state files", s)
	}
	images := map[string]bool{}
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		images[c.Image] = true
	}
	if len(images) != 1 {
		t.Errorf("containers run %v: install-cni must install the plugin of the agent's own image", images)
	}
}

func TestInstallCNIMatchesTheAgent(t *testing.T) {
	m := load(t)
	spec := &m.ds.Spec.Template.Spec
	agentC := container(t, spec.Containers, "agent")
	cfg := m.agentConfig(t, "agent.yaml")
	if len(spec.InitContainers) != 1 {
		t.Fatalf("init containers %d, want one (install-cni)", len(spec.InitContainers))
	}
	ic := &spec.InitContainers[0]
	cmd := slices.Concat(ic.Command, ic.Args)
	if len(cmd) < 2 || path.Base(cmd[0]) != "vnetbpf-agent" || cmd[1] != "install-cni" {
		t.Fatalf("init container runs %v, want vnetbpf-agent install-cni", cmd)
	}
	for flagName, host := range map[string]string{"cni-bin-dir": "/opt/cni/bin", "cni-conf-dir": "/etc/cni/net.d"} {
		dir, ok := flag(cmd, flagName)
		if !ok {
			t.Errorf("install-cni has no --%s: it would write into the container's own %s", flagName, host)
			continue
		}
		if got, _, ok := hostPathOf(spec, ic, dir); !ok {
			t.Errorf("install-cni --%s %s is not on a hostPath mount; want the host's %s", flagName, dir, host)
		} else if got != host {
			t.Errorf("install-cni --%s %s is the host's %s, want %s", flagName, dir, got, host)
		}
	}
	// The plugin runs on the host and dials agentSocket there; the agent listens on its
	// socket inside the pod. Both must be the same file.
	sock, ok := flag(cmd, "socket")
	if !ok {
		sock = "/run/vnetbpf/agent.sock"
	}
	hostSock, _, ok := hostPathOf(spec, agentC, cfg.Socket)
	if !ok {
		t.Fatalf("the agent's socket %s is not on a hostPath mount: the CNI plugin on the host cannot reach it", cfg.Socket)
	}
	if hostSock != sock {
		t.Errorf("the agent listens on the host's %s, but install-cni points the plugin at %s", hostSock, sock)
	}
}

func TestAgentContainer(t *testing.T) {
	m := load(t)
	spec := &m.ds.Spec.Template.Spec
	c := container(t, spec.Containers, "agent")
	cmd := slices.Concat(c.Command, c.Args)
	if len(cmd) < 2 || path.Base(cmd[0]) != "vnetbpf-agent" || cmd[1] != "run" {
		t.Fatalf("agent runs %v, want vnetbpf-agent run", cmd)
	}
	conf, ok := flag(cmd, "config")
	if !ok {
		conf = agent.DefaultConfigFile
	}
	var cmMount *corev1.VolumeMount
	for i, vm := range c.VolumeMounts {
		if v := volume(spec, vm.Name); v != nil && v.ConfigMap != nil && vm.MountPath == filepath.Dir(conf) {
			if v.ConfigMap.Name != m.cm.Name {
				t.Errorf("volume %s mounts ConfigMap %q, but configmap.yaml defines %q", vm.Name, v.ConfigMap.Name, m.cm.Name)
			}
			cmMount = &c.VolumeMounts[i]
		}
	}
	if cmMount == nil {
		t.Fatalf("no ConfigMap is mounted at %s, where --config %s is", filepath.Dir(conf), conf)
	}
	cfg := m.agentConfig(t, filepath.Base(conf))
	if cfg.IPAM.Provider != "azure" {
		t.Errorf("ipam.provider %q: the Kubernetes deployment is for Azure", cfg.IPAM.Provider)
	}

	// Each path the agent writes must be the host's, or it vanishes with the pod.
	for what, p := range map[string]string{"bpfRoot": cfg.BPFRoot, "stateDir": cfg.StateDir, "socket": filepath.Dir(cfg.Socket)} {
		if _, _, ok := hostPathOf(spec, c, p); !ok {
			t.Errorf("%s %s is not on a hostPath mount", what, p)
		}
	}
	// The pins must be on the host's bpffs.
	host, vm, _ := hostPathOf(spec, c, cfg.BPFRoot)
	if !under(host, "/sys/fs/bpf") {
		t.Errorf("bpfRoot %s is the host's %q, which is not under the host's bpffs /sys/fs/bpf", cfg.BPFRoot, host)
	}
	if p := propagation(vm); p != corev1.MountPropagationHostToContainer {
		t.Errorf("bpffs mount %s: propagation %s, want HostToContainer", vm.MountPath, p)
	}
	// Netns paths the runtime passes (containerd, CRI-O: /var/run/netns/...) must resolve to
	// the host's namespaces, including ones created after the pod started.
	for _, p := range []string{"/var/run/netns/cni-0", "/run/netns/cni-0"} {
		host, vm, ok := hostPathOf(spec, c, p)
		if !ok || host != "/run/netns/cni-0" {
			t.Errorf("netns path %s is the host's %q (mounted: %v), want /run/netns/cni-0", p, host, ok)
			continue
		}
		if p := propagation(vm); p != corev1.MountPropagationHostToContainer {
			t.Errorf("netns mount %s: propagation %s, want HostToContainer", vm.MountPath, p)
		}
	}

	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("agent has no securityContext.capabilities")
	}
	for _, cp := range []corev1.Capability{"BPF", "PERFMON", "NET_ADMIN"} {
		if !slices.Contains(sc.Capabilities.Add, cp) {
			t.Errorf("capability %s is not added; the agent needs it (see daemonset.yaml)", cp)
		}
	}
	if !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Error("capabilities must drop ALL first, then add what the agent needs")
	}
	privileged := sc.Privileged != nil && *sc.Privileged
	if !privileged && slices.Contains(sc.Capabilities.Add, "SYS_ADMIN") {
		t.Error("SYS_ADMIN would let the agent mount a bpffs of its own that dies with the pod (and its pins)")
	}
	if !privileged && (sc.AppArmorProfile == nil || sc.AppArmorProfile.Type != corev1.AppArmorProfileTypeUnconfined) {
		t.Error("the runtime's default AppArmor profile forbids writing pins under /sys/fs/bpf: want appArmorProfile Unconfined")
	}
	// What the API server enforces: Bidirectional propagation only in privileged containers.
	for _, ct := range slices.Concat(spec.InitContainers, spec.Containers) {
		priv := ct.SecurityContext != nil && ct.SecurityContext.Privileged != nil && *ct.SecurityContext.Privileged
		for _, vm := range ct.VolumeMounts {
			if propagation(vm) == corev1.MountPropagationBidirectional && !priv {
				t.Errorf("container %s mounts %s Bidirectional without being privileged: the API server refuses that", ct.Name, vm.MountPath)
			}
			if volume(spec, vm.Name) == nil {
				t.Errorf("container %s mounts volume %q, which is not defined", ct.Name, vm.Name)
			}
		}
	}

	if lim, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok || lim.Cmp(resource.MustParse("128Mi")) != 0 {
		t.Errorf("memory limit %v, want 128Mi", c.Resources.Limits.Memory())
	}
	if _, ok := c.Resources.Requests[corev1.ResourceMemory]; !ok {
		t.Error("no memory request")
	}
}

func TestProbesReachTheMetricsServer(t *testing.T) {
	m := load(t)
	spec := &m.ds.Spec.Template.Spec
	c := container(t, spec.Containers, "agent")
	cfg := m.agentConfig(t, "agent.yaml")
	if cfg.MetricsAddr == "" {
		t.Fatal("metricsAddr is empty: /healthz and /readyz would not be served")
	}
	listenHost, listenPort, err := net.SplitHostPort(cfg.MetricsAddr)
	if err != nil {
		t.Fatalf("metricsAddr %q: %v", cfg.MetricsAddr, err)
	}
	port, _ := strconv.Atoi(listenPort)
	var named *corev1.ContainerPort
	for i, p := range c.Ports {
		if p.Name == "metrics" {
			named = &c.Ports[i]
		}
	}
	if named == nil || int(named.ContainerPort) != port {
		t.Errorf("port named metrics %+v, want containerPort %d (metricsAddr %s)", named, port, cfg.MetricsAddr)
	}
	listensOn := func(host string) bool {
		ip := net.ParseIP(listenHost)
		switch {
		case listenHost == "" || (ip != nil && ip.IsUnspecified()):
			return true // every address, loopback and the node's
		case host == "":
			return false // the probe goes to the pod's (node's) IP, whatever it is
		default:
			return net.ParseIP(host).Equal(ip)
		}
	}
	for name, tc := range map[string]struct {
		probe *corev1.Probe
		path  string
	}{
		"startupProbe":   {c.StartupProbe, "/healthz"},
		"livenessProbe":  {c.LivenessProbe, "/healthz"},
		"readinessProbe": {c.ReadinessProbe, "/readyz"},
	} {
		p := tc.probe
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s: want an httpGet of %s", name, tc.path)
			continue
		}
		g := p.HTTPGet
		if g.Path != tc.path {
			t.Errorf("%s: path %q, want %s", name, g.Path, tc.path)
		}
		got := g.Port.IntValue()
		if g.Port.IntValue() == 0 {
			got = -1
			for _, cp := range c.Ports {
				if cp.Name == g.Port.String() {
					got = int(cp.ContainerPort)
				}
			}
		}
		if got != port {
			t.Errorf("%s: port %s is %d, but the agent serves on %s", name, g.Port.String(), got, cfg.MetricsAddr)
		}
		if !listensOn(g.Host) {
			t.Errorf("%s: probes host %q, but the agent listens on %s only", name, g.Host, cfg.MetricsAddr)
		}
	}
}

// The dashboard's queries name metrics the agent exports.
func TestGrafanaDashboardUsesExportedMetrics(t *testing.T) {
	b, err := os.ReadFile("../grafana-dashboard.json")
	if os.IsNotExist(err) {
		t.Skip("no dashboard")
	}
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	src, err := os.ReadFile("../../pkg/agent/metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	name := regexp.MustCompile(`vnetbpf_[a-z_]+`)
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, metric := range name.FindAllString(tg.Expr, -1) {
				n++
				base := metric
				for _, suf := range []string{"_bucket", "_count", "_sum"} {
					base = strings.TrimSuffix(base, suf)
				}
				if !bytes.Contains(src, []byte(fmt.Sprintf("%q", base))) {
					t.Errorf("panel %q queries %s, which pkg/agent/metrics.go does not export", p.Title, metric)
				}
			}
		}
	}
	if n == 0 {
		t.Error("the dashboard queries no vnetbpf metric")
	}
}
