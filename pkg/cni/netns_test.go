package cni

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// testEnv is one node: a fresh "host" netns (so nothing touches the real host), a fresh
// container netns and a fake agent. The plugin runs in-process inside the host netns.
type testEnv struct {
	t       *testing.T
	host    ns.NetNS
	cont    ns.NetNS
	agent   *fakeAgent
	logFile string
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	e := &testEnv{t: t, agent: newFakeAgent(t), logFile: filepath.Join(t.TempDir(), "vnetbpf.log")}
	e.host = newNetNS(t)
	e.cont = newNetNS(t)
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(e.logFile)
			t.Logf("plugin log:\n%s", b)
		}
	})
	return e
}

func newNetNS(t *testing.T) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeNetNS(n) })
	return n
}

// removeNetNS closes and unmounts n; a second call does nothing useful and is harmless.
func removeNetNS(n ns.NetNS) {
	_ = n.Close()
	_ = testutils.UnmountNS(n)
}

func (e *testEnv) conf(version string, extra map[string]any) []byte {
	m := map[string]any{
		"cniVersion": version, "name": "vnet", "type": "vnetbpf",
		"agentSocket": e.agent.socket, "logFile": e.logFile, "logLevel": "debug",
	}
	for k, v := range extra {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// args are what containerd passes, unknown keys and IgnoreUnknown included.
func (e *testEnv) args(containerID string, conf []byte) *skel.CmdArgs {
	return &skel.CmdArgs{
		ContainerID: containerID, Netns: e.cont.Path(), IfName: "eth0", StdinData: conf,
		Args: "K8S_POD_UID=u-1;IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=" + containerID + ";FOO=bar",
	}
}

func (e *testEnv) inHost(fn func() error) error {
	return e.host.Do(func(ns.NetNS) error { return fn() })
}

func (e *testEnv) add(args *skel.CmdArgs) (types.Result, []byte, error) {
	var (
		r   types.Result
		out []byte
	)
	err := e.inHost(func() (err error) {
		r, out, err = testutils.CmdAddWithArgs(args, func() error { return Add(args) })
		return err
	})
	return r, out, err
}

func (e *testEnv) mustAdd(args *skel.CmdArgs) (*current.Result, []byte) {
	e.t.Helper()
	r, out, err := e.add(args)
	if err != nil {
		e.t.Fatalf("ADD %s: %v", args.ContainerID, err)
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		e.t.Fatal(err)
	}
	return res, out
}

func (e *testEnv) check(args *skel.CmdArgs) error {
	return e.inHost(func() error {
		return testutils.CmdCheckWithArgs(args, func() error { return Check(args) })
	})
}

func (e *testEnv) del(args *skel.CmdArgs) error {
	return e.inHost(func() error {
		return testutils.CmdDelWithArgs(args, func() error { return Del(args) })
	})
}

func key(args *skel.CmdArgs) api.Key {
	return api.Key{ContainerID: args.ContainerID, IfName: args.IfName}
}

func withPrevResult(e *testEnv, version string, out []byte) []byte {
	return e.conf(version, map[string]any{"prevResult": json.RawMessage(out)})
}

func TestAddCheckDelEveryVersion(t *testing.T) {
	for _, version := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(version, func(t *testing.T) {
			e := newTestEnv(t)
			args := e.args("ctr-"+version, e.conf(version, nil))
			res, out := e.mustAdd(args)

			var printed struct{ CNIVersion string }
			if err := json.Unmarshal(out, &printed); err != nil || printed.CNIVersion != version {
				t.Errorf("result has cniVersion %q (err %v), want %s: %s", printed.CNIVersion, err, version, out)
			}
			ip := netip.MustParseAddr("10.1.0.10")
			e.assertResult(args, res, ip)
			hostIndex := e.assertWired(args, ip, 1400)
			e.assertChainable(args, res, hostIndex)
			allocs, _, _ := e.agent.snapshot()
			if o := allocs[key(args)].Owner; o.PodNamespace != "team-a" || o.PodName != "web-0" || o.Netns != e.cont.Path() {
				t.Errorf("agent got owner %+v, want pod team-a/web-0 in %s", o, e.cont.Path())
			}

			full := withPrevResult(e, version, out)
			if version != "0.3.1" { // CHECK exists from 0.4.0 on
				if err := e.check(e.args(args.ContainerID, full)); err != nil {
					t.Fatalf("CHECK of a fresh attachment: %v", err)
				}
			}

			if err := e.del(e.args(args.ContainerID, full)); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			e.assertGone(args, ip)
			second := e.args(args.ContainerID, full)
			second.Netns = "" // containerd's second DEL, on sandbox removal
			if err := e.del(second); err != nil {
				t.Fatalf("second DEL: %v", err)
			}
			if err := e.del(e.args(args.ContainerID, full)); err != nil {
				t.Fatalf("third DEL: %v", err)
			}

			// The container's netns is removed before DEL, as when a runtime cleans up late.
			gone := newNetNS(t)
			args2 := e.args("ctr2-"+version, e.conf(version, nil))
			args2.Netns = gone.Path()
			_, out2 := e.mustAdd(args2)
			removeNetNS(gone)
			args2.StdinData = withPrevResult(e, version, out2)
			if err := e.del(args2); err != nil {
				t.Fatalf("DEL with CNI_NETNS of a removed netns: %v", err)
			}
			e.assertHostClean(args2, netip.MustParseAddr("10.1.0.11"))
			if err := e.del(args2); err != nil {
				t.Fatalf("DEL again with the netns removed: %v", err)
			}
		})
	}
}

func (e *testEnv) assertResult(args *skel.CmdArgs, res *current.Result, ip netip.Addr) {
	t := e.t
	t.Helper()
	k := key(args)
	wantIfaces := []current.Interface{
		{Name: api.HostVethName(k), Mac: api.HostMAC(k).String()},
		{Name: "eth0", Mac: api.ContainerMAC(k).String(), Sandbox: e.cont.Path()},
	}
	if len(res.Interfaces) != 2 {
		t.Fatalf("result interfaces %v, want 2", res.Interfaces)
	}
	for i, want := range wantIfaces {
		got := *res.Interfaces[i]
		got.Mtu = 0 // only 1.1.0 carries it
		if got != want {
			t.Errorf("result interface %d = %+v, want %+v", i, got, want)
		}
	}
	if len(res.IPs) != 1 || res.IPs[0].Interface == nil || *res.IPs[0].Interface != 1 ||
		res.IPs[0].Address.String() != ip.String()+"/32" || !res.IPs[0].Gateway.Equal(net.IPv4(169, 254, 1, 1)) {
		t.Errorf("result IPs %v, want %s/32 gw 169.254.1.1 on interface 1", res.IPs, ip)
	}
	if len(res.Routes) != 1 || res.Routes[0].Dst.String() != "0.0.0.0/0" || !res.Routes[0].GW.Equal(net.IPv4(169, 254, 1, 1)) {
		t.Errorf("result routes %v, want default via 169.254.1.1", res.Routes)
	}
}

// assertChainable checks what portmap and bandwidth read from prevResult: bandwidth looks
// for an interface without sandbox named like the container interface's veth peer; portmap
// for an IP whose interface has CNI_IFNAME's name and a sandbox.
func (e *testEnv) assertChainable(args *skel.CmdArgs, res *current.Result, hostIndex int) {
	t := e.t
	t.Helper()
	var peer int
	err := e.cont.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(args.IfName)
		if err != nil {
			return err
		}
		peer, err = netlink.VethPeerIndex(l.(*netlink.Veth))
		return err
	})
	if err != nil || peer != hostIndex {
		t.Errorf("container veth peer index %d (err %v), host veth index %d", peer, err, hostIndex)
	}
	if res.Interfaces[0].Sandbox != "" || res.Interfaces[0].Name != api.HostVethName(key(args)) {
		t.Errorf("bandwidth cannot find the host veth in %v", res.Interfaces)
	}
	ipIface := res.Interfaces[*res.IPs[0].Interface]
	if ipIface.Name != args.IfName || ipIface.Sandbox == "" {
		t.Errorf("portmap cannot find the container IP: it points at %+v", ipIface)
	}
}

