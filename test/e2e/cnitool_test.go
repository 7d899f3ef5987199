package e2e

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vnetbpf/vnetbpf/pkg/agent"
	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// newCNITool sets up cnitool for c's network "vnet": the conflist in a NETCONFPATH of its own,
// the vnetbpf plugin (and the upstream ones) on CNI_PATH, and a private result cache.
func newCNITool(t *testing.T, c *cluster, tools Tools) *CNITool {
	t.Helper()
	confDir := filepath.Join(c.dir, "net.d")
	must(t, os.MkdirAll(confDir, 0o755))
	must(t, os.WriteFile(filepath.Join(confDir, "10-vnet.conflist"), c.conflist("1.1.0"), 0o644))
	return &CNITool{Bin: tools.CNITool, Node: c.node, NetConfDir: confDir,
		Path: []string{c.bin, tools.PluginsDir}, CacheDir: filepath.Join(c.dir, "cnitool-cache")}
}

func upstreamTools(t *testing.T) Tools {
	t.Helper()
	tools, err := UpstreamTools()
	if err != nil {
		t.Fatal(err)
	}
	return tools
}

// agentEndpoint returns the agent's endpoint for containerID, or nil.
func agentEndpoint(t *testing.T, a *Agent, containerID string) *api.Endpoint {
	t.Helper()
	eps, err := a.Client().Endpoints(context.Background())
	must(t, err)
	for i := range eps {
		if eps[i].ContainerID == containerID {
			return &eps[i]
		}
	}
	return nil
}

// TestCNITool drives the plugin with upstream cnitool, the CNI project's own command-line
// runtime, against a real agent: add, check, status, del and gc.
func TestCNITool(t *testing.T) {
	tools := upstreamTools(t)
	c := newClusterWith(t, "10.0.1.0/29", func(cfg *agent.Config) {})
	tool := newCNITool(t, c, tools)
	ctx := t.Context()
	podArgs := []string{"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=tools;K8S_POD_NAME=by-cnitool"}

	if _, _, err := tool.Run(ctx, nil, "status", "vnet", "/dev/null"); err != nil {
		t.Errorf("status with a free pool: %v", err)
	}

	ctrNS := c.newNetns()
	id := CNIToolContainerID(ctrNS.Path())
	out, _, err := tool.Run(ctx, podArgs, "add", "vnet", ctrNS.Path())
	if err != nil {
		t.Fatalf("add: %v\nagent log:\n%s", err, c.agent.Tail(20))
	}
	var res current.Result
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.IPs) != 1 {
		t.Fatalf("add printed %q (%v), want a result with one IP", out, err)
	}
	ip, _ := netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
	if !c.pool.Contains(ip) || res.IPs[0].Address.String() != ip.String()+"/32" || res.IPs[0].Gateway.String() != api.GatewayIP.String() {
		t.Errorf("add result IP %s gateway %s, want a /32 from %s through %s", res.IPs[0].Address.String(), res.IPs[0].Gateway, c.pool, api.GatewayIP)
	}
	// cnitool kept the result where CHECK and DEL will look for it: in this test's cache.
	cached := filepath.Join(tool.CacheDir, "cni", "results", "vnet-"+id+"-eth0")
	if _, err := os.Stat(cached); err != nil {
		t.Errorf("cnitool's cached result: %v", err)
	}
	expectPing(t, "container -> fabric gateway", ctrNS, c.fabric.Gateway)
	ep := agentEndpoint(t, c.agent, id)
	if ep == nil || ep.IP != ip || ep.PodNamespace != "tools" || ep.PodName != "by-cnitool" || ep.Netns != ctrNS.Path() {
		t.Errorf("agent endpoint for %s: %s, want %s for tools/by-cnitool in %s", id, describe(ep), ip, ctrNS.Path())
	}

	if _, _, err := tool.Run(ctx, nil, "check", "vnet", ctrNS.Path()); err != nil {
		t.Errorf("check: %v", err)
	}
	if _, _, err := tool.Run(ctx, nil, "status", "vnet", ctrNS.Path()); err != nil {
		t.Errorf("status with free addresses: %v", err)
	}

	if _, _, err := tool.Run(ctx, nil, "del", "vnet", ctrNS.Path()); err != nil {
		t.Fatalf("del: %v", err)
	}
	if ep := agentEndpoint(t, c.agent, id); ep != nil {
		t.Errorf("agent still has endpoint %s after del", describe(ep))
	}
	if hostVethExists(t, c.node, api.HostVethName(api.Key{ContainerID: id, IfName: "eth0"})) {
		t.Error("host veth still exists after del")
	}
	if _, _, err := tool.Run(ctx, nil, "del", "vnet", ctrNS.Path()); err != nil {
		t.Errorf("second del: %v", err)
	}
	if _, err := os.Stat(cached); !os.IsNotExist(err) {
		t.Errorf("cnitool's cached result %s after del: %v, want it gone", cached, err)
	}
	// Nothing is attached any more, so a CHECK has nothing to vouch for.
	if _, _, err := tool.Run(ctx, nil, "check", "vnet", ctrNS.Path()); err == nil {
		t.Error("check after del succeeded")
	} else {
		t.Logf("check after del: %v", err)
	}
	pool, err := c.agent.Client().Pool(ctx)
	must(t, err)
	if pool.Used != 0 {
		t.Errorf("%d addresses in use after del, want 0", pool.Used)
	}

	t.Run("gc", func(t *testing.T) { testCNIToolGC(t, c, tool) })
}

