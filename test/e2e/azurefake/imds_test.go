package azurefake_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/vnetbpf/vnetbpf/test/e2e/azurefake"
)

var testVM = azurefake.VM{SubscriptionID: sub, ResourceGroup: rg, Name: "node0", Location: location, VMID: "11111111-2222-3333-4444-555555555555"}

// newIMDS serves node0's IMDS (NIC nic0 of env e), fed from e's ARM.
func newIMDS(t *testing.T, e *env) (*azurefake.IMDS, *httptest.Server) {
	t.Helper()
	m := azurefake.NewIMDS(testVM, e.nic0)
	e.arm.OnChange(m.Update)
	srv := httptest.NewServer(m)
	t.Cleanup(srv.Close)
	return m, srv
}

func imdsGet(t *testing.T, base, path string, metadata bool) (int, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx(t), http.MethodGet, base+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if metadata {
		req.Header.Set("Metadata", "true")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

// The agent's view of the network document: only what IMDS documents, all strings.
type netDoc struct {
	Interface []struct {
		IPv4 struct {
			IPAddress []struct {
				PrivateIPAddress string `json:"privateIpAddress"`
				PublicIPAddress  string `json:"publicIpAddress"`
			} `json:"ipAddress"`
			Subnet []struct {
				Address string `json:"address"`
				Prefix  string `json:"prefix"`
			} `json:"subnet"`
		} `json:"ipv4"`
		MACAddress string `json:"macAddress"`
	} `json:"interface"`
}

func networkDoc(t *testing.T, base string) netDoc {
	t.Helper()
	st, b := imdsGet(t, base, "/metadata/instance/network?api-version=2021-02-01&format=json", true)
	if st != http.StatusOK {
		t.Fatalf("network document: %d %s", st, b)
	}
	var d netDoc
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("network document %s: %v", b, err)
	}
	return d
}

func docAddrs(d netDoc) []string {
	var out []string
	for _, a := range d.Interface[0].IPv4.IPAddress {
		out = append(out, a.PrivateIPAddress)
	}
	return out
}

func TestIMDSDocuments(t *testing.T) {
	e := newEnv(t)
	_, srv := newIMDS(t, e)

	d := networkDoc(t, srv.URL)
	if len(d.Interface) != 1 {
		t.Fatalf("%d interfaces", len(d.Interface))
	}
	i := d.Interface[0]
	if i.MACAddress != "000D3A010203" {
		t.Errorf("macAddress %q, want 000D3A010203", i.MACAddress)
	}
	if len(i.IPv4.IPAddress) != 1 || i.IPv4.IPAddress[0].PrivateIPAddress != "10.240.0.4" {
		t.Errorf("ipAddress %+v", i.IPv4.IPAddress)
	}
	if len(i.IPv4.Subnet) != 1 || i.IPv4.Subnet[0].Address != "10.240.0.0" || i.IPv4.Subnet[0].Prefix != "24" {
		t.Errorf("subnet %+v", i.IPv4.Subnet)
	}
	// publicIpAddress is present and empty, as IMDS sends it for a NIC without public IP.
	if _, b := imdsGet(t, srv.URL, "/metadata/instance/network?api-version=2021-02-01", true); !strings.Contains(string(b), `"publicIpAddress":""`) {
		t.Errorf("network document lacks an empty publicIpAddress: %s", b)
	}

	st, b := imdsGet(t, srv.URL, "/metadata/instance/compute?api-version=2021-02-01&format=json", true)
	var c map[string]any
	if err := json.Unmarshal(b, &c); st != http.StatusOK || err != nil {
		t.Fatalf("compute: %d %s %v", st, b, err)
	}
	for k, want := range map[string]string{"subscriptionId": sub, "resourceGroupName": rg, "name": "node0", "location": location, "vmId": testVM.VMID} {
		if c[k] != want {
			t.Errorf("compute %s = %v, want %q", k, c[k], want)
		}
	}
	for k, v := range c {
		if _, ok := v.(string); !ok {
			t.Errorf("compute %s is %T, IMDS sends strings", k, v)
		}
	}

	st, b = imdsGet(t, srv.URL, "/metadata/instance?api-version=2021-02-01", true)
	var inst struct {
		Compute map[string]any `json:"compute"`
		Network netDoc         `json:"network"`
	}
	if err := json.Unmarshal(b, &inst); st != http.StatusOK || err != nil || inst.Compute["name"] != "node0" || len(inst.Network.Interface) != 1 {
		t.Errorf("instance: %d %s %v", st, b, err)
	}

	// Leaf paths with format=text, as scripts use them.
	st, b = imdsGet(t, srv.URL, "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress?api-version=2021-02-01&format=text", true)
	if st != http.StatusOK || string(b) != "10.240.0.4" {
		t.Errorf("leaf: %d %q", st, b)
	}
	if st, _ := imdsGet(t, srv.URL, "/metadata/instance/network/interface/7?api-version=2021-02-01", true); st != http.StatusNotFound {
		t.Errorf("missing index: %d", st)
	}
}

func TestIMDSRequiresMetadataHeader(t *testing.T) {
	e := newEnv(t)
	m, srv := newIMDS(t, e)
	st, b := imdsGet(t, srv.URL, "/metadata/instance/network?api-version=2021-02-01&format=json", false)
	if st != http.StatusBadRequest || !strings.Contains(string(b), "metadata header") {
		t.Errorf("without Metadata: true: %d %s", st, b)
	}
	if st, _ := imdsGet(t, srv.URL, "/metadata/instance/network?format=json", true); st != http.StatusBadRequest {
		t.Errorf("without api-version: %d", st)
	}
	if m.Count(http.StatusBadRequest) != 2 || m.Count(0) != 2 {
		t.Errorf("counts: 400s %d, all %d", m.Count(http.StatusBadRequest), m.Count(0))
	}
}

func TestIMDSPropagationDelay(t *testing.T) {
	e := newEnv(t)
	// Registered before the IMDS's Update, so this time is no later than the one IMDS counts from.
	var committed atomic.Int64 // UnixNano of the first commit
	e.arm.OnChange(func(azurefake.NICState) { committed.CompareAndSwap(0, time.Now().UnixNano()) })
	m, srv := newIMDS(t, e)
	const delay = 400 * time.Millisecond
	m.SetPropagationDelay(delay)

	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := put(t, e.client, "nic0", withConfigs(t, got.Interface, "pool1", "pool2"), *got.Etag)
	if err != nil {
		t.Fatal(err)
	}
	if a := addrsOf(res); a["pool1"] != "10.240.0.6" || a["pool2"] != "10.240.0.7" {
		t.Fatalf("ARM assigned %v", a)
	}
	// ARM has it; IMDS does not yet.
	if got := docAddrs(networkDoc(t, srv.URL)); !slices.Equal(got, []string{"10.240.0.4"}) {
		t.Fatalf("IMDS showed %v right after the commit, before the propagation delay", got)
	}
	want := []string{"10.240.0.4", "10.240.0.6", "10.240.0.7"}
	eventually(t, 5*time.Second, "IMDS to show the new addresses", func() bool {
		return slices.Equal(docAddrs(networkDoc(t, srv.URL)), want)
	})
	if d := time.Since(time.Unix(0, committed.Load())); committed.Load() == 0 || d < delay {
		t.Errorf("new addresses visible after %s, propagation delay is %s", d, delay)
	}

	// Other NICs' changes (another node's) do not show up in this VM's document.
	if _, err := e.arm.AddIPConfig(sub, rg, "nic1", "other-node", mustAddr("10.240.0.200")); err != nil {
		t.Fatal(err)
	}
	m.SetPropagationDelay(0)
	if _, err := e.arm.AddIPConfig(sub, rg, "nic0", "oob", mustAddr("10.240.0.201")); err != nil {
		t.Fatal(err)
	}
	d := networkDoc(t, srv.URL)
	if len(d.Interface) != 1 || !slices.Equal(docAddrs(d), append(want, "10.240.0.201")) {
		t.Errorf("document %v", docAddrs(d))
	}
}

func TestIMDSFailNext(t *testing.T) {
	e := newEnv(t)
	m, srv := newIMDS(t, e)
	m.FailNext(2, http.StatusTooManyRequests)
	for i := range 2 {
		if st, _ := imdsGet(t, srv.URL, "/metadata/instance/network?api-version=2021-02-01", true); st != http.StatusTooManyRequests {
			t.Errorf("request %d: %d, want 429", i, st)
		}
	}
	if st, _ := imdsGet(t, srv.URL, "/metadata/instance/network?api-version=2021-02-01", true); st != http.StatusOK {
		t.Errorf("third request: %d, want 200", st)
	}
	m.FailNext(1, http.StatusInternalServerError)
	if st, _ := imdsGet(t, srv.URL, "/metadata/instance/compute?api-version=2021-02-01", true); st != http.StatusInternalServerError {
		t.Errorf("injected 500: %d", st)
	}
	if m.Count(http.StatusTooManyRequests) != 2 || m.Count(http.StatusInternalServerError) != 1 || m.Count(http.StatusOK) != 1 {
		t.Errorf("counts 429 %d, 500 %d, 200 %d", m.Count(429), m.Count(500), m.Count(200))
	}
}

// rewriteTransport sends azidentity's requests for 169.254.169.254 to the fake IMDS, standing in
// for the route a test network namespace would give it.
type rewriteTransport struct{ target *url.URL }

func (r rewriteTransport) Do(req *http.Request) (*http.Response, error) {
	req.URL.Scheme, req.URL.Host = r.target.Scheme, r.target.Host
	return http.DefaultClient.Do(req)
}

func TestIMDSManagedIdentityToken(t *testing.T) {
	e := newEnv(t)
	m, srv := newIMDS(t, e)
	target, _ := url.Parse(srv.URL)
	cred, err := azidentity.NewManagedIdentityCredential(&azidentity.ManagedIdentityCredentialOptions{
		ClientOptions: azcore.ClientOptions{Transport: rewriteTransport{target}},
	})
	if err != nil {
		t.Fatal(err)
	}
	// MSAL caches managed-identity tokens process-wide by resource: a resource of this run's own
	// makes sure the token comes from this IMDS (go test -count=N).
	scope := fmt.Sprintf("https://management.azure.com/azurefake-%d/.default", time.Now().UnixNano())
	tok, err := cred.GetToken(ctx(t), policy.TokenRequestOptions{Scopes: []string{scope}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok.Token, "azurefake-token-node0-") || time.Until(tok.ExpiresOn) < time.Hour {
		t.Errorf("token %q expires %s", tok.Token, tok.ExpiresOn)
	}
	if m.TokensIssued() != 1 {
		t.Errorf("tokens issued %d", m.TokensIssued())
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
