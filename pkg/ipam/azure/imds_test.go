package azure

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

const networkDoc = `{"interface":[
 {"macAddress":"000D3AFFFFFF","ipv4":{"ipAddress":[{"privateIpAddress":"10.1.0.4","publicIpAddress":""}],"subnet":[{"address":"10.1.0.0","prefix":"24"}]}},
 {"macAddress":"000D3A010203","ipv4":{"ipAddress":[{"privateIpAddress":"10.0.0.4","publicIpAddress":""},{"privateIpAddress":"10.0.0.10","publicIpAddress":""},{"privateIpAddress":"10.0.0.11","publicIpAddress":""}],"subnet":[{"address":"10.0.0.0","prefix":"16"}]}}]}`

// imdsServer answers like IMDS: 400 without the Metadata header, and failStatus for the
// first fail requests.
func imdsServer(t *testing.T, fail int32, failStatus int) (*httptest.Server, *atomic.Int32) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		if r.Header.Get("Metadata") != "true" {
			http.Error(w, `{"error":"Bad request. Required metadata header not specified"}`, http.StatusBadRequest)
			return
		}
		if r.URL.Query().Get("api-version") != imdsAPIVersion || r.URL.Query().Get("format") != "json" {
			http.Error(w, "bad query", http.StatusBadRequest)
			return
		}
		if n <= fail {
			w.Header().Set("Retry-After", "0")
			http.Error(w, "slow down", failStatus)
			return
		}
		switch r.URL.Path {
		case "/metadata/instance/network":
			io.WriteString(w, networkDoc)
		case "/metadata/instance/compute":
			io.WriteString(w, `{"subscriptionId":"sub","resourceGroupName":"rg","name":"node1","location":"westeurope","vmId":"x"}`)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &calls
}

func TestIMDSAddressesOfTheNodesNIC(t *testing.T) {
	srv, _ := imdsServer(t, 0, 0)
	p, err := New(Config{IMDSURL: srv.URL, MAC: nicMAC, MinFree: 1, Batch: 1, MaxFree: 1, MaxIPs: 256}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	got, err := p.Addresses(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Addr{netip.MustParseAddr("10.0.0.10"), netip.MustParseAddr("10.0.0.11")}
	if !slices.Equal(got, want) {
		t.Errorf("addresses %v, want the secondaries %v of the NIC with MAC %s (not the primary, not the other NIC's)", got, want, nicMAC)
	}
	doc, err := p.imds.Compute(context.Background())
	if err != nil || doc.SubscriptionID != "sub" || doc.ResourceGroupName != "rg" {
		t.Errorf("compute document %+v, %v", doc, err)
	}
}

func TestIMDSRetriesThrottlingAndServerErrors(t *testing.T) {
	for _, status := range []int{http.StatusTooManyRequests, http.StatusInternalServerError} {
		srv, calls := imdsServer(t, 3, status)
		c := NewIMDS(srv.URL)
		c.backoff = time.Millisecond
		if _, err := c.Network(context.Background()); err != nil {
			t.Errorf("status %d three times, then OK: %v", status, err)
		}
		if n := calls.Load(); n != 4 {
			t.Errorf("status %d: %d requests, want 4", status, n)
		}
	}
}

func TestIMDSGivesUpAndSaysWhy(t *testing.T) {
	srv, _ := imdsServer(t, 100, http.StatusTooManyRequests)
	c := NewIMDS(srv.URL)
	c.backoff, c.retries = time.Millisecond, 2
	if _, err := c.Network(context.Background()); err == nil {
		t.Fatal("IMDS throttling forever did not fail")
	}
}

func TestIMDSUnknownMACIsAnError(t *testing.T) {
	srv, _ := imdsServer(t, 0, 0)
	p, _ := New(Config{IMDSURL: srv.URL, MAC: []byte{2, 0, 0, 0, 0, 9}, MinFree: 1, Batch: 1, MaxFree: 1, MaxIPs: 256}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if _, err := p.Addresses(context.Background()); err == nil {
		t.Fatal("a MAC IMDS does not list gave addresses")
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
