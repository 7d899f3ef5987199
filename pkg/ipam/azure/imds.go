// Package azure is the Azure address provider: it finds the node's NIC through the Instance
// Metadata Service (IMDS) and keeps a warm pool of secondary IP configurations on it through
// Azure Resource Manager (armnetwork), so containers get VNet addresses without anyone
// creating IP configurations by hand.
package azure

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"
)

// DefaultIMDSURL is the Instance Metadata Service every Azure VM reaches.
const DefaultIMDSURL = "http://169.254.169.254"

const imdsAPIVersion = "2021-02-01"

// IMDS reads the instance metadata documents.
type IMDS struct {
	base    string
	http    *http.Client
	retries int
	backoff time.Duration
}

// NewIMDS returns a client for the IMDS at base (DefaultIMDSURL on Azure).
func NewIMDS(base string) *IMDS {
	// IMDS must never be reached through a proxy: it answers only on the link-local address.
	tr := &http.Transport{Proxy: nil, DisableKeepAlives: true}
	return &IMDS{base: strings.TrimRight(base, "/"), http: &http.Client{Transport: tr, Timeout: 5 * time.Second}, retries: 6, backoff: 200 * time.Millisecond}
}

// NetworkDocument is /metadata/instance/network. IMDS sends every value as a string.
type NetworkDocument struct {
	Interface []IMDSInterface `json:"interface"`
}

// IMDSInterface is one NIC of the VM as IMDS describes it.
type IMDSInterface struct {
	MACAddress string `json:"macAddress"` // 12 hex digits, no separators
	IPv4       struct {
		IPAddress []struct {
			PrivateIPAddress string `json:"privateIpAddress"`
			PublicIPAddress  string `json:"publicIpAddress"`
		} `json:"ipAddress"`
		Subnet []struct {
			Address string `json:"address"`
			Prefix  string `json:"prefix"`
		} `json:"subnet"`
	} `json:"ipv4"`
}

// ComputeDocument is the part of /metadata/instance/compute the provider needs.
type ComputeDocument struct {
	SubscriptionID    string `json:"subscriptionId"`
	ResourceGroupName string `json:"resourceGroupName"`
	Name              string `json:"name"`
	Location          string `json:"location"`
	VMID              string `json:"vmId"`
}

// Network fetches the network document.
func (c *IMDS) Network(ctx context.Context) (NetworkDocument, error) {
	var doc NetworkDocument
	err := c.get(ctx, "/metadata/instance/network", &doc)
	return doc, err
}

// Compute fetches the compute document.
func (c *IMDS) Compute(ctx context.Context) (ComputeDocument, error) {
	var doc ComputeDocument
	err := c.get(ctx, "/metadata/instance/compute", &doc)
	return doc, err
}

// get fetches one document, retrying throttling (429) and server errors with exponential
// backoff, as IMDS asks its clients to.
func (c *IMDS) get(ctx context.Context, path string, out any) error {
	url := fmt.Sprintf("%s%s?api-version=%s&format=json", c.base, path, imdsAPIVersion)
	wait := c.backoff
	var last error
	for attempt := 0; attempt <= c.retries; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return fmt.Errorf("IMDS %s: %w (last error: %v)", path, ctx.Err(), last)
			case <-time.After(wait):
			}
			wait *= 2
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Metadata", "true")
		resp, err := c.http.Do(req)
		if err != nil {
			last = err
			continue
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		switch {
		case err != nil:
			last = err
			continue
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			last = fmt.Errorf("%s", resp.Status)
			continue
		case resp.StatusCode != http.StatusOK:
			return fmt.Errorf("IMDS %s answered %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
		}
		if err := json.Unmarshal(body, out); err != nil {
			return fmt.Errorf("IMDS %s: decode: %w", path, err)
		}
		return nil
	}
	return fmt.Errorf("IMDS %s: gave up after %d attempts: %v", path, c.retries+1, last)
}

// normalizeMAC turns "00-0D-3A-..." (ARM), "000d3a..." (IMDS) and "00:0d:3a:..." (Linux) into
// one comparable form.
func normalizeMAC(s string) string {
	r := strings.NewReplacer("-", "", ":", "", ".", "")
	return strings.ToUpper(r.Replace(s))
}

// InterfaceByMAC returns the document's interface with the given MAC.
func (d NetworkDocument) InterfaceByMAC(mac net.HardwareAddr) (IMDSInterface, bool) {
	want := normalizeMAC(mac.String())
	for _, in := range d.Interface {
		if normalizeMAC(in.MACAddress) == want {
			return in, true
		}
	}
	return IMDSInterface{}, false
}

// Addresses lists the interface's private IPv4 addresses, the primary first (IMDS lists it
// first); entries that do not parse are skipped.
func (in IMDSInterface) Addresses() []netip.Addr {
	var out []netip.Addr
	for _, a := range in.IPv4.IPAddress {
		if ip, err := netip.ParseAddr(a.PrivateIPAddress); err == nil && ip.Is4() {
			out = append(out, ip)
		}
	}
	return out
}
