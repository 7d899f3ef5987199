// Package traffic runs the traffic tools between two network namespaces, with client and
// server pinned to the same CPU so that a rate is the inverse of the CPU cost of one
// transaction, packet or byte along the whole path:
//
//   - request/response: qperf tcp_lat, 64-byte messages over one TCP connection;
//   - small-packet UDP: qperf udp_bw, 64-byte datagrams, counted where they are received;
//   - single-stream TCP throughput: iperf3, with the CPU time of client, server and the
//     CPU's ksoftirqd.
//
// sockperf was tried first for request/response: every run sleeps two seconds before it
// starts, which would have cost minutes of the 15-minute budget; qperf does not.
package traffic

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/vnetbpf/vnetbpf/bench/resources"
	"github.com/vnetbpf/vnetbpf/bench/topology"
)

// Ports the servers listen on.
const (
	qperfPort  = 19765
	iperf3Port = 5201
)

// MessageSize is the size of request/response messages and UDP payloads.
const MessageSize = 64

// CheckTools fails with what to install if qperf or iperf3 is missing.
func CheckTools() error {
	var missing []string
	for _, t := range []string{"qperf", "iperf3", "nsenter", "taskset"} {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s: run 'make bench', which installs them, or apt-get install -y qperf iperf3", strings.Join(missing, ", "))
	}
	return nil
}

// Server is qperf and iperf3 listening in one namespace.
type Server struct {
	ep    topology.Endpoint
	qperf *exec.Cmd
	iperf *exec.Cmd
	reg   *resources.Registry
}

// StartServer starts qperf and iperf3 in ep's namespace, pinned to cpu, and returns once
// both accept connections from client's namespace.
func StartServer(reg *resources.Registry, ep, client topology.Endpoint, cpu int) (*Server, error) {
	s := &Server{ep: ep, reg: reg}
	var err error
	if s.qperf, err = s.start(cpu, "qperf", "--listen_port", strconv.Itoa(qperfPort)); err != nil {
		return nil, err
	}
	if s.iperf, err = s.start(cpu, "iperf3", "--server", "--bind", ep.IP.String(), "--port", strconv.Itoa(iperf3Port)); err != nil {
		s.Stop()
		return nil, err
	}
	for _, port := range []int{qperfPort, iperf3Port} {
		if err := waitListening(client.NS, ep.IP.String(), port, 10*time.Second); err != nil {
			s.Stop()
			return nil, fmt.Errorf("server in %s: %w", ep.Name, err)
		}
	}
	return s, nil
}

func (s *Server) start(cpu int, tool string, args ...string) (*exec.Cmd, error) {
	argv := append([]string{"--net=" + s.ep.NS.Path(), "--", "taskset", "-c", strconv.Itoa(cpu), tool}, args...)
	cmd := exec.Command("nsenter", argv...)
	cmd.Stdout, cmd.Stderr = nil, nil
	// Die with us even if we are killed, rather than linger in a removed namespace.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", tool, s.ep.Name, err)
	}
	s.reg.TrackPID(cmd.Process.Pid)
	return cmd, nil
}

// Stop kills the servers.
func (s *Server) Stop() {
	for _, c := range []*exec.Cmd{s.qperf, s.iperf} {
		if c != nil && c.Process != nil {
			c.Process.Kill()
			c.Wait()
			s.reg.ForgetPID(c.Process.Pid)
		}
	}
}

// waitListening polls until a TCP connection from namespace n to ip:port succeeds.
func waitListening(n ns.NetNS, ip string, port int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		err := n.Do(func(ns.NetNS) error {
			c, err := net.DialTimeout("tcp4", net.JoinHostPort(ip, strconv.Itoa(port)), 500*time.Millisecond)
			if err != nil {
				return err
			}
			return c.Close()
		})
		if err == nil {
			return nil
		}
		last = err
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("nothing listening on %s:%d after %s: %v", ip, port, timeout, last)
}

// client runs tool in namespace n pinned to cpu and returns its stdout and resource usage.
func client(ctx context.Context, n ns.NetNS, cpu int, tool string, args ...string) ([]byte, *syscall.Rusage, error) {
	argv := append([]string{"--net=" + n.Path(), "--", "taskset", "-c", strconv.Itoa(cpu), tool}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return nil, nil, fmt.Errorf("%s %s: %v: %s", tool, strings.Join(args, " "), err, strings.TrimSpace(errb.String()+" "+out.String()))
	}
	ru, _ := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	return out.Bytes(), ru, nil
}

// qperfValues parses qperf's "name = value unit" lines; numbers may have thousands commas.
func qperfValues(out []byte) map[string]float64 {
	vals := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseFloat(strings.ReplaceAll(f[0], ",", ""), 64)
		if err != nil {
			continue
		}
		if len(f) > 1 {
			switch f[1] {
			case "K/sec":
				n *= 1e3
			case "M/sec":
				n *= 1e6
			}
		}
		vals[strings.TrimSpace(k)] = n
	}
	return vals
}

