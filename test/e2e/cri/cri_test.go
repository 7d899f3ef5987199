package cri

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/test/e2e"
)

// pod is a sandbox run through CRI, as the test found it after RunPodSandbox.
type pod struct {
	cfg   PodConfig
	id    string
	ip    netip.Addr
	pid   int    // the sandbox's (pause's) process
	path  string // its network namespace, from the sandbox's OCI spec
	netns ns.NetNS
}

func (p *pod) String() string { return p.cfg.Metadata.Namespace + "/" + p.cfg.Metadata.Name }

// runPods runs one sandbox per name at once, as kubelet's pod workers do, and checks what
// CRI says about each.
func (n *Node) runPods(t *testing.T, namespace string, names ...string) []*pod {
	t.Helper()
	pods := make([]*pod, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pods[i], errs[i] = n.runPod(namespace, name)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("run pod %s/%s: %v\n%s", namespace, names[i], err, n.Logs())
		}
	}
	return pods
}

func (n *Node) runPod(namespace, name string) (*pod, error) {
	p := &pod{cfg: PodConfig{
		Metadata:     PodMetadata{Name: name, Namespace: namespace, UID: "uid-" + namespace + "-" + name},
		Hostname:     name,
		LogDirectory: filepath.Join(n.Dir, "pod-logs", namespace+"_"+name),
		Linux:        PodLinux{CgroupParent: n.CgroupParent},
	}}
	id, err := n.Crictl.RunPod(n.Dir, p.cfg)
	if err != nil {
		return nil, err
	}
	p.id = id
	in, err := n.Crictl.InspectPod(id)
	if err != nil {
		return nil, err
	}
	if in.Status.State != "SANDBOX_READY" || in.Status.Metadata != p.cfg.Metadata {
		return nil, fmt.Errorf("inspectp: state %s, metadata %+v; want SANDBOX_READY and %+v", in.Status.State, in.Status.Metadata, p.cfg.Metadata)
	}
	if p.ip, err = in.IP(); err != nil {
		return nil, fmt.Errorf("inspectp shows no IP (%q): %v", in.Status.Network.IP, err)
	}
	if p.path = in.NetnsPath(); p.path == "" || in.Info.Pid == 0 {
		return nil, fmt.Errorf("inspectp shows no network namespace path (%q) or sandbox pid (%d)", p.path, in.Info.Pid)
	}
	p.pid = in.Info.Pid
	// The path CNI was given must be the namespace the sandbox process lives in.
	if same, err := sameFile(p.path, fmt.Sprintf("/proc/%d/ns/net", p.pid)); err != nil || !same {
		return nil, fmt.Errorf("network namespace %s is not that of the sandbox process %d (%v)", p.path, p.pid, err)
	}
	// Held open until the test ends, past the pod's removal: if DEL left the pod's veth, the
	// namespace going away would delete it and hide the leak.
	if p.netns, err = ns.GetNS(p.path); err != nil {
		return nil, fmt.Errorf("open the pod's network namespace: %w", err)
	}
	n.holdNetns(p.netns)
	return p, nil
}

// endpoint is the agent's endpoint for the pod's eth0, or an error naming what the agent has.
func (n *Node) endpoint(p *pod) (api.Endpoint, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	eps, err := n.Agent.Client().Endpoints(ctx)
	if err != nil {
		return api.Endpoint{}, err
	}
	for _, ep := range eps {
		if ep.ContainerID == p.id && ep.IfName == "eth0" {
			return ep, nil
		}
	}
	return api.Endpoint{}, fmt.Errorf("the agent has no endpoint for pod %s (sandbox %.12s) among %d", p, p.id, len(eps))
}

func (n *Node) endpoints(t *testing.T) []api.Endpoint {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	eps, err := n.Agent.Client().Endpoints(ctx)
	if err != nil {
		t.Fatalf("list the agent's endpoints: %v", err)
	}
	return eps
}