// assertWired checks both namespaces and the agent, and returns the host veth's ifindex.
func (e *testEnv) assertWired(args *skel.CmdArgs, ip netip.Addr, mtu int) int {
	t := e.t
	t.Helper()
	k := key(args)
	w := newWiring(k, net.IP(ip.AsSlice()), mtu)
	var p problems
	if err := e.cont.Do(func(ns.NetNS) error { w.checkContainer(&p); return nil }); err != nil {
		t.Fatal(err)
	}
	var hostIndex int
	if err := e.inHost(func() error { hostIndex = w.checkHost(&p); return nil }); err != nil {
		t.Fatal(err)
	}
	// checkContainer and checkHost are the code under test too; these independent reads
	// keep the test from trusting them blindly.
	e.cont.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(args.IfName)
		if err != nil || l.Type() != "veth" || l.Attrs().MTU != mtu || !bytes.Equal(l.Attrs().HardwareAddr, api.ContainerMAC(k)) {
			p.addf("container link %v (err %v), want veth mtu %d mac %s", l, err, mtu, api.ContainerMAC(k))
			return nil
		}
		neighs, _ := netlink.NeighList(l.Attrs().Index, netlink.FAMILY_V4)
		if len(neighs) != 1 || neighs[0].State != netlink.NUD_PERMANENT || neighs[0].HardwareAddr.String() != api.HostMAC(k).String() {
			p.addf("container neighbours %v, want one permanent entry for %s", neighs, api.HostMAC(k))
		}
		return nil
	})
	e.inHost(func() error {
		l, err := netlink.LinkByName(api.HostVethName(k))
		if err != nil || l.Attrs().MTU != mtu || l.Attrs().OperState != netlink.OperUp {
			p.addf("host veth %v (err %v), want mtu %d and operationally up", l, err, mtu)
		}
		return nil
	})
	_, endpoints, _ := e.agent.snapshot()
	ep, ok := endpoints[k]
	want := api.EndpointRequest{Owner: ep.Owner, IP: ip, HostIfName: api.HostVethName(k), HostIfIndex: hostIndex,
		HostMAC: api.HostMAC(k).String(), ContainerMAC: api.ContainerMAC(k).String()}
	if !ok || ep.EndpointRequest != want {
		p.addf("agent endpoint %+v (known %v), want %+v", ep.EndpointRequest, ok, want)
	}
	if len(p) > 0 {
		t.Fatalf("attachment %s is not wired:\n%s", k, strings.Join(p, "\n"))
	}
	return hostIndex
}

