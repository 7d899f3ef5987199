package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/vnetbpf/vnetbpf/bench/compare"
	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/bench/topology"
	"github.com/vnetbpf/vnetbpf/bench/traffic"
)

// datapathResult is the side-by-side comparison.
type datapathResult struct {
	Reps          int    `json:"reps"`
	RRSeconds     int    `json:"rrSeconds"`
	StreamSeconds int    `json:"streamSeconds"`
	UDPSeconds    int    `json:"udpSeconds"`
	CPU           int    `json:"cpu"`
	Method        string `json:"method"`
	Scopes        []scopeResult
}

type scopeResult struct {
	Scope string   `json:"scope"`
	Modes []string `json:"modes"`
	// Raw per-repetition results, by mode.
	RR     map[string][]traffic.RR     `json:"rr"`
	UDP    map[string][]traffic.UDP    `json:"udp"`
	Stream map[string][]traffic.Stream `json:"stream"`
	// Summaries.
	Transactions []compare.Row         `json:"transactionsPerSec"`
	RROverhead   []compare.OverheadRow `json:"rrOverheadOverDirect"`
	// RRCPU is CPU µs per transaction, and RRCPUOverhead its excess over direct: the same
	// comparison, unaffected by other load on the CPU.
	RRCPU         []compare.Row         `json:"rrCPUUsPerTransaction"`
	RRCPUOverhead []compare.OverheadRow `json:"rrCPUOverheadOverDirect"`
	// RROverheadFabric is the overhead over node-to-node traffic through the fabric, which
	// takes the fabric's own hop out (across nodes only).
	RROverheadFabric []compare.OverheadRow `json:"rrOverheadOverFabric,omitempty"`
	UDPReceived      []compare.Row         `json:"udpReceivedPPS"`
	UDPOverhead      []compare.OverheadRow `json:"udpOverheadOverDirect"`
	// UDPSenderNs is the sender's CPU ns per datagram, and UDPSenderOverhead its excess
	// over direct.
	UDPSenderNs       []compare.Row         `json:"udpSenderNsPerPacket"`
	UDPSenderOverhead []compare.OverheadRow `json:"udpSenderOverheadOverDirect"`
	Gbps              []compare.Row         `json:"gbps"`
	CPUPerGB          []compare.Row         `json:"cpuSecPerGB"`
}

const datapathMethod = "Client and server pinned to one CPU (taskset), so a rate is the inverse of the CPU time " +
	"the whole path costs. Request/response: qperf tcp_lat, 64-byte messages, transactions/s = 1/(2 x one-way latency). " +
	"UDP: qperf udp_bw, 64-byte datagrams counted at the receiving socket. Throughput: iperf3, one TCP stream; " +
	"CPU s/GB from the CPU time of the iperf3 client and server and of the CPU's ksoftirqd. Modes interleaved " +
	"(every mode once per metric per repetition); medians over repetitions; ratios are ratios of medians; " +
	"overhead = 1e6/rate(mode) - 1e6/rate(direct) within each repetition, in microseconds."