func (n *Node) poolUsed(t *testing.T) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, err := n.Agent.Client().Pool(ctx)
	if err != nil {
		t.Fatalf("read the agent's pool: %v", err)
	}
	return p.Used
}

// hostVethExists reports whether the node has a link called name.
func (n *Node) hostVethExists(t *testing.T, name string) bool {
	t.Helper()
	var exists bool
	testutils.Do(t, n.Node.NS, func() error {
		_, err := netlink.LinkByName(name)
		exists = err == nil
		return nil
	})
	return exists
}

// checkAttached checks that the agent recorded p as CRI described it, with the pod namespace
// and name containerd passed in CNI_ARGS, and that its host-side veth is in the node.
func (n *Node) checkAttached(t *testing.T, p *pod) api.Endpoint {
	t.Helper()
	ep, err := n.endpoint(p)
	if err != nil {
		t.Fatal(err)
	}
	want := api.Owner{Key: api.Key{ContainerID: p.id, IfName: "eth0"}, PodNamespace: p.cfg.Metadata.Namespace, PodName: p.cfg.Metadata.Name, Netns: p.path}
	if ep.Owner != want || ep.IP != p.ip || ep.HostIfName != api.HostVethName(want.Key) {
		b, _ := json.Marshal(ep)
		t.Errorf("agent endpoint %s does not match pod %s: want owner %+v, IP %s (inspectp), host veth %s", b, p, want, p.ip, api.HostVethName(want.Key))
	}
	if !n.hostVethExists(t, ep.HostIfName) {
		t.Errorf("host veth %s of pod %s is not in the node's namespace", ep.HostIfName, p)
	}
	return ep
}

func expectPing(t *testing.T, what string, from ns.NetNS, to netip.Addr) {
	t.Helper()
	if got, err := e2e.Ping(from, to, 3, 10*time.Millisecond, time.Second); err != nil || got != 3 {
		t.Errorf("ping %s (%s): %d of 3 answered, %v", what, to, got, err)
	}
}

// pinger pings in the background, in rounds of e2e.Ping, until stopped: it lasts as long as
// what it watches, however slow a loaded machine makes either.
type pinger struct {
	sent, got int
	err       error
	stop      chan struct{}
	stopOnce  sync.Once
	done      chan struct{}
}

func startPing(from ns.NetNS, to netip.Addr, interval time.Duration) *pinger {
	const round = 50
	p := &pinger{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			got, err := e2e.Ping(from, to, round, interval, time.Second)
			p.sent += round
			p.got += got
			if err != nil {
				p.err = err
				return
			}
			select {
			case <-p.stop:
				return
			default:
			}
		}
	}()
	return p
}

// Stop ends the ping after its current round and returns the packets sent and answered.
// Calling it again returns the same.
func (p *pinger) Stop() (sent, got int, err error) {
	p.stopOnce.Do(func() { close(p.stop) })
	<-p.done
	return p.sent, p.got, p.err
}

// waitFlowing waits until the datapath has counted packets of p's endpoint beyond those it
// counted before, so that what follows happens while the ping is under way.
func (n *Node) waitFlowing(t *testing.T, p *pod) {
	t.Helper()
	before, err := n.endpoint(p)
	if err != nil {
		t.Fatal(err)
	}
	testutils.Eventually(t, 5*time.Second, "the background ping to flow through pod "+p.String(), func() error {
		ep, err := n.endpoint(p)
		if err != nil {
			return err
		}
		if sent := ep.TxPackets - before.TxPackets; sent < 20 {
			return fmt.Errorf("%d packets counted so far", sent)
		}
		return nil
	})
}