// RR is a request/response result.
type RR struct {
	// TransactionsPerSec is round trips per second: 1 / (2 × qperf's one-way latency).
	TransactionsPerSec float64 `json:"transactionsPerSec"`
	// LatencyUs is qperf's one-way latency (half a round trip), in microseconds.
	LatencyUs float64 `json:"latencyUs"`
	// Messages is how many responses the client received.
	Messages float64 `json:"messages"`
	// CPUUsPerTransaction is the CPU time of client, server and ksoftirqd per round trip.
	// Unlike the rate it does not fall when something else competes for the CPU.
	CPUUsPerTransaction float64 `json:"cpuUsPerTransaction"`
}

// RunRR measures TCP request/response between p's client and server s for d.
func RunRR(ctx context.Context, p topology.Pair, s *Server, cpu int, d time.Duration) (RR, error) {
	var v map[string]float64
	cpuSec, err := s.accounted(cpu, func() (float64, error) {
		out, ru, err := client(ctx, p.Client.NS, cpu, "qperf", p.Server.IP.String(), "--listen_port", strconv.Itoa(qperfPort),
			"-t", seconds(d), "-m", strconv.Itoa(MessageSize), "-vvs", "-vvu", "tcp_lat")
		if err != nil {
			return 0, err
		}
		v = qperfValues(out)
		if lat, ok := v["latency"]; !ok || lat <= 0 {
			return 0, fmt.Errorf("qperf tcp_lat printed no latency:\n%s", out)
		}
		return rusageSeconds(ru), nil
	})
	if err != nil {
		return RR{}, err
	}
	lat, msgs := v["latency"], v["loc_recv_msgs"]
	r := RR{TransactionsPerSec: 1e6 / (2 * lat), LatencyUs: lat, Messages: msgs}
	if msgs > 0 {
		r.CPUUsPerTransaction = cpuSec / msgs * 1e6
	}
	return r, nil
}

// accounted runs the client fn and returns the CPU seconds of the client (fn's result), of
// the qperf server's per-test child (reaped into the server's children times) and of
// ksoftirqd on cpu.
func (s *Server) accounted(cpu int, fn func() (float64, error)) (float64, error) {
	pid := s.qperf.Process.Pid
	soft := ksoftirqdPID(cpu)
	srvBefore, err := childrenSeconds(pid)
	if err != nil {
		return 0, err
	}
	softBefore, _ := runtimeSeconds(soft)
	clientSec, err := fn()
	if err != nil {
		return 0, err
	}
	softAfter, _ := runtimeSeconds(soft)
	// The server's child exits when the test ends; its time reaches the server once reaped.
	deadline := time.Now().Add(2 * time.Second)
	for hasChildren(pid) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	srvAfter, err := childrenSeconds(pid)
	if err != nil {
		return 0, err
	}
	return clientSec + (srvAfter - srvBefore) + (softAfter - softBefore), nil
}

// UDP is a small-packet UDP result.
type UDP struct {
	// ReceivedPPS is datagrams the receiving socket got per second: what the path delivered.
	ReceivedPPS float64 `json:"receivedPPS"`
	// SentPPS is datagrams the sender handed to the kernel per second. With both ends on one
	// CPU the sender outruns the receiver and the difference is dropped at the receiving
	// socket, after the path has carried it.
	SentPPS float64 `json:"sentPPS"`
	// SenderNsPerPacket is the sender's CPU time (and ksoftirqd's) per datagram sent: the
	// system call and the whole path up to the receiving socket run in its context, so this
	// is the cost of carrying one small packet, whatever the scheduler does.
	SenderNsPerPacket float64 `json:"senderNsPerPacket"`
}

// RunUDP measures 64-byte UDP between p's client (sender) and server for d.
func RunUDP(ctx context.Context, p topology.Pair, cpu int, d time.Duration) (UDP, error) {
	soft := ksoftirqdPID(cpu)
	softBefore, _ := runtimeSeconds(soft)
	out, ru, err := client(ctx, p.Client.NS, cpu, "qperf", p.Server.IP.String(), "--listen_port", strconv.Itoa(qperfPort),
		"-t", seconds(d), "-m", strconv.Itoa(MessageSize), "-vvs", "-vvu", "udp_bw")
	if err != nil {
		return UDP{}, err
	}
	softAfter, _ := runtimeSeconds(soft)
	v := qperfValues(out)
	recv, ok := v["recv_msgs"]
	if !ok || recv <= 0 {
		return UDP{}, fmt.Errorf("qperf udp_bw received nothing:\n%s", out)
	}
	u := UDP{ReceivedPPS: recv / d.Seconds(), SentPPS: v["send_msgs"] / d.Seconds()}
	if sent := v["send_msgs"]; sent > 0 {
		u.SenderNsPerPacket = (rusageSeconds(ru) + softAfter - softBefore) / sent * 1e9
	}
	return u, nil
}

