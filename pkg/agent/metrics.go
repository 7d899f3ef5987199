package agent

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// metrics is the agent's Prometheus registry. Datapath counters are read from the stats map
// at scrape time, so they survive agent restarts and cost nothing between scrapes.
type metrics struct {
	reg           *prometheus.Registry
	apiDuration   *prometheus.HistogramVec
	allocFailures prometheus.Counter
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		apiDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "vnetbpf_api_request_duration_seconds",
			Help: "Latency of the agent's CNI API, by method, route and HTTP status.",
			// Up to a minute: an ADD may wait ipam.allocateTimeout (30 s) for the pool to grow.
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"method", "route", "code"}),
		allocFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vnetbpf_ipam_allocation_failures_total",
			Help: "Address requests refused because the pool had no free address.",
		}),
	}
	m.reg.MustRegister(m.apiDuration, m.allocFailures,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&datapathCollector{a: a})
	return m
}

// instrument records the latency of h under its method and route pattern ("PUT",
// "/v1/endpoints/{containerID}/{ifName}"), which keeps the labels' cardinality bounded.
func (m *metrics) instrument(pattern string, h http.Handler) http.Handler {
	method, route, _ := strings.Cut(pattern, " ")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		start := time.Now()
		h.ServeHTTP(sw, r)
		m.apiDuration.WithLabelValues(method, route, strconv.Itoa(sw.code)).Observe(time.Since(start).Seconds())
	})
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

var (
	descPackets = prometheus.NewDesc("vnetbpf_datapath_packets_total",
		"Packets the datapath handled, by verdict reason (FWD_*, PASS_*, ARP_*, DROP_*).", []string{"reason"}, nil)
	descBytes = prometheus.NewDesc("vnetbpf_datapath_bytes_total",
		"Bytes the datapath handled, by verdict reason.", []string{"reason"}, nil)
	descPool = prometheus.NewDesc("vnetbpf_ipam_addresses",
		"Addresses of the node's pool, by state (free, allocated, cooling).", []string{"state"}, nil)
	descEndpoints = prometheus.NewDesc("vnetbpf_endpoints",
		"Container interfaces registered with the datapath.", nil, nil)
	descOnClsBPF = prometheus.NewDesc("vnetbpf_endpoints_on_cls_bpf",
		"Endpoints whose host veth still runs from_container in a cls_bpf filter, waiting to be moved to TCX (attachMode auto).", nil, nil)
	descIPConfigs = prometheus.NewDesc("vnetbpf_azure_ip_configurations",
		"IP configurations on the node's NIC as ARM last showed them, primary included.", nil, nil)
	descPending = prometheus.NewDesc("vnetbpf_azure_ip_configurations_pending",
		"IP configurations being added by an ARM operation that has not finished.", nil, nil)
	descAdded = prometheus.NewDesc("vnetbpf_azure_ip_configurations_added_total",
		"IP configurations the agent added to the NIC since it started.", nil, nil)
	descRemoved = prometheus.NewDesc("vnetbpf_azure_ip_configurations_removed_total",
		"IP configurations the agent removed from the NIC since it started.", nil, nil)
	descProviderErr = prometheus.NewDesc("vnetbpf_azure_last_error_timestamp_seconds",
		"When the last ARM or IMDS call failed (Unix time); 0 once a later one succeeded.", nil, nil)
)

type datapathCollector struct{ a *Agent }

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPackets, descBytes, descPool, descEndpoints, descOnClsBPF, descIPConfigs, descPending, descAdded, descRemoved, descProviderErr} {
		ch <- d
	}
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	if stats, err := c.a.maps.ReadStats(); err == nil {
		for r, s := range stats {
			name := strings.ToLower(loader.ReasonName(r))
			ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(s.Packets), name)
			ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(s.Bytes), name)
		}
	} else {
		ch <- prometheus.NewInvalidMetric(descPackets, err)
	}
	st := c.a.pool.State()
	ch <- prometheus.MustNewConstMetric(descPool, prometheus.GaugeValue, float64(st.Free), "free")
	ch <- prometheus.MustNewConstMetric(descPool, prometheus.GaugeValue, float64(st.Used), "allocated")
	ch <- prometheus.MustNewConstMetric(descPool, prometheus.GaugeValue, float64(st.Cooling), "cooling")
	c.a.mu.Lock()
	n, onClsBPF := len(c.a.endpoints), len(c.a.settle.unsettled)
	c.a.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descEndpoints, prometheus.GaugeValue, float64(n))
	ch <- prometheus.MustNewConstMetric(descOnClsBPF, prometheus.GaugeValue, float64(onClsBPF))
	if c.a.grower != nil {
		ps := c.a.grower.Status()
		var errAt float64
		if !ps.LastErrorAt.IsZero() {
			errAt = float64(ps.LastErrorAt.Unix())
		}
		ch <- prometheus.MustNewConstMetric(descIPConfigs, prometheus.GaugeValue, float64(ps.IPConfigs))
		ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(ps.Pending))
		ch <- prometheus.MustNewConstMetric(descAdded, prometheus.CounterValue, float64(ps.Grown))
		ch <- prometheus.MustNewConstMetric(descRemoved, prometheus.CounterValue, float64(ps.Released))
		ch <- prometheus.MustNewConstMetric(descProviderErr, prometheus.GaugeValue, errAt)
	}
}

// serveMetrics serves /metrics, /healthz (the process answers) and /readyz (setup finished and
// the API is serving) on MetricsAddr.
func (a *Agent) serveMetrics(errc chan<- error) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !a.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	srv := &http.Server{Addr: a.cfg.MetricsAddr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	ln, err := listenTCP(a.cfg.MetricsAddr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener %s: %w", a.cfg.MetricsAddr, err)
	}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("metrics server: %w", err)
		}
	}()
	return srv, nil
}