// testCNIToolGC: `cnitool gc` (v1.3.1) means "no attachment is valid any more". libcni first
// DELs every attachment in cnitool's cache, then sends GC to the plugin, but without the
// cni.dev/valid-attachments key the spec requires (cnitool passes no GCArgs). The plugin
// refuses to read a missing list as "nothing is valid", which would release every address
// of the node, so an attachment cnitool never cached survives and cnitool gc fails; an
// explicit empty list, as libcni sends it for a runtime with no attachments, releases it.
func testCNIToolGC(t *testing.T, c *cluster, tool *CNITool) {
	ctx := t.Context()
	cached := c.newNetns()
	if _, _, err := tool.Run(ctx, nil, "add", "vnet", cached.Path()); err != nil {
		t.Fatalf("add: %v", err)
	}
	cachedID := CNIToolContainerID(cached.Path())
	libcniNet := c.cni("1.1.0") // a cache of its own: another runtime, as far as cnitool knows
	other := c.mustAdd(libcniNet, "not-in-cnitool-cache")
	before, err := c.agent.Client().Pool(ctx)
	must(t, err)
	if before.Used != 2 {
		t.Fatalf("%d addresses in use before gc, want 2", before.Used)
	}

	_, _, err = tool.Run(ctx, nil, "gc", "vnet", "/dev/null")
	if err == nil || !strings.Contains(err.Error(), "cni.dev/valid-attachments") {
		t.Errorf("cnitool gc without valid attachments: %v, want the plugin's refusal naming cni.dev/valid-attachments", err)
	}
	if ep := agentEndpoint(t, c.agent, cachedID); ep != nil {
		t.Errorf("cnitool gc left the endpoint of the attachment in its cache: %s", describe(ep))
	}
	if ep := agentEndpoint(t, c.agent, other.id); ep == nil {
		t.Errorf("the plugin's GC released %s although the runtime sent no list of valid attachments", other.id)
	}
	expectPing(t, "the attachment cnitool did not know -> gateway", other.ns, c.fabric.Gateway)

	// A runtime with an empty cache, so that libcni DELs nothing itself and only the
	// plugin's GC can release the attachment.
	fresh, err := NewCNI(c.node, c.conflist("1.1.0"), filepath.Join(c.dir, "empty-cache"), c.bin)
	must(t, err)
	if err := fresh.GC(ctx, nil); err != nil { // "cni.dev/valid-attachments": null
		t.Fatalf("GC with an empty list of valid attachments: %v", err)
	}
	if ep := agentEndpoint(t, c.agent, other.id); ep != nil {
		t.Errorf("GC with no valid attachments left %s", describe(ep))
	}
	after, err := c.agent.Client().Pool(ctx)
	must(t, err)
	if after.Used != 0 {
		t.Errorf("%d addresses in use after GC with no valid attachments, want 0", after.Used)
	}
	if _, _, err := tool.Run(ctx, nil, "status", "vnet", "/dev/null"); err != nil {
		t.Errorf("status after gc: %v", err)
	}
}

// describe prints an endpoint in full: %v would print only the Key it embeds, whose String
// method is promoted.
func describe(ep *api.Endpoint) string {
	if ep == nil {
		return "<nil>"
	}
	b, _ := json.Marshal(ep)
	return string(b)
}