func runDatapath(ctx context.Context, reg *resources.Registry, workDir, pluginsDir string, s settings) (*datapathResult, error) {
	env, err := topology.Build(ctx, topology.Options{Reg: reg, WorkDir: workDir, PluginsDir: pluginsDir, Progress: step})
	if err != nil {
		return nil, err
	}
	defer env.Close()

	servers := map[string]*traffic.Server{}
	defer func() {
		for _, sv := range servers {
			sv.Stop()
		}
	}()
	step("starting qperf and iperf3 servers on CPU %d in every server namespace", s.CPU)
	for _, p := range env.Pairs {
		if _, ok := servers[p.Server.Name]; ok {
			continue
		}
		sv, err := traffic.StartServer(reg, p.Server, p.Client, s.CPU)
		if err != nil {
			return nil, err
		}
		servers[p.Server.Name] = sv
	}

	res := &datapathResult{Reps: s.Reps, RRSeconds: s.RRSeconds, StreamSeconds: s.StreamSeconds, UDPSeconds: s.UDPSeconds, CPU: s.CPU, Method: datapathMethod}
	byScope := map[topology.Scope]*scopeResult{}
	for _, scope := range []topology.Scope{topology.SameNode, topology.AcrossNodes} {
		sr := &scopeResult{Scope: string(scope), RR: map[string][]traffic.RR{}, UDP: map[string][]traffic.UDP{}, Stream: map[string][]traffic.Stream{}}
		for _, p := range env.Pairs {
			if p.Scope == scope {
				sr.Modes = append(sr.Modes, string(p.Mode))
			}
		}
		byScope[scope] = sr
	}

	for rep := 1; rep <= s.Reps; rep++ {
		for _, metric := range []string{"request/response", "TCP stream", "64-byte UDP"} {
			var line []string
			for _, p := range env.Pairs {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				sr := byScope[p.Scope]
				mode := string(p.Mode)
				var show string
				err := retryOnce(func() error {
					switch metric {
					case "request/response":
						r, err := traffic.RunRR(ctx, p, servers[p.Server.Name], s.CPU, time.Duration(s.RRSeconds)*time.Second)
						if err == nil {
							sr.RR[mode] = append(sr.RR[mode], r)
							show = fmt.Sprintf("%.0fk/s", r.TransactionsPerSec/1e3)
						}
						return err
					case "TCP stream":
						r, err := traffic.RunStream(ctx, p, servers[p.Server.Name], s.CPU, time.Duration(s.StreamSeconds)*time.Second)
						if err == nil {
							sr.Stream[mode] = append(sr.Stream[mode], r)
							show = fmt.Sprintf("%.1fGb/s", r.Gbps)
						}
						return err
					default:
						r, err := traffic.RunUDP(ctx, p, s.CPU, time.Duration(s.UDPSeconds)*time.Second)
						if err == nil {
							sr.UDP[mode] = append(sr.UDP[mode], r)
							show = fmt.Sprintf("%.0fkpps", r.ReceivedPPS/1e3)
						}
						return err
					}
				})
				if err != nil {
					return nil, fmt.Errorf("%s, %s, repetition %d: %w", metric, p.Label(), rep, err)
				}
				line = append(line, fmt.Sprintf("%s/%s %s", p.Mode, shortScope(p.Scope), show))
			}
			step("datapath %d/%d %s: %s", rep, s.Reps, metric, strings.Join(line, ", "))
		}
	}
	for _, scope := range []topology.Scope{topology.SameNode, topology.AcrossNodes} {
		sr := byScope[scope]
		summarizeScope(sr)
		res.Scopes = append(res.Scopes, *sr)
	}
	return res, nil
}

// retryOnce runs fn again if it fails once: a tool can time out on a busy machine; twice in
// a row is a broken run.
func retryOnce(fn func() error) error {
	if err := fn(); err != nil {
		step("retrying after: %v", err)
		return fn()
	}
	return nil
}

func shortScope(s topology.Scope) string {
	if s == topology.SameNode {
		return "node"
	}
	return "x-node"
}

func summarizeScope(sr *scopeResult) {
	tps, udp, gbps, cpu := compare.Samples{}, compare.Samples{}, compare.Samples{}, compare.Samples{}
	rrCPU, udpNs := compare.Samples{}, compare.Samples{}
	for m, rs := range sr.RR {
		for _, r := range rs {
			tps[m] = append(tps[m], r.TransactionsPerSec)
			rrCPU[m] = append(rrCPU[m], r.CPUUsPerTransaction)
		}
	}
	for m, us := range sr.UDP {
		for _, u := range us {
			udp[m] = append(udp[m], u.ReceivedPPS)
			udpNs[m] = append(udpNs[m], u.SenderNsPerPacket)
		}
	}
	for m, ss := range sr.Stream {
		for _, st := range ss {
			gbps[m] = append(gbps[m], st.Gbps)
			cpu[m] = append(cpu[m], st.CPUSecPerGB)
		}
	}
	sr.Transactions = compare.Rows(tps, sr.Modes, true)
	sr.RROverhead = compare.Overheads(tps, sr.Modes, compare.Direct)
	if _, ok := tps[string(topology.Fabric)]; ok {
		plugins := []string{string(topology.VNetBPF), string(topology.PTP), string(topology.Bridge), string(topology.Fabric)}
		sr.RROverheadFabric = compare.Overheads(tps, plugins, string(topology.Fabric))
	}
	sr.RRCPU = compare.Rows(rrCPU, sr.Modes, false)
	sr.RRCPUOverhead = compare.CostOverheads(rrCPU, sr.Modes, compare.Direct)
	sr.UDPReceived = compare.Rows(udp, sr.Modes, true)
	sr.UDPOverhead = compare.Overheads(udp, sr.Modes, compare.Direct)
	sr.UDPSenderNs = compare.Rows(udpNs, sr.Modes, false)
	sr.UDPSenderOverhead = compare.CostOverheads(udpNs, sr.Modes, compare.Direct)
	sr.Gbps = compare.Rows(gbps, sr.Modes, true)
	sr.CPUPerGB = compare.Rows(cpu, sr.Modes, false)
}