// assertGone checks that nothing of the attachment is left, in the namespaces or the agent.
func (e *testEnv) assertGone(args *skel.CmdArgs, ip netip.Addr) {
	e.t.Helper()
	e.cont.Do(func(ns.NetNS) error {
		if l, err := netlink.LinkByName(args.IfName); err == nil {
			e.t.Errorf("container still has %s: %+v", args.IfName, l.Attrs())
		}
		return nil
	})
	e.assertHostClean(args, ip)
}

func (e *testEnv) assertHostClean(args *skel.CmdArgs, ip netip.Addr) {
	t := e.t
	t.Helper()
	k := key(args)
	e.inHost(func() error {
		if l, err := netlink.LinkByName(api.HostVethName(k)); err == nil {
			t.Errorf("host still has %s: %+v", api.HostVethName(k), l.Attrs())
		}
		dst := &net.IPNet{IP: net.IP(ip.AsSlice()), Mask: net.CIDRMask(32, 32)}
		if rs, _ := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: dst}, netlink.RT_FILTER_DST); len(rs) > 0 {
			t.Errorf("host still routes %s: %v", dst, rs)
		}
		return nil
	})
	allocs, endpoints, _ := e.agent.snapshot()
	if _, ok := allocs[k]; ok {
		t.Errorf("agent still allocates %v to %s", allocs[k].IP, k)
	}
	if _, ok := endpoints[k]; ok {
		t.Errorf("agent still has endpoint %s", k)
	}
}

// TestAddAsksForTCXWhenEgressIsShaped: the runtime's bandwidth argument with an egress limit
// means a chained bandwidth plugin will put an ingress qdisc on the host veth, so the plugin
// asks the agent for TCX at once; without one (or with only an ingress limit) it does not.
func TestAddAsksForTCXWhenEgressIsShaped(t *testing.T) {
	e := newTestEnv(t)
	for i, c := range []struct {
		bandwidth map[string]any
		want      bool
	}{
		{nil, false},
		{map[string]any{"ingressRate": 1e8, "ingressBurst": 1e7}, false},
		{map[string]any{"egressRate": 1e8, "egressBurst": 1e7}, true},
	} {
		var extra map[string]any
		if c.bandwidth != nil {
			extra = map[string]any{"runtimeConfig": map[string]any{"bandwidth": c.bandwidth}}
		}
		args := e.args(fmt.Sprintf("shaped-%d", i), e.conf("1.1.0", extra))
		e.mustAdd(args)
		_, endpoints, _ := e.agent.snapshot()
		if got := endpoints[key(args)].AttachTCX; got != c.want {
			t.Errorf("bandwidth %v: endpoint request attachTCX %v, want %v", c.bandwidth, got, c.want)
		}
		if err := e.del(args); err != nil { // the next case uses the same container namespace
			t.Fatal(err)
		}
	}
}