// TestCRIPodNetwork drives vnetbpf through the path kubelet uses: CRI calls (crictl) to a
// real containerd whose CRI plugin runs the plugin through libcni in the node's namespace.
// Pods get addresses from the agent's pool and reach each other and the VNet; the datapath
// keeps forwarding across restarts of the agent and of containerd; stopping and removing a
// pod gives its address back.
func TestCRIPodNetwork(t *testing.T) {
	testutils.RequireRoot(t)
	if err := InstallRuntime(); err != nil {
		t.Fatalf("containerd and runc are missing and could not be installed (`make deps` installs %v): %v", AptPackages, err)
	}
	start := time.Now()
	// Three addresses for three pods: a fourth finds the pool empty. cniVersion 1.0.0:
	// containerd 1.6's libcni rejects a 1.1.0 result.
	pool := []netip.Addr{netip.MustParseAddr("10.0.1.1"), netip.MustParseAddr("10.0.1.2"), netip.MustParseAddr("10.0.1.3")}
	n := StartNode(t, NodeOptions{Pool: pool, CNIVersion: "1.0.0"})
	t.Logf("fabric, node, agent and containerd ready in %s", time.Since(start).Round(time.Millisecond))

	var pods []*pod
	ok := t.Run("run pods", func(t *testing.T) {
		start := time.Now()
		pods = n.runPods(t, "team-a", "web-0", "web-1", "db-0")
		t.Logf("3 pods ran in %s", time.Since(start).Round(time.Millisecond))
		seen := make(map[netip.Addr]string)
		for _, p := range pods {
			if !slices.Contains(n.Pool, p.ip) {
				t.Errorf("pod %s has %s, not an address of the pool %v", p, p.ip, n.Pool)
			}
			if other, dup := seen[p.ip]; dup {
				t.Errorf("pods %s and %s both have %s", other, p, p.ip)
			}
			seen[p.ip] = p.String()
			n.checkAttached(t, p)
		}
		if used := n.poolUsed(t); used != len(pods) {
			t.Errorf("the agent's pool has %d addresses in use with %d pods", used, len(pods))
		}
	})
	if !ok {
		return
	}
	a, b, c := pods[0], pods[1], pods[2]

	ok = t.Run("traffic", func(t *testing.T) {
		expectPing(t, "pod a -> pod b", a.netns, b.ip)
		expectPing(t, "pod b -> pod c", b.netns, c.ip)
		expectPing(t, "pod c -> pod a", c.netns, a.ip)
		for _, p := range pods {
			expectPing(t, "pod "+p.String()+" -> fabric gateway", p.netns, n.Fabric.Gateway)
		}
		expectPing(t, "fabric -> pod a", n.Fabric.NS, a.ip)
		expectPing(t, "node -> pod b", n.Node.NS, b.ip)
		if err := e2e.TCPExchange(c.netns, a.netns, c.ip, 8080, 5*time.Second); err != nil {
			t.Errorf("tcp pod a -> pod c: %v", err)
		}
	})
	if !ok {
		return
	}

	ok = t.Run("agent restart", func(t *testing.T) {
		before := n.endpoints(t)
		ping := startPing(a.netns, b.ip, 2*time.Millisecond)
		defer ping.Stop()
		n.waitFlowing(t, a)
		restart := time.Now()
		must(t, n.Agent.Kill())
		if err := n.Agent.Start(); err != nil {
			t.Fatal(err)
		}
		took := time.Since(restart)
		n.waitFlowing(t, a)
		sent, got, err := ping.Stop()
		if err != nil || got != sent {
			t.Errorf("pod a -> pod b: %d of %d answered across the agent's SIGKILL and restart (%s), want all; %v", got, sent, took, err)
		}
		t.Logf("agent back in %s; %d of %d pings answered", took.Round(time.Millisecond), got, sent)
		if after := n.endpoints(t); !sameEndpoints(before, after) {
			t.Errorf("the agent's endpoints changed across its restart:\nbefore %v\nafter  %v", ids(before), ids(after))
		}
	})
	if !ok {
		return
	}

	ok = t.Run("containerd restart", func(t *testing.T) {
		before := n.endpoints(t)
		ping := startPing(a.netns, b.ip, 3*time.Millisecond)
		defer ping.Stop()
		n.waitFlowing(t, a)
		restart := time.Now()
		must(t, n.Containerd.Kill())
		// The pods outlive containerd: their shims and sandbox processes stay.
		for _, p := range pods {
			if err := syscall.Kill(p.pid, 0); err != nil {
				t.Errorf("pod %s's sandbox process %d is gone with containerd: %v", p, p.pid, err)
			}
		}
		if err := n.Containerd.Start(); err != nil {
			t.Fatal(err)
		}
		if err := n.Crictl.WaitReady(20 * time.Second); err != nil {
			t.Fatalf("%v\n%s", err, n.Containerd.Tail(30))
		}
		took := time.Since(restart)
		sent, got, err := ping.Stop()
		t.Logf("containerd back in %s; %d of %d pings answered meanwhile (%v)", took.Round(time.Millisecond), got, sent, err)
		for _, p := range pods {
			in, err := n.Crictl.InspectPod(p.id)
			if err != nil {
				t.Errorf("pod %s after the restart: %v", p, err)
				continue
			}
			if ip, _ := in.IP(); in.Status.State != "SANDBOX_READY" || ip != p.ip || in.Info.Pid != p.pid {
				t.Errorf("pod %s after the restart: state %s, IP %s, pid %d; want SANDBOX_READY, %s, %d", p, in.Status.State, in.Status.Network.IP, in.Info.Pid, p.ip, p.pid)
			}
		}
		// Recovering the pods must not run CNI: an ADD or a DEL would replace the endpoints.
		if after := n.endpoints(t); !sameEndpoints(before, after) {
			t.Errorf("the agent's endpoints changed across containerd's restart:\nbefore %v\nafter  %v", ids(before), ids(after))
		}
		if got, err := e2e.Ping(a.netns, b.ip, 100, 2*time.Millisecond, time.Second); err != nil || got != 100 {
			t.Errorf("pod a -> pod b after containerd's restart: %d of 100 answered, %v", got, err)
		}
		expectPing(t, "pod c -> fabric gateway after containerd's restart", c.netns, n.Fabric.Gateway)
	})
	if !ok {
		return
	}

	ok = t.Run("pool exhausted", func(t *testing.T) {
		// kubelet would retry this pod until an address is free; CRI undoes the failed
		// sandbox, running DEL for it, which must not touch the other pods' addresses.
		_, err := n.runPod("team-b", "api-0")
		if err == nil {
			t.Fatal("a fourth pod ran with three addresses in the pool")
		}
		if !strings.Contains(err.Error(), "vnetbpf") {
			t.Errorf("runp failed, but not in vnetbpf: %v", err)
		}
		t.Logf("runp with the pool used up: %v", err)
		if ids, err := n.Crictl.PodIDs(); err != nil || len(ids) != len(pods) {
			t.Errorf("%d pods listed after the failed runp (%v), want %d", len(ids), err, len(pods))
		}
		if used := n.poolUsed(t); used != len(pods) {
			t.Errorf("%d addresses in use after the failed runp, want %d", used, len(pods))
		}
		if eps := n.endpoints(t); len(eps) != len(pods) {
			t.Errorf("the agent has %d endpoints after the failed runp, want %d: %v", len(eps), len(pods), ids(eps))
		}
		expectPing(t, "pod a -> pod c after the failed runp", a.netns, c.ip)
	})
	if !ok {
		return
	}

	t.Run("stop and remove", func(t *testing.T) {
		epA, err := n.endpoint(a)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := n.Crictl.Run("stopp", a.id); err != nil {
			t.Fatalf("%v\n%s", err, n.Logs())
		}
		// StopPodSandbox returns after CNI DEL: everything is released by then.
		for _, ep := range n.endpoints(t) {
			if ep.ContainerID == a.id {
				t.Errorf("the agent still has pod a's endpoint %d after stopp", ep.ID)
			}
		}
		if n.hostVethExists(t, epA.HostIfName) {
			t.Errorf("host veth %s still in the node after stopp", epA.HostIfName)
		}
		if used := n.poolUsed(t); used != 2 {
			t.Errorf("%d addresses in use after stopping one of 3 pods, want 2", used)
		}
		if in, err := n.Crictl.InspectPod(a.id); err != nil || in.Status.State != "SANDBOX_NOTREADY" {
			t.Errorf("pod a after stopp: state %q, %v; want SANDBOX_NOTREADY", in.Status.State, err)
		}
		// RemovePodSandbox runs DEL again, with an empty CNI_NETNS: it must succeed.
		if _, err := n.Crictl.Run("rmp", a.id); err != nil {
			t.Fatalf("%v\n%s", err, n.Logs())
		}
		if ids, err := n.Crictl.PodIDs(); err != nil || slices.Contains(ids, a.id) {
			t.Errorf("pod a still listed after rmp (%v, %v)", ids, err)
		}
		if err := pathIsGone(a.path); err != nil {
			t.Errorf("pod a's network namespace after rmp: %v", err)
		}
		expectPing(t, "pod b -> pod c with pod a gone", b.netns, c.ip)

		// kubelet's retry of the pod that found the pool empty gets the address a gave back.
		d := n.runPods(t, "team-b", "api-0")[0]
		if d.ip != a.ip {
			t.Errorf("the retried pod got %s, want %s, the only free address", d.ip, a.ip)
		}
		n.checkAttached(t, d)
		expectPing(t, "retried pod -> pod b", d.netns, b.ip)
		expectPing(t, "fabric -> retried pod", n.Fabric.NS, d.ip)

		var veths []string
		for _, p := range []*pod{b, c, d} {
			ep, err := n.endpoint(p)
			if err != nil {
				t.Fatal(err)
			}
			veths = append(veths, ep.HostIfName)
			for _, cmd := range []string{"stopp", "rmp"} {
				if _, err := n.Crictl.Run(cmd, p.id); err != nil {
					t.Fatalf("%v\n%s", err, n.Logs())
				}
			}
		}
		if used := n.poolUsed(t); used != 0 {
			t.Errorf("%d addresses in use with every pod removed, want 0", used)
		}
		if eps := n.endpoints(t); len(eps) != 0 {
			t.Errorf("the agent has %d endpoints with every pod removed: %v", len(eps), ids(eps))
		}
		for _, v := range veths {
			if n.hostVethExists(t, v) {
				t.Errorf("host veth %s still in the node with every pod removed", v)
			}
		}
		testutils.Eventually(t, 10*time.Second, "the pods' shims to exit", func() error {
			if pids := n.Containerd.Shims(); len(pids) > 0 {
				return fmt.Errorf("shims %v still running", pids)
			}
			return nil
		})
		if points, err := mountsUnder(n.Containerd.Dir); err != nil || len(points) > 0 {
			t.Errorf("mounts left under containerd's dirs with every pod removed: %v %v", points, err)
		}
	})
}