// Stream is a single-stream TCP throughput result.
type Stream struct {
	Gbps    float64 `json:"gbps"`
	Bytes   float64 `json:"bytes"`
	Seconds float64 `json:"seconds"`
	// CPUSeconds is the CPU time of the iperf3 client and server and of the pinned CPU's
	// ksoftirqd while the stream ran. The kernel's packet processing that runs as softirq on
	// the way out of their system calls is charged to them (this kernel has no
	// IRQ_TIME_ACCOUNTING; with it, that time would be missing here).
	CPUSeconds  float64 `json:"cpuSeconds"`
	CPUSecPerGB float64 `json:"cpuSecPerGB"`
	// MachineBusySeconds is the whole machine's non-idle time in the same interval (from
	// /proc/stat), for reference: it includes anything else that ran.
	MachineBusySeconds float64 `json:"machineBusySeconds"`
}

// RunStream measures one iperf3 TCP stream from p's client to the server s for d.
func RunStream(ctx context.Context, p topology.Pair, s *Server, cpu int, d time.Duration) (Stream, error) {
	serverBefore, err := runtimeSeconds(s.iperf.Process.Pid)
	if err != nil {
		return Stream{}, err
	}
	ksoftirqd := ksoftirqdPID(cpu)
	softBefore, _ := runtimeSeconds(ksoftirqd)
	busyBefore, err := MachineBusy()
	if err != nil {
		return Stream{}, err
	}
	out, ru, err := client(ctx, p.Client.NS, cpu, "iperf3", "--client", p.Server.IP.String(), "--port", strconv.Itoa(iperf3Port),
		"--time", seconds(d), "--json")
	if err != nil {
		return Stream{}, err
	}
	busyAfter, _ := MachineBusy()
	serverAfter, err := runtimeSeconds(s.iperf.Process.Pid)
	if err != nil {
		return Stream{}, err
	}
	softAfter, _ := runtimeSeconds(ksoftirqd)
	var res struct {
		End struct {
			SumReceived struct {
				Bytes   float64 `json:"bytes"`
				Seconds float64 `json:"seconds"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return Stream{}, fmt.Errorf("iperf3 output: %w", err)
	}
	if res.Error != "" {
		return Stream{}, fmt.Errorf("iperf3: %s", res.Error)
	}
	r := res.End.SumReceived
	if r.Bytes <= 0 || r.Seconds <= 0 {
		return Stream{}, fmt.Errorf("iperf3 moved nothing:\n%s", out)
	}
	cpuSec := rusageSeconds(ru) + (serverAfter - serverBefore) + (softAfter - softBefore)
	return Stream{
		Gbps: r.Bytes * 8 / r.Seconds / 1e9, Bytes: r.Bytes, Seconds: r.Seconds,
		CPUSeconds: cpuSec, CPUSecPerGB: cpuSec / (r.Bytes / 1e9),
		MachineBusySeconds: busyAfter - busyBefore,
	}, nil
}

func tv(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }

// rusageSeconds is user + system time; the kernel scales both so that they add up to the
// task's exact run time.
func rusageSeconds(ru *syscall.Rusage) float64 {
	if ru == nil {
		return 0
	}
	return tv(ru.Utime) + tv(ru.Stime)
}

// childrenSeconds is the user + system time of a process's reaped children
// (/proc/<pid>/stat cutime + cstime), in USER_HZ ticks made seconds.
func childrenSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	rest := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(rest) < 15 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	cu, _ := strconv.ParseFloat(rest[13], 64) // field 16
	cs, _ := strconv.ParseFloat(rest[14], 64) // field 17
	return (cu + cs) / clockTicks, nil
}

// hasChildren reports whether pid has a child process (/proc/<pid>/task/<pid>/children).
func hasChildren(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	return err == nil && len(strings.TrimSpace(string(b))) > 0
}

func seconds(d time.Duration) string {
	return strconv.Itoa(max(1, int(d.Round(time.Second).Seconds())))
}

// clockTicks is USER_HZ, the unit of /proc/stat times; 100 on Linux.
const clockTicks = 100

// runtimeSeconds is the CPU time a task has run, in nanoseconds precision
// (/proc/<pid>/schedstat); 0 for pid 0.
func runtimeSeconds(pid int) (float64, error) {
	if pid == 0 {
		return 0, nil
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/schedstat", pid))
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, fmt.Errorf("empty /proc/%d/schedstat", pid)
	}
	ns, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return 0, err
	}
	return ns / 1e9, nil
}

// ksoftirqdPID finds the ksoftirqd thread of cpu; 0 if there is none.
func ksoftirqdPID(cpu int) int {
	want := fmt.Sprintf("ksoftirqd/%d", cpu)
	matches, _ := filepath.Glob("/proc/[0-9]*/comm")
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err == nil && strings.TrimSpace(string(b)) == want {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(m)))
			return pid
		}
	}
	return 0
}

// MachineBusy returns the non-idle CPU seconds of all CPUs since boot (/proc/stat).
func MachineBusy() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, fmt.Errorf("unexpected /proc/stat: %q", line)
	}
	var busy float64
	for i, v := range f[1:] {
		n, _ := strconv.ParseFloat(v, 64)
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 8 { // guest time is already in user time
			break
		}
		busy += n
	}
	return busy / clockTicks, nil
}