func TestCheckReportsDrift(t *testing.T) {
	e := newTestEnv(t)
	args := e.args("drift", e.conf("1.1.0", nil))
	_, out := e.mustAdd(args)
	k := key(args)

	e.cont.Do(func(ns.NetNS) error {
		l, _ := netlink.LinkByName("eth0")
		return netlink.NeighDel(&netlink.Neigh{LinkIndex: l.Attrs().Index, IP: gatewayIP})
	})
	e.inHost(func() error {
		l, _ := netlink.LinkByName(api.HostVethName(k))
		return netlink.LinkSetDown(l)
	})
	e.agent.set(func(f *fakeAgent) { delete(f.endpoints, k) })

	err := e.check(e.args("drift", withPrevResult(e, "1.1.0", out)))
	wantCode(t, err, types.ErrInternal, "permanent neighbour 169.254.1.1", "host veth "+api.HostVethName(k)+" is down", "agent has no endpoint")
}

func TestAddRollsBackWhenAgentRefusesEndpoint(t *testing.T) {
	e := newTestEnv(t)
	e.agent.set(func(f *fakeAgent) {
		f.failPut = &api.Error{Code: api.CodeIOFailure, Msg: "cannot attach from_container: pinned link exists"}
	})
	args := e.args("refused", e.conf("1.1.0", nil))
	_, _, err := e.add(args)
	wantCode(t, err, api.CodeIOFailure, "cannot attach from_container: pinned link exists")
	e.assertGone(args, netip.MustParseAddr("10.1.0.10"))
	if _, _, released := e.agent.snapshot(); len(released) != 1 || released[0] != key(args) {
		t.Errorf("agent released %v, want exactly %v", released, key(args))
	}
}

func TestAddRollsBackWhenContainerSideFails(t *testing.T) {
	e := newTestEnv(t)
	// An eth0 that is not ours makes the veth creation fail inside the container netns.
	var own int
	if err := e.cont.Do(func(ns.NetNS) (err error) { own, err = addForeignLink("eth0"); return err }); err != nil {
		t.Fatal(err)
	}
	args := e.args("taken", e.conf("1.1.0", nil))
	_, _, err := e.add(args)
	wantCode(t, err, types.ErrInternal, "create veth eth0")
	e.cont.Do(func(ns.NetNS) error {
		if l, err := netlink.LinkByName("eth0"); err != nil || l.Attrs().Index != own {
			t.Errorf("the container's own eth0 (ifindex %d) was touched: %v %v", own, l, err)
		}
		return nil
	})
	e.assertHostClean(args, netip.MustParseAddr("10.1.0.10"))
	if _, _, released := e.agent.snapshot(); len(released) != 1 {
		t.Errorf("agent released %v, want the one allocation", released)
	}
}

func TestAddPassesAllocateErrorThrough(t *testing.T) {
	e := newTestEnv(t)
	e.agent.set(func(f *fakeAgent) {
		f.failAlloc = &api.Error{Code: api.CodeTryAgainLater, Msg: "no free address: pool of 16 is exhausted and the NIC is at its limit"}
	})
	args := e.args("empty", e.conf("1.0.0", nil))
	_, _, err := e.add(args)
	wantCode(t, err, api.CodeTryAgainLater, "pool of 16 is exhausted")
	e.assertGone(args, netip.MustParseAddr("10.1.0.10"))
}

func TestSecondAddLeavesFirstIntact(t *testing.T) {
	e := newTestEnv(t)
	args := e.args("twice", e.conf("1.1.0", nil))
	_, out := e.mustAdd(args)
	ip := netip.MustParseAddr("10.1.0.10")
	first := e.assertWired(args, ip, 1400)

	_, _, err := e.add(args)
	wantCode(t, err, types.ErrInvalidEnvironmentVariables, "already attached", "host veth "+api.HostVethName(key(args))+" exists")
	if again := e.assertWired(args, ip, 1400); again != first {
		t.Errorf("host veth ifindex changed from %d to %d", first, again)
	}
	if err := e.check(e.args("twice", withPrevResult(e, "1.1.0", out))); err != nil {
		t.Errorf("CHECK after the refused second ADD: %v", err)
	}

	// With the veth gone by hand the agent's endpoint still owns the address.
	e.inHost(func() error { return deleteLink(api.HostVethName(key(args))) })
	_, _, err = e.add(args)
	wantCode(t, err, types.ErrInvalidEnvironmentVariables, "already attached", "the agent has endpoint")
	if allocs, _, released := e.agent.snapshot(); len(released) != 0 || allocs[key(args)].IP != ip {
		t.Errorf("a refused ADD released %v; allocations %v", released, allocs)
	}
}