// sameEndpoints reports whether two listings hold the same endpoints, created at the same
// moments: a recreated endpoint gets a new creation time.
func sameEndpoints(a, b []api.Endpoint) bool {
	key := func(e api.Endpoint) string {
		return fmt.Sprintf("%s %s %d %s", e.Key, e.IP, e.ID, e.CreatedAt.Format(time.RFC3339Nano))
	}
	as, bs := make([]string, 0, len(a)), make([]string, 0, len(b))
	for _, e := range a {
		as = append(as, key(e))
	}
	for _, e := range b {
		bs = append(bs, key(e))
	}
	slices.Sort(as)
	slices.Sort(bs)
	return slices.Equal(as, bs)
}

func ids(eps []api.Endpoint) []string {
	var s []string
	for _, e := range eps {
		s = append(s, fmt.Sprintf("%d:%.12s=%s", e.ID, e.ContainerID, e.IP))
	}
	return s
}

func sameFile(a, b string) (bool, error) {
	fa, err := os.Stat(a)
	if err != nil {
		return false, err
	}
	fb, err := os.Stat(b)
	if err != nil {
		return false, err
	}
	return os.SameFile(fa, fb), nil
}

func TestMain(m *testing.M) {
	code := m.Run()
	for _, d := range builtDirs {
		os.RemoveAll(d)
	}
	os.Exit(code)
}
