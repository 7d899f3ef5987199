package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
	"github.com/vnetbpf/vnetbpf/pkg/agent"
)

// nsHTTPClient is an HTTP client whose connections are opened inside n, so that it reaches
// addresses, loopback included, as a process in that namespace would.
func nsHTTPClient(n ns.NetNS) *http.Client {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var conn net.Conn
		err := n.Do(func(ns.NetNS) error {
			var err error
			conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return conn, err
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
}

func httpGet(t *testing.T, client *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// metricValue finds the sample `name{labels} value` in Prometheus text output; labels is
// written as in the exposition, e.g. `reason="fwd_local"`, or empty for none.
func metricValue(text, name, labels string) (float64, bool) {
	series := name
	if labels != "" {
		series += "{" + labels + "}"
	}
	for _, line := range strings.Split(text, "\n") {
		v, ok := strings.CutPrefix(line, series+" ")
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(strings.Fields(v)[0], 64)
		return f, err == nil
	}
	return 0, false
}

// TestAgentMetrics scrapes the agent's metrics endpoint on the node's loopback, as a
// Prometheus agent on the node would: health, readiness, datapath counters, pool gauges and
// API latency.
func TestAgentMetrics(t *testing.T) {
	const addr = "127.0.0.1:9962"
	c := newClusterWith(t, "10.0.1.0/29", func(cfg *agent.Config) { cfg.MetricsAddr = addr })
	client := nsHTTPClient(c.node.NS)
	base := "http://" + addr

	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := httpGet(t, client, base+path); code != http.StatusOK {
			t.Errorf("GET %s: %d %q, want 200", path, code, body)
		}
	}
	cniNet := c.cni("1.1.0")
	a := c.mustAdd(cniNet, "a")
	b := c.mustAdd(cniNet, "b")
	const pings = 5
	if n, err := Ping(a.ns, b.ip, pings, time.Millisecond, time.Second); err != nil || n != pings {
		t.Fatalf("a -> b: %d of %d replies (%v)", n, pings, err)
	}

	code, text := httpGet(t, client, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d\n%s", code, text)
	}
	// Each echo request and each reply crossed from one container to the other.
	if v, ok := metricValue(text, "vnetbpf_datapath_packets_total", `reason="fwd_local"`); !ok || v < 2*pings {
		t.Errorf(`vnetbpf_datapath_packets_total{reason="fwd_local"} = %v (found %v), want >= %d after %d pings between containers`, v, ok, 2*pings, pings)
	}
	// An echo frame is at least Ethernet, IPv4 and ICMP headers: 42 bytes.
	if v, ok := metricValue(text, "vnetbpf_datapath_bytes_total", `reason="fwd_local"`); !ok || v < 2*pings*42 {
		t.Errorf(`vnetbpf_datapath_bytes_total{reason="fwd_local"} = %v (found %v), want >= %d`, v, ok, 2*pings*42)
	}
	for state, want := range map[string]float64{"allocated": 2, "free": 4, "cooling": 0} {
		if v, ok := metricValue(text, "vnetbpf_ipam_addresses", fmt.Sprintf("state=%q", state)); !ok || v != want {
			t.Errorf(`vnetbpf_ipam_addresses{state=%q} = %v (found %v), want %v`, state, v, ok, want)
		}
	}
	if v, ok := metricValue(text, "vnetbpf_endpoints", ""); !ok || v != 2 {
		t.Errorf("vnetbpf_endpoints = %v (found %v), want 2", v, ok)
	}
	// The two new veths move from cls_bpf to TCX once no CNI call runs.
	testutils.Eventually(t, 10*time.Second, "vnetbpf_endpoints_on_cls_bpf to reach 0", func() error {
		_, text := httpGet(t, client, base+"/metrics")
		if v, ok := metricValue(text, "vnetbpf_endpoints_on_cls_bpf", ""); !ok || v != 0 {
			return fmt.Errorf("vnetbpf_endpoints_on_cls_bpf = %v (found %v)", v, ok)
		}
		return nil
	})
	// Two ADDs each allocated an address and registered an endpoint through the API.
	for method, route := range map[string]string{"POST": "/v1/ipam/allocations", "PUT": "/v1/endpoints/{containerID}/{ifName}"} {
		bucket := fmt.Sprintf(`vnetbpf_api_request_duration_seconds_bucket{code="200",method=%q,route=%q,le="+Inf"}`, method, route)
		if v, ok := metricValue(text, bucket, ""); !ok || v < 2 {
			t.Errorf("%s = %v (found %v), want >= 2 after two ADDs", bucket, v, ok)
		}
	}
	if !strings.Contains(text, "\nvnetbpf_api_request_duration_seconds_bucket{") {
		t.Errorf("/metrics has no vnetbpf_api_request_duration_seconds_bucket lines")
	}

	// A DEL shows in the gauges at the next scrape.
	if err := cniNet.Del(t.Context(), b.rt); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	_, text = httpGet(t, client, base+"/metrics")
	if v, ok := metricValue(text, "vnetbpf_ipam_addresses", `state="allocated"`); !ok || v != 1 {
		t.Errorf(`vnetbpf_ipam_addresses{state="allocated"} = %v after one DEL, want 1`, v)
	}
}