// A concurrent ADD for the same key (a runtime bug) creates the host veth after this ADD's
// checks: this ADD must fail without deleting that veth or releasing the shared address.
func TestAddLosingARaceReleasesNothing(t *testing.T) {
	e := newTestEnv(t)
	args := e.args("race", e.conf("1.1.0", nil))
	name := api.HostVethName(key(args))
	var winner int
	e.agent.set(func(f *fakeAgent) {
		f.hook = func(_ http.ResponseWriter, r *http.Request) bool {
			if r.Method == http.MethodPost && r.URL.Path == "/v1/ipam/allocations" {
				err := e.inHost(func() (err error) { winner, err = addForeignLink(name); return err })
				if err != nil {
					t.Errorf("create the winner's %s: %v", name, err)
				}
			}
			return false
		}
	})
	_, _, err := e.add(args)
	wantCode(t, err, types.ErrInvalidEnvironmentVariables, "already attached", "appeared during this ADD")
	e.inHost(func() error {
		if l, err := netlink.LinkByName(name); err != nil || l.Attrs().Index != winner {
			t.Errorf("the winner's %s (ifindex %d) was touched: %v %v", name, winner, l, err)
		}
		return nil
	})
	if allocs, _, released := e.agent.snapshot(); len(released) != 0 || len(allocs) != 1 {
		t.Errorf("losing ADD released %v; allocations %v", released, allocs)
	}
}

func TestAgentDown(t *testing.T) {
	e := newTestEnv(t)
	missing := filepath.Join(filepath.Dir(e.agent.socket), "stopped.sock")
	args := e.args("down", e.conf("1.1.0", map[string]any{"agentSocket": missing}))
	_, _, err := e.add(args)
	wantCode(t, err, api.CodeTryAgainLater, missing)
	e.assertGone(args, netip.MustParseAddr("10.1.0.10"))

	// The agent stops between ADD and DEL: DEL still removes the veth and succeeds, and the
	// address stays allocated for the agent's reconcile to free.
	args = e.args("stopped", e.conf("1.1.0", nil))
	e.mustAdd(args)
	e.agent.stop()
	if err := e.del(args); err != nil {
		t.Fatalf("DEL with the agent down: %v", err)
	}
	e.cont.Do(func(ns.NetNS) error {
		if _, err := netlink.LinkByName("eth0"); err == nil {
			t.Error("container still has eth0")
		}
		return nil
	})
	e.inHost(func() error {
		if _, err := netlink.LinkByName(api.HostVethName(key(args))); err == nil {
			t.Error("host veth still exists")
		}
		return nil
	})
	if allocs, _, _ := e.agent.snapshot(); len(allocs) != 1 {
		t.Errorf("allocations %v: the stopped agent cannot have released anything", allocs)
	}
}

func TestDelReturnsAgentRefusal(t *testing.T) {
	e := newTestEnv(t)
	args := e.args("refuse-del", e.conf("1.1.0", nil))
	e.mustAdd(args)
	e.agent.set(func(f *fakeAgent) {
		f.hook = func(w http.ResponseWriter, r *http.Request) bool {
			if r.Method != http.MethodDelete {
				return false
			}
			reply(w, http.StatusInternalServerError, &api.Error{Code: api.CodeIOFailure, Msg: "state store is read-only"})
			return true
		}
	})
	wantCode(t, e.del(args), api.CodeIOFailure, "state store is read-only")
	e.inHost(func() error {
		if _, err := netlink.LinkByName(api.HostVethName(key(args))); err == nil {
			t.Error("host veth kept although the container is going away")
		}
		return nil
	})
}

func TestLogGoesToFileNotStdout(t *testing.T) {
	e := newTestEnv(t)
	args := e.args("logged", e.conf("1.1.0", nil))
	_, out := e.mustAdd(args)
	if !json.Valid(out) {
		t.Fatalf("stdout is not only the result: %q", out)
	}
	b, err := os.ReadFile(e.logFile)
	if err != nil || !bytes.Contains(b, []byte("msg=added")) || !bytes.Contains(b, []byte("containerID=logged")) {
		t.Errorf("log file %q (err %v) lacks the ADD record", b, err)
	}
}

// addForeignLink creates a link named name in the current netns that the plugin did not
// make (a veth whose peer stays in the same netns: this kernel has no dummy driver) and
// returns its ifindex.
func addForeignLink(name string) (int, error) {
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "foreign0"}
	if err := netlink.LinkAdd(veth); err != nil {
		return 0, err
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return 0, err
	}
	return l.Attrs().Index, nil
}
