package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/agent"
	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// linkMAC is the MAC of dev in namespace n.
func linkMAC(t *testing.T, n ns.NetNS, dev string) string {
	t.Helper()
	var m string
	testutils.Do(t, n, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		m = l.Attrs().HardwareAddr.String()
		return nil
	})
	return m
}

// tableRow finds the row of a table whose first column is first and splits it into columns.
func tableRow(out, first string) []string {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && f[0] == first {
			return f
		}
	}
	return nil
}

// TestAgentCLIStatus runs `vnetbpf-agent status` in both formats against a live agent.
func TestAgentCLIStatus(t *testing.T) {
	c := newClusterWith(t, "10.0.1.0/29", func(cfg *agent.Config) {})
	cli := NewAgentCLI(c.agent)
	c.mustAdd(c.cni("1.1.0"), "a")

	out, err := cli.Run(t.Context(), "status", "-o", "json")
	must(t, err)
	var s api.Status
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("status -o json is not a Status: %v\n%s", err, out)
	}
	if !s.Ready || !s.CanAllocate || s.Endpoints != 1 || s.NIC != "eth0" || s.Pool.Used != 1 || s.Pool.Free != s.Pool.Size-1 || s.Pool.Size == 0 {
		t.Errorf("status -o json: %+v, want ready, able to allocate, 1 endpoint on eth0, 1 of the pool used", s)
	}

	out, err = cli.Run(t.Context(), "status")
	must(t, err)
	t.Logf("vnetbpf-agent status:\n%s", out)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^Ready:\s+true$`),
		regexp.MustCompile(`(?m)^NIC:\s+eth0$`),
		regexp.MustCompile(`(?m)^Endpoints:\s+1$`),
		regexp.MustCompile(fmt.Sprintf(`(?m)^Pool \(static\):\s+%d addresses, 1 allocated, %d free, 0 cooling$`, s.Pool.Size, s.Pool.Size-1)),
		regexp.MustCompile(`(?m)^Can allocate:\s+yes$`),
		regexp.MustCompile(`(?m)^Attach mode:\s+\S+`),
	} {
		if !want.MatchString(out) {
			t.Errorf("status output lacks %s:\n%s", want, out)
		}
	}

	// With the agent gone the tool says so and fails, rather than printing an empty status.
	must(t, c.agent.Stop())
	if out, err := cli.Run(t.Context(), "status"); err == nil || !strings.Contains(err.Error(), c.agent.Config.Socket) {
		t.Errorf("status with the agent stopped: err %v, output %q; want a failure naming the socket", err, out)
	}
}

// TestAgentCLIEndpoints runs `vnetbpf-agent endpoints list` after traffic: every endpoint
// with its owner, address, veth, MACs and packet counts.
func TestAgentCLIEndpoints(t *testing.T) {
	c := newClusterWith(t, "10.0.1.0/29", func(cfg *agent.Config) {})
	cli := NewAgentCLI(c.agent)
	cniNet := c.cni("1.1.0")
	a := c.mustAdd(cniNet, "ctr-a")
	b := c.mustAdd(cniNet, "ctr-b")
	expectPing(t, "a -> b", a.ns, b.ip)
	expectPing(t, "b -> fabric gateway", b.ns, c.fabric.Gateway)

	out, err := cli.Run(t.Context(), "endpoints", "list", "-o", "json")
	must(t, err)
	var eps []api.Endpoint
	if err := json.Unmarshal([]byte(out), &eps); err != nil {
		t.Fatalf("endpoints list -o json is not a list of endpoints: %v\n%s", err, out)
	}
	if len(eps) != 2 {
		t.Fatalf("endpoints list -o json has %d endpoints, want 2:\n%s", len(eps), out)
	}
	table, err := cli.Run(t.Context(), "endpoints", "list")
	must(t, err)
	t.Logf("vnetbpf-agent endpoints list:\n%s", table)
	if hdr := strings.Fields(strings.SplitN(table, "\n", 2)[0]); strings.Join(hdr, " ") != "CONTAINER IFNAME POD IP HOST VETH CONTAINER MAC HOST MAC RX PKTS TX PKTS" {
		t.Errorf("endpoints list header: %q", hdr)
	}
	for _, ctr := range []*container{a, b} {
		var ep *api.Endpoint
		for i := range eps {
			if eps[i].ContainerID == ctr.id {
				ep = &eps[i]
			}
		}
		if ep == nil {
			t.Errorf("no endpoint for %s in:\n%s", ctr.id, out)
			continue
		}
		hostVeth := api.HostVethName(api.Key{ContainerID: ctr.id, IfName: "eth0"})
		want := api.Endpoint{EndpointRequest: api.EndpointRequest{
			Owner: api.Owner{Key: api.Key{ContainerID: ctr.id, IfName: "eth0"}, PodNamespace: "default", PodName: "pod-" + ctr.id},
			IP:    ctr.ip, HostIfName: hostVeth,
			HostMAC: linkMAC(t, c.node.NS, hostVeth), ContainerMAC: linkMAC(t, ctr.ns, "eth0"),
		}}
		got := *ep
		if got.Owner.Key != want.Owner.Key || got.PodNamespace != want.PodNamespace || got.PodName != want.PodName ||
			got.IP != want.IP || got.HostIfName != want.HostIfName || got.HostMAC != want.HostMAC || got.ContainerMAC != want.ContainerMAC {
			t.Errorf("endpoint %s:\n got %+v\nwant %+v", ctr.id, got.EndpointRequest, want.EndpointRequest)
		}
		// Both sent pings and both received replies.
		if got.RxPackets == 0 || got.TxPackets == 0 {
			t.Errorf("endpoint %s counts rx %d tx %d after traffic both ways, want both > 0", ctr.id, got.RxPackets, got.TxPackets)
		}

		row := tableRow(table, ctr.id)
		wantRow := []string{ctr.id, "eth0", "default/pod-" + ctr.id, ctr.ip.String(), hostVeth, want.ContainerMAC, want.HostMAC,
			fmt.Sprint(got.RxPackets), fmt.Sprint(got.TxPackets)}
		// The counts may have grown between the two calls; compare them as "at least".
		if len(row) != len(wantRow) || strings.Join(row[:7], " ") != strings.Join(wantRow[:7], " ") ||
			atoi(row[7]) < got.RxPackets || atoi(row[8]) < got.TxPackets {
			t.Errorf("endpoints list row for %s:\n got %q\nwant %q", ctr.id, row, wantRow)
		}
	}

	// A long container ID is shortened to 12 characters in the table, as docker and crictl do.
	long := c.mustAdd(cniNet, "0123456789abcdef0123456789abcdef")
	table, err = cli.Run(t.Context(), "endpoints", "list")
	must(t, err)
	if row := tableRow(table, "0123456789ab"); row == nil || row[3] != long.ip.String() {
		t.Errorf("endpoints list has no row for the long container ID shortened to 0123456789ab:\n%s", table)
	}
}

func atoi(s string) uint64 {
	var n uint64
	fmt.Sscan(s, &n)
	return n
}

// TestAgentCLIIPAMShow runs `vnetbpf-agent ipam show` with a cooldown: every address of the
// pool, allocated (to whom), cooling (until when) or free.
func TestAgentCLIIPAMShow(t *testing.T) {
	c := newClusterWith(t, "10.0.1.0/29", func(cfg *agent.Config) { cfg.IPAM.Cooldown.Duration = time.Hour })
	cli := NewAgentCLI(c.agent)
	cniNet := c.cni("1.1.0")
	a := c.mustAdd(cniNet, "kept")
	b := c.mustAdd(cniNet, "gone")
	if err := cniNet.Del(t.Context(), b.rt); err != nil {
		t.Fatalf("DEL %s: %v", b.id, err)
	}

	out, err := cli.Run(t.Context(), "ipam", "show", "-o", "json")
	must(t, err)
	var p api.PoolState
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatalf("ipam show -o json is not a PoolState: %v\n%s", err, out)
	}
	// The static provider takes every address of the CIDR but the network and broadcast ones.
	if p.Provider != "static" || p.Size != 6 || len(p.Addresses) != p.Size || p.Used != 1 || p.Cooling != 1 || p.Free != 4 {
		t.Errorf("ipam show -o json: provider %q, size %d, %d listed, used %d, cooling %d, free %d; want static, 6, 6, 1, 1, 4",
			p.Provider, p.Size, len(p.Addresses), p.Used, p.Cooling, p.Free)
	}
	table, err := cli.Run(t.Context(), "ipam", "show")
	must(t, err)
	t.Logf("vnetbpf-agent ipam show:\n%s", table)
	if !strings.Contains(table, fmt.Sprintf("provider static: %d addresses, 1 allocated, 4 free, 1 cooling", p.Size)) {
		t.Errorf("ipam show summary line missing:\n%s", table)
	}
	for _, addr := range p.Addresses {
		row := tableRow(table, addr.IP.String())
		switch addr.IP {
		case a.ip:
			if addr.State != "allocated" || addr.Owner == nil || addr.Owner.ContainerID != a.id || addr.Owner.PodName != "pod-kept" {
				t.Errorf("%s (container %s): %+v, want allocated to it", addr.IP, a.id, addr)
			}
			if strings.Join(row, " ") != fmt.Sprintf("%s allocated kept eth0 default/pod-kept", a.ip) {
				t.Errorf("ipam show row for %s: %q", a.ip, row)
			}
		case b.ip:
			// The address rests for the cooldown, about an hour from the DEL.
			until := time.Until(addr.CoolingUntil)
			if addr.State != "cooling" || addr.Owner != nil || until < 59*time.Minute || until > time.Hour {
				t.Errorf("%s (deleted container %s): %+v, want cooling for about an hour", addr.IP, b.id, addr)
			}
			want := fmt.Sprintf("%s cooling %s", b.ip, addr.CoolingUntil.Local().Format(time.TimeOnly))
			if strings.Join(row, " ") != want {
				t.Errorf("ipam show row for %s: %q, want %q", b.ip, row, want)
			}
		default:
			if addr.State != "free" || addr.Owner != nil {
				t.Errorf("%s: %+v, want free", addr.IP, addr)
			}
			if strings.Join(row, " ") != addr.IP.String()+" free" {
				t.Errorf("ipam show row for %s: %q", addr.IP, row)
			}
		}
	}

	// The cooling address is not handed out again: the next ADD gets a never-used one.
	d := c.mustAdd(cniNet, "next")
	if d.ip == b.ip {
		t.Errorf("ADD after DEL got %s, which is cooling down", d.ip)
	}
	st, err := cli.Run(t.Context(), "status")
	must(t, err)
	if !strings.Contains(st, "2 allocated, 3 free, 1 cooling") {
		t.Errorf("status after a second ADD:\n%s", st)
	}
}

// TestAgentCLIMonitor runs `vnetbpf-agent monitor` while a container sends a packet with a
// forged source: the drop is printed with its reason, interface and 5-tuple.
func TestAgentCLIMonitor(t *testing.T) {
	c := newClusterWith(t, "10.0.1.0/29", func(cfg *agent.Config) {})
	cli := NewAgentCLI(c.agent)
	a := c.mustAdd(c.cni("1.1.0"), "spoofer")
	hostVeth := api.HostVethName(api.Key{ContainerID: a.id, IfName: "eth0"})
	forged := netip.MustParseAddr("10.0.9.9")
	const port = 4789

	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			mon, err := cli.Start("monitor", "-o", format)
			must(t, err)
			stopped := false
			t.Cleanup(func() {
				if !stopped {
					mon.Stop(5 * time.Second)
				}
			})
			// monitor subscribes asynchronously; a packet sent before it has subscribed is not
			// reported, so send one every 100 ms until its line shows up. Other drops may come
			// first (a new container's IPv6 router solicitations are DROP_UNSUPPORTED).
			var line string
			var others []string
			deadline := time.After(10 * time.Second)
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
		wait:
			for {
				select {
				case l, ok := <-mon.Lines():
					if !ok {
						t.Fatalf("monitor exited; stderr: %s", mon.Stderr())
					}
					if strings.Contains(l, "DROP_SPOOFED_IP") {
						line = l
						break wait
					}
					others = append(others, l)
				case <-tick.C:
					must(t, SendSpoofedUDP(a.ns, forged, c.fabric.Gateway, port))
				case <-deadline:
					t.Fatalf("no DROP_SPOOFED_IP printed within 10s of spoofed packets; other lines %q; stderr: %s\nagent log:\n%s",
						others, mon.Stderr(), c.agent.Tail(20))
				}
			}
			t.Logf("monitor -o %s: %s (after %d other drops: %q)", format, line, len(others), others)
			switch format {
			case "text":
				tuple := fmt.Sprintf("udp %s:12345 -> %s:%d", forged, c.fabric.Gateway, port)
				if !strings.Contains(line, " DROP_SPOOFED_IP ") || !strings.Contains(line, tuple) || !strings.Contains(line, hostVeth+"(") ||
					!strings.Contains(line, "src-mac "+linkMAC(t, a.ns, "eth0")) {
					t.Errorf("monitor line %q, want DROP_SPOOFED_IP on %s with %s from the container's MAC", line, hostVeth, tuple)
				}
			case "json":
				var ev api.DropEvent
				if err := json.Unmarshal([]byte(line), &ev); err != nil {
					t.Fatalf("monitor -o json line is not a DropEvent: %v: %q", err, line)
				}
				if ev.Reason != "DROP_SPOOFED_IP" || ev.Protocol != 17 || ev.Src != forged || ev.Dst != c.fabric.Gateway ||
					ev.SrcPort != 12345 || ev.DstPort != port || ev.IfName != hostVeth || ev.Time.IsZero() {
					t.Errorf("monitor event %+v, want DROP_SPOOFED_IP udp %s:12345 -> %s:%d on %s", ev, forged, c.fabric.Gateway, port, hostVeth)
				}
			}
			stopped = true
			if err := mon.Stop(5 * time.Second); err != nil {
				t.Errorf("monitor on Ctrl-C: %v; stderr: %s", err, mon.Stderr())
			}
		})
	}
}
