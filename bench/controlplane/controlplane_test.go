package controlplane

import (
	"os"
	"path/filepath"
	"testing"
)

func TestLastStartupReadsTheLastReadyLine(t *testing.T) {
	log := filepath.Join(t.TempDir(), "agent.log")
	lines := `time=2026-01-01T00:00:00Z level=INFO msg="agent ready" socket=/x endpoints=0 startup=1.2s
time=2026-01-01T00:00:01Z level=INFO msg="endpoint added" startup=99ms
time=2026-01-01T00:00:02Z level=INFO msg="agent ready" socket=/x attachMode=tcx endpoints=250 startup=153ms
`
	if err := os.WriteFile(log, []byte(lines), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := lastStartup(log)
	if err != nil {
		t.Fatal(err)
	}
	if got != 153 {
		t.Errorf("startup %v ms, want 153 (the last ready line, not another message's field)", got)
	}
	os.WriteFile(log, []byte("level=INFO msg=\"starting\"\n"), 0o600)
	if _, err := lastStartup(log); err == nil {
		t.Error("a log without a ready line gave a startup")
	}
}

func TestRSSOfThisProcess(t *testing.T) {
	mb, err := rssMB(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if mb < 1 || mb > 10000 {
		t.Errorf("this test process has %v MB resident", mb)
	}
}

func TestSummarizePercentiles(t *testing.T) {
	ms := make([]float64, 250)
	for i := range ms {
		ms[i] = float64(i + 1)
	}
	l := summarize(ms, 0)
	if l.P50 != 125 || l.P90 != 225 || l.P99 != 248 || l.Max != 250 {
		t.Errorf("%+v", l)
	}
}

func TestAPIDeltaParsesRoutesWithPatterns(t *testing.T) {
	before := map[apiKey][2]float64{{"PUT", "/v1/endpoints/{id}/{ifname}"}: {1, 10}}
	after := map[apiKey][2]float64{{"PUT", "/v1/endpoints/{id}/{ifname}"}: {1.5, 20}, {"GET", "/v1/status"}: {0.2, 2}}
	got := apiDelta(before, after)
	if len(got) != 2 {
		t.Fatalf("%+v", got)
	}
	for _, r := range got {
		if r.Route == "/v1/endpoints/{id}/{ifname}" && (r.Calls != 10 || r.MeanMs != 50) {
			t.Errorf("endpoint route %+v, want 10 calls of 50 ms", r)
		}
	}
	line := `vnetbpf_api_request_duration_seconds_sum{code="200",method="PUT",route="/v1/endpoints/{containerID}/{ifName}"} 0.25`
	if m := apiLineRE.FindStringSubmatch(line); m == nil || m[3] != "0.25" {
		t.Errorf("a route with {patterns} did not parse: %v", m)
	}
}
