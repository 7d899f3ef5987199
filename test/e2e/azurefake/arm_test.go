package azurefake_test

import (
	"context"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v7"

	"github.com/vnetbpf/vnetbpf/test/e2e/azurefake"
)

const (
	sub      = "00000000-0000-0000-0000-0000000000aa"
	rg       = "rg-vnetbpf"
	location = "westeurope"
	asgID    = "/subscriptions/" + sub + "/resourceGroups/" + rg + "/providers/Microsoft.Network/applicationSecurityGroups/pods"
)

var (
	subnetID     = azurefake.SubnetID(sub, rg, "vnet", "nodes")
	subnetPrefix = netip.MustParsePrefix("10.240.0.0/24")
	mac0         = net.HardwareAddr{0x00, 0x0d, 0x3a, 0x01, 0x02, 0x03}
	mac1         = net.HardwareAddr{0x00, 0x0d, 0x3a, 0x0a, 0x0b, 0x0c}
)

// staticCredential is the smallest azcore.TokenCredential: the fake ARM accepts any bearer token.
type staticCredential struct{}

func (staticCredential) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	return azcore.AccessToken{Token: "azurefake-test-token", ExpiresOn: time.Now().Add(time.Hour)}, nil
}

// changeLog records OnChange callbacks.
type changeLog struct {
	mu     sync.Mutex
	states []azurefake.NICState
}

func (c *changeLog) record(s azurefake.NICState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.states = append(c.states, s)
}

func (c *changeLog) all() []azurefake.NICState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.states)
}

type env struct {
	arm     *azurefake.ARM
	srv     *httptest.Server
	caFile  string
	client  *armnetwork.InterfacesClient
	changes *changeLog
	nic0    azurefake.NICState
}

// newEnv serves a fake ARM over TLS with one subnet and two NICs (nic0 at .4, nic1 at .5) and
// returns a real armnetwork client for it, with short retry delays.
func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{arm: azurefake.NewARM(), changes: &changeLog{}}
	t.Cleanup(e.arm.Close)
	e.arm.OnChange(e.changes.record)
	if err := e.arm.AddSubnet(subnetID, subnetPrefix); err != nil {
		t.Fatal(err)
	}
	var err error
	if e.nic0, err = e.arm.AddNIC(sub, rg, "nic0", location, mac0, subnetID, netip.Addr{}, []string{asgID}); err != nil {
		t.Fatal(err)
	}
	if _, err = e.arm.AddNIC(sub, rg, "nic1", location, mac1, subnetID, netip.Addr{}, nil); err != nil {
		t.Fatal(err)
	}
	serverTLS, caFile, err := azurefake.NewTLS(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e.caFile = caFile
	e.srv = httptest.NewUnstartedServer(e.arm)
	e.srv.TLS = serverTLS
	e.srv.Config.ErrorLog = log.New(io.Discard, "", 0) // TestTLSRequired's failed handshakes are expected
	e.srv.StartTLS()
	t.Cleanup(e.srv.Close)
	e.client = newClient(t, e.srv.URL, caFile, policy.RetryOptions{RetryDelay: time.Millisecond, MaxRetryDelay: 5 * time.Second})
	return e
}

func newClient(t *testing.T, endpoint, caFile string, retry policy.RetryOptions) *armnetwork.InterfacesClient {
	t.Helper()
	hc, err := azurefake.NewHTTPClient(caFile)
	if err != nil {
		t.Fatal(err)
	}
	client, err := armnetwork.NewInterfacesClient(sub, staticCredential{}, &arm.ClientOptions{
		ClientOptions: policy.ClientOptions{
			Cloud: cloud.Configuration{Services: map[cloud.ServiceName]cloud.ServiceConfiguration{
				cloud.ResourceManager: {Endpoint: endpoint, Audience: "https://management.azure.com"},
			}},
			Transport: hc,
			Retry:     retry,
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return client
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// withConfigs returns nic with Dynamic IP configurations added that copy the primary's subnet
// and ASGs, as the agent's warm pool does.
func withConfigs(t *testing.T, nic armnetwork.Interface, names ...string) armnetwork.Interface {
	t.Helper()
	// Copy what is appended to: nic shares its Properties with the caller's value.
	props := *nic.Properties
	props.IPConfigurations = slices.Clone(props.IPConfigurations)
	nic.Properties = &props
	var primary *armnetwork.InterfaceIPConfiguration
	for _, c := range nic.Properties.IPConfigurations {
		if deref(c.Properties.Primary, false) {
			primary = c
		}
	}
	if primary == nil {
		t.Fatal("NIC has no primary IP configuration")
	}
	for _, n := range names {
		nic.Properties.IPConfigurations = append(nic.Properties.IPConfigurations, &armnetwork.InterfaceIPConfiguration{
			Name: to.Ptr(n),
			Properties: &armnetwork.InterfaceIPConfigurationPropertiesFormat{
				PrivateIPAllocationMethod: to.Ptr(armnetwork.IPAllocationMethodDynamic),
				Subnet:                    &armnetwork.Subnet{ID: primary.Properties.Subnet.ID},
				ApplicationSecurityGroups: primary.Properties.ApplicationSecurityGroups,
				Primary:                   to.Ptr(false),
			},
		})
	}
	return nic
}

func addrsOf(nic armnetwork.Interface) map[string]string {
	out := map[string]string{}
	for _, c := range nic.Properties.IPConfigurations {
		out[*c.Name] = deref(c.Properties.PrivateIPAddress, "")
	}
	return out
}

func stateAddrs(s azurefake.NICState) []string {
	var out []string
	for _, a := range s.Addresses() {
		out = append(out, a.String())
	}
	return out
}

func mustNIC(t *testing.T, a *azurefake.ARM, name string) azurefake.NICState {
	t.Helper()
	s, ok := a.NIC(sub, rg, name)
	if !ok {
		t.Fatalf("NIC %s not found", name)
	}
	return s
}

func responseError(t *testing.T, err error, status int, code string) {
	t.Helper()
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		t.Fatalf("error %v is not an *azcore.ResponseError", err)
	}
	if re.StatusCode != status || re.ErrorCode != code {
		t.Fatalf("got %d %s, want %d %s", re.StatusCode, re.ErrorCode, status, code)
	}
}

// put runs BeginCreateOrUpdate (with If-Match when etag is set) and PollUntilDone. The If-Match
// context is used for the PUT only: WithHTTPHeader applies to every request made with that
// context, and the poll and final GET must not carry the old etag.
func put(t *testing.T, c *armnetwork.InterfacesClient, name string, nic armnetwork.Interface, etag string) (armnetwork.Interface, error) {
	t.Helper()
	pctx := ctx(t)
	if etag != "" {
		pctx = policy.WithHTTPHeader(pctx, http.Header{"If-Match": {etag}})
	}
	poller, err := c.BeginCreateOrUpdate(pctx, rg, name, nic, nil)
	if err != nil {
		return armnetwork.Interface{}, err
	}
	// Frequency is deliberately long: the fake's Retry-After(-Ms) must drive the polling.
	res, err := poller.PollUntilDone(ctx(t), &runtime.PollUntilDoneOptions{Frequency: 20 * time.Second})
	return res.Interface, err
}

func TestGet(t *testing.T) {
	e := newEnv(t)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	nic := got.Interface
	if want := azurefake.NICID(sub, rg, "nic0"); deref(nic.ID, "") != want {
		t.Errorf("id %q, want %q", deref(nic.ID, ""), want)
	}
	if deref(nic.Name, "") != "nic0" || deref(nic.Location, "") != location || deref(nic.Etag, "") != e.nic0.ETag {
		t.Errorf("name/location/etag %q %q %q", deref(nic.Name, ""), deref(nic.Location, ""), deref(nic.Etag, ""))
	}
	if !strings.HasPrefix(deref(nic.Etag, ""), `W/"`) {
		t.Errorf("etag %q is not a weak ARM etag", deref(nic.Etag, ""))
	}
	p := nic.Properties
	if deref(p.MacAddress, "") != "00-0D-3A-01-02-03" {
		t.Errorf("macAddress %q", deref(p.MacAddress, ""))
	}
	if deref(p.ProvisioningState, "") != armnetwork.ProvisioningStateSucceeded {
		t.Errorf("provisioningState %q", deref(p.ProvisioningState, ""))
	}
	if len(p.IPConfigurations) != 1 {
		t.Fatalf("%d ipConfigurations, want 1", len(p.IPConfigurations))
	}
	c := p.IPConfigurations[0]
	cp := c.Properties
	if deref(c.Name, "") != "ipconfig1" || deref(c.ID, "") != azurefake.NICID(sub, rg, "nic0")+"/ipConfigurations/ipconfig1" {
		t.Errorf("ipconfig name/id %q %q", deref(c.Name, ""), deref(c.ID, ""))
	}
	// Azure reserves .0-.3, so the first dynamic address of the subnet is .4.
	if deref(cp.PrivateIPAddress, "") != "10.240.0.4" || !deref(cp.Primary, false) ||
		deref(cp.PrivateIPAllocationMethod, "") != armnetwork.IPAllocationMethodDynamic ||
		deref(cp.PrivateIPAddressVersion, "") != armnetwork.IPVersionIPv4 ||
		deref(cp.Subnet.ID, "") != subnetID ||
		len(cp.ApplicationSecurityGroups) != 1 || deref(cp.ApplicationSecurityGroups[0].ID, "") != asgID ||
		deref(cp.ProvisioningState, "") != armnetwork.ProvisioningStateSucceeded {
		t.Errorf("ipconfig properties %+v", *cp)
	}

	_, err = e.client.Get(ctx(t), rg, "nope", nil)
	responseError(t, err, http.StatusNotFound, azurefake.CodeNotFound)
	if n := e.arm.Count(http.MethodGet, http.StatusNotFound); n != 1 {
		t.Errorf("Count(GET, 404) = %d, want 1", n)
	}
}

func TestList(t *testing.T) {
	e := newEnv(t)
	var names []string
	pager := e.client.NewListPager(rg, nil)
	for pager.More() {
		page, err := pager.NextPage(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range page.Value {
			names = append(names, *n.Name)
		}
	}
	if !slices.Equal(names, []string{"nic0", "nic1"}) {
		t.Errorf("listed %v", names)
	}
	names = nil
	all := e.client.NewListAllPager(nil)
	for all.More() {
		page, err := all.NextPage(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range page.Value {
			names = append(names, *n.Name)
		}
	}
	if len(names) != 2 {
		t.Errorf("list all: %v", names)
	}
}

func TestAddDynamicConfigs(t *testing.T) {
	e := newEnv(t)
	e.arm.SetOperationDelay(300 * time.Millisecond)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	etag := *got.Etag

	var initial *http.Response
	pctx := runtime.WithCaptureResponse(policy.WithHTTPHeader(ctx(t), http.Header{"If-Match": {etag}}), &initial)
	poller, err := e.client.BeginCreateOrUpdate(pctx, rg, "nic0", withConfigs(t, got.Interface, "pool1", "pool2", "pool3"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if initial.StatusCode != http.StatusOK || !strings.Contains(initial.Header.Get("Azure-AsyncOperation"), "/providers/Microsoft.Network/locations/westeurope/operations/") {
		t.Errorf("PUT answered %d, Azure-AsyncOperation %q", initial.StatusCode, initial.Header.Get("Azure-AsyncOperation"))
	}
	// While the operation runs, GET shows the old configurations in "Updating".
	if s := mustNIC(t, e.arm, "nic0"); s.ProvisioningState != azurefake.StateUpdating || len(s.IPConfigurations) != 1 || s.ETag != etag {
		t.Errorf("during the operation: %s, %d configs, etag changed %v", s.ProvisioningState, len(s.IPConfigurations), s.ETag != etag)
	}
	start := time.Now()
	res, err := poller.PollUntilDone(ctx(t), &runtime.PollUntilDoneOptions{Frequency: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("PollUntilDone took %s: the poller did not follow Retry-After-Ms", d)
	}

	want := map[string]string{"ipconfig1": "10.240.0.4", "pool1": "10.240.0.6", "pool2": "10.240.0.7", "pool3": "10.240.0.8"} // .5 is nic1's
	if a := addrsOf(res.Interface); !mapsEqual(a, want) {
		t.Errorf("result addresses %v, want %v", a, want)
	}
	if deref(res.Properties.ProvisioningState, "") != armnetwork.ProvisioningStateSucceeded || deref(res.Etag, "") == etag {
		t.Errorf("result state %s, etag changed %v", deref(res.Properties.ProvisioningState, ""), deref(res.Etag, "") != etag)
	}
	s := mustNIC(t, e.arm, "nic0")
	if got := stateAddrs(s); !slices.Equal(got, []string{"10.240.0.4", "10.240.0.6", "10.240.0.7", "10.240.0.8"}) {
		t.Errorf("committed addresses %v", got)
	}
	for _, c := range s.IPConfigurations {
		if !slices.Equal(c.ApplicationSecurityGroupIDs, []string{asgID}) || c.Subnet != subnetPrefix {
			t.Errorf("config %s: ASGs %v subnet %s", c.Name, c.ApplicationSecurityGroupIDs, c.Subnet)
		}
	}
	// OnChange fired before the operation reported success, with the full address list and MAC.
	ch := e.changes.all()
	if len(ch) != 1 || !slices.Equal(stateAddrs(ch[0]), stateAddrs(s)) || ch[0].MAC.String() != mac0.String() {
		t.Fatalf("OnChange calls: %+v", ch)
	}

	// What the SDK did: one PUT with If-Match, polls of the operation, one final GET of the NIC.
	var puts, polls, finalGets int
	for _, r := range e.arm.Requests() {
		switch {
		case r.Method == http.MethodPut:
			puts++
			if r.IfMatch != etag {
				t.Errorf("PUT If-Match %q, want %q", r.IfMatch, etag)
			}
		case r.Kind == azurefake.KindOperation:
			polls++
		case r.Kind == azurefake.KindNIC && r.Time.After(start):
			finalGets++
			if r.IfMatch != "" {
				t.Errorf("final GET carried If-Match %q", r.IfMatch)
			}
		}
	}
	if puts != 1 || polls < 2 || finalGets != 1 {
		t.Errorf("PUTs %d, operation polls %d (want >= 2: InProgress then Succeeded), final GETs %d", puts, polls, finalGets)
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestRemoveConfig(t *testing.T) {
	e := newEnv(t)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := put(t, e.client, "nic0", withConfigs(t, got.Interface, "a", "b"), *got.Etag)
	if err != nil {
		t.Fatal(err)
	}
	// Remove "a" (10.240.0.6).
	res.Properties.IPConfigurations = slices.DeleteFunc(res.Properties.IPConfigurations, func(c *armnetwork.InterfaceIPConfiguration) bool { return *c.Name == "a" })
	res, err = put(t, e.client, "nic0", res, *res.Etag)
	if err != nil {
		t.Fatal(err)
	}
	if a := addrsOf(res); !mapsEqual(a, map[string]string{"ipconfig1": "10.240.0.4", "b": "10.240.0.7"}) {
		t.Errorf("after removal: %v", a)
	}
	ch := e.changes.all()
	if len(ch) != 2 || !slices.Equal(stateAddrs(ch[1]), []string{"10.240.0.4", "10.240.0.7"}) {
		t.Errorf("OnChange calls %d, last %v", len(ch), stateAddrs(ch[len(ch)-1]))
	}
	// The freed address is the lowest free one again.
	res, err = put(t, e.client, "nic0", withConfigs(t, res, "c"), *res.Etag)
	if err != nil {
		t.Fatal(err)
	}
	if a := addrsOf(res); a["c"] != "10.240.0.6" {
		t.Errorf("new config got %s, want the freed 10.240.0.6", a["c"])
	}
}

func TestStaticConfig(t *testing.T) {
	e := newEnv(t)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	nic := withConfigs(t, got.Interface, "static")
	last := nic.Properties.IPConfigurations[1].Properties
	last.PrivateIPAllocationMethod = to.Ptr(armnetwork.IPAllocationMethodStatic)
	last.PrivateIPAddress = to.Ptr("10.240.0.100")
	res, err := put(t, e.client, "nic0", nic, "")
	if err != nil {
		t.Fatal(err)
	}
	if a := addrsOf(res); a["static"] != "10.240.0.100" {
		t.Errorf("static config got %s", a["static"])
	}
	// nic1 asking for the same address is refused.
	got1, err := e.client.Get(ctx(t), rg, "nic1", nil)
	if err != nil {
		t.Fatal(err)
	}
	nic = withConfigs(t, got1.Interface, "clash")
	last = nic.Properties.IPConfigurations[1].Properties
	last.PrivateIPAllocationMethod = to.Ptr(armnetwork.IPAllocationMethodStatic)
	last.PrivateIPAddress = to.Ptr("10.240.0.100")
	_, err = put(t, e.client, "nic1", nic, "")
	responseError(t, err, http.StatusBadRequest, azurefake.CodePrivateIPAddressInUse)
	// And Azure's reserved addresses cannot be had either.
	last.PrivateIPAddress = to.Ptr("10.240.0.255")
	_, err = put(t, e.client, "nic1", nic, "")
	responseError(t, err, http.StatusBadRequest, azurefake.CodePrivateIPAddressReserved)
}

func TestIfMatchPreconditionFailed(t *testing.T) {
	e := newEnv(t)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	// A concurrent writer adds a configuration: our etag is stale now.
	oob, err := e.arm.AddIPConfig(sub, rg, "nic0", "someone-else", netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	if oob != netip.MustParseAddr("10.240.0.6") {
		t.Errorf("out-of-band config got %s", oob)
	}
	if ch := e.changes.all(); len(ch) != 1 || len(ch[0].IPConfigurations) != 2 {
		t.Errorf("OnChange after out-of-band add: %+v", ch)
	}
	_, err = put(t, e.client, "nic0", withConfigs(t, got.Interface, "mine"), *got.Etag)
	responseError(t, err, http.StatusPreconditionFailed, azurefake.CodePreconditionFailed)
	if s := mustNIC(t, e.arm, "nic0"); len(s.IPConfigurations) != 2 {
		t.Errorf("NIC changed by a refused PUT: %v", stateAddrs(s))
	}
	// An etag-only change (TouchNIC) also invalidates If-Match.
	got, err = e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.arm.TouchNIC(sub, rg, "nic0"); err != nil {
		t.Fatal(err)
	}
	_, err = put(t, e.client, "nic0", withConfigs(t, got.Interface, "mine"), *got.Etag)
	responseError(t, err, http.StatusPreconditionFailed, azurefake.CodePreconditionFailed)
	// Re-read and retry: works, and keeps the other writer's configuration.
	got, err = e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := put(t, e.client, "nic0", withConfigs(t, got.Interface, "mine"), *got.Etag)
	if err != nil {
		t.Fatal(err)
	}
	if a := addrsOf(res); a["someone-else"] != "10.240.0.6" || a["mine"] != "10.240.0.7" {
		t.Errorf("after retry: %v", a)
	}
	// Out-of-band removal frees the address for the next allocation.
	if err := e.arm.RemoveIPConfig(sub, rg, "nic0", "someone-else"); err != nil {
		t.Fatal(err)
	}
	if s := mustNIC(t, e.arm, "nic0"); !slices.Equal(stateAddrs(s), []string{"10.240.0.4", "10.240.0.7"}) {
		t.Errorf("after out-of-band removal: %v", stateAddrs(s))
	}
}

func TestThrottleRetryAfterHonoured(t *testing.T) {
	e := newEnv(t)
	// Sub-second: Retry-After: 1 plus Retry-After-Ms: 150, which azcore prefers.
	e.arm.Throttle(2, 150*time.Millisecond)
	start := time.Now()
	if _, err := e.client.Get(ctx(t), rg, "nic0", nil); err != nil {
		t.Fatal(err)
	}
	// The client's own RetryDelay is 1ms: only the server's Retry-After explains the wait.
	if d := time.Since(start); d < 300*time.Millisecond || d > 1900*time.Millisecond {
		t.Errorf("two 150ms throttles took %s; Retry-After-Ms not honoured", d)
	}
	if n := e.arm.Count(http.MethodGet, http.StatusTooManyRequests); n != 2 {
		t.Errorf("429s = %d, want 2", n)
	}
	if n := e.arm.Count(http.MethodGet, http.StatusOK); n != 1 {
		t.Errorf("200s = %d, want 1", n)
	}

	// Whole seconds: only Retry-After, as ARM sends it.
	e.arm.Throttle(1, time.Second)
	start = time.Now()
	if _, err := e.client.Get(ctx(t), rg, "nic0", nil); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < time.Second {
		t.Errorf("Retry-After: 1 waited only %s", d)
	}

	// A Retry-After longer than the client's MaxRetryDelay is not retried: the 429 surfaces.
	short := newClient(t, e.srv.URL, e.caFile, policy.RetryOptions{RetryDelay: time.Millisecond, MaxRetryDelay: 500 * time.Millisecond})
	e.arm.Throttle(1, 2*time.Second)
	_, err := short.Get(ctx(t), rg, "nic0", nil)
	responseError(t, err, http.StatusTooManyRequests, azurefake.CodeTooManyRequests)

	// Throttling also hits the PUT and the polls; the SDK rides through both.
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	e.arm.Throttle(3, 20*time.Millisecond)
	res, err := put(t, e.client, "nic0", withConfigs(t, got.Interface, "x"), *got.Etag)
	if err != nil {
		t.Fatal(err)
	}
	if addrsOf(res)["x"] == "" {
		t.Error("no address after throttled PUT")
	}
	// All three 429s hit the PUT: azcore retries it in place.
	if n := e.arm.Count(http.MethodPut, http.StatusTooManyRequests); n != 3 {
		t.Errorf("throttled PUTs = %d, want 3", n)
	}
}

func TestFailedOperationWhole(t *testing.T) {
	e := newEnv(t)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	before := mustNIC(t, e.arm, "nic0")
	e.arm.FailNextOperation(azurefake.FailWhole)
	_, err = put(t, e.client, "nic0", withConfigs(t, got.Interface, "p1", "p2"), *got.Etag)
	responseError(t, err, http.StatusOK, azurefake.CodeInternalServerError) // the failed status document is a 200
	after := mustNIC(t, e.arm, "nic0")
	if !slices.Equal(stateAddrs(after), stateAddrs(before)) || after.ETag != before.ETag {
		t.Errorf("NIC changed by a failed operation: %v etag %s -> %s", stateAddrs(after), before.ETag, after.ETag)
	}
	if after.ProvisioningState != azurefake.StateFailed {
		t.Errorf("provisioningState %s, want Failed", after.ProvisioningState)
	}
	if ch := e.changes.all(); len(ch) != 0 {
		t.Errorf("OnChange fired for a failed operation: %+v", ch)
	}
	// The reserved addresses are free again, and the next PUT succeeds.
	res, err := put(t, e.client, "nic0", withConfigs(t, got.Interface, "p1"), *got.Etag)
	if err != nil {
		t.Fatal(err)
	}
	if a := addrsOf(res); a["p1"] != "10.240.0.6" || deref(res.Properties.ProvisioningState, "") != armnetwork.ProvisioningStateSucceeded {
		t.Errorf("after recovery: %v %s", a, deref(res.Properties.ProvisioningState, ""))
	}
}

func TestFailedOperationHalfway(t *testing.T) {
	e := newEnv(t)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	e.arm.FailNextOperation(azurefake.FailHalfway)
	_, err = put(t, e.client, "nic0", withConfigs(t, got.Interface, "p1", "p2", "p3"), *got.Etag)
	responseError(t, err, http.StatusOK, azurefake.CodeInternalServerError)
	s := mustNIC(t, e.arm, "nic0")
	if !slices.Equal(stateAddrs(s), []string{"10.240.0.4", "10.240.0.6", "10.240.0.7"}) || s.ETag == *got.Etag {
		t.Errorf("half-way failure left %v (etag changed %v), want p1 and p2 committed", stateAddrs(s), s.ETag != *got.Etag)
	}
	if ch := e.changes.all(); len(ch) != 1 || len(ch[0].IPConfigurations) != 3 {
		t.Errorf("OnChange after half-way failure: %+v", ch)
	}
	// The stale etag is refused; the client must re-read to see what happened.
	_, err = put(t, e.client, "nic0", withConfigs(t, got.Interface, "p1"), *got.Etag)
	responseError(t, err, http.StatusPreconditionFailed, azurefake.CodePreconditionFailed)
}

func TestOutage(t *testing.T) {
	e := newEnv(t)
	e.arm.Outage(true)
	_, err := e.client.Get(ctx(t), rg, "nic0", nil)
	responseError(t, err, http.StatusServiceUnavailable, azurefake.CodeServiceUnavailable)
	// azcore retried the 503 three times (its default MaxRetries).
	if n := e.arm.Count(http.MethodGet, http.StatusServiceUnavailable); n != 4 {
		t.Errorf("503s = %d, want 4", n)
	}
	e.arm.Outage(false)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}

	// An outage while polling fails PollUntilDone, but the operation still commits; the client
	// finds out by reading the NIC again.
	e.arm.SetOperationDelay(200 * time.Millisecond)
	poller, err := e.client.BeginCreateOrUpdate(policy.WithHTTPHeader(ctx(t), http.Header{"If-Match": {*got.Etag}}), rg, "nic0", withConfigs(t, got.Interface, "during-outage"), nil)
	if err != nil {
		t.Fatal(err)
	}
	e.arm.Outage(true)
	_, err = poller.PollUntilDone(ctx(t), &runtime.PollUntilDoneOptions{Frequency: 20 * time.Second})
	responseError(t, err, http.StatusServiceUnavailable, azurefake.CodeServiceUnavailable)
	eventually(t, 5*time.Second, "the operation to commit during the outage", func() bool {
		return len(mustNIC(t, e.arm, "nic0").IPConfigurations) == 2
	})
	e.arm.Outage(false)
	got, err = e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	if addrsOf(got.Interface)["during-outage"] == "" {
		t.Errorf("committed configuration not visible after the outage: %v", addrsOf(got.Interface))
	}
}

func TestValidation(t *testing.T) {
	e := newEnv(t)
	get := func() armnetwork.Interface {
		got, err := e.client.Get(ctx(t), rg, "nic0", nil)
		if err != nil {
			t.Fatal(err)
		}
		return got.Interface
	}
	cases := []struct {
		name   string
		mutate func(n *armnetwork.Interface)
		status int
		code   string
	}{
		{"unknown subnet", func(n *armnetwork.Interface) {
			*n = withConfigs(t, *n, "x")
			n.Properties.IPConfigurations[1].Properties.Subnet = &armnetwork.Subnet{ID: to.Ptr(azurefake.SubnetID(sub, rg, "vnet", "nope"))}
		}, 400, azurefake.CodeInvalidResourceReference},
		{"no subnet", func(n *armnetwork.Interface) {
			*n = withConfigs(t, *n, "x")
			n.Properties.IPConfigurations[1].Properties.Subnet = nil
		}, 400, azurefake.CodeInvalidRequestFormat},
		{"two primaries", func(n *armnetwork.Interface) {
			*n = withConfigs(t, *n, "x")
			n.Properties.IPConfigurations[1].Properties.Primary = to.Ptr(true)
		}, 400, azurefake.CodeInvalidPrimaryIPConfig},
		{"primary renamed", func(n *armnetwork.Interface) {
			n.Properties.IPConfigurations[0].Name = to.Ptr("renamed")
		}, 400, azurefake.CodePrimaryIPConfigChanged},
		{"primary readdressed", func(n *armnetwork.Interface) {
			n.Properties.IPConfigurations[0].Properties.PrivateIPAddress = to.Ptr("10.240.0.50")
		}, 400, azurefake.CodePrimaryIPConfigChanged},
		{"primary removed", func(n *armnetwork.Interface) {
			*n = withConfigs(t, *n, "x")
			n.Properties.IPConfigurations = n.Properties.IPConfigurations[1:]
		}, 400, azurefake.CodePrimaryIPConfigChanged},
		{"duplicate names", func(n *armnetwork.Interface) {
			*n = withConfigs(t, *n, "x", "X")
		}, 400, azurefake.CodeDuplicateResourceName},
		{"no configurations", func(n *armnetwork.Interface) {
			n.Properties.IPConfigurations = nil
		}, 400, azurefake.CodeInvalidRequestFormat},
		{"other location", func(n *armnetwork.Interface) {
			n.Location = to.Ptr("eastus")
		}, 400, azurefake.CodeInvalidResourceLocation},
		{"too many", func(n *armnetwork.Interface) {
			e.arm.SetMaxIPConfigs(3)
			*n = withConfigs(t, *n, "a", "b", "c")
		}, 400, azurefake.CodeExceededMaxIPConfigs},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := get()
			c.mutate(&n)
			_, err := put(t, e.client, "nic0", n, *n.Etag)
			responseError(t, err, c.status, c.code)
			if s := mustNIC(t, e.arm, "nic0"); len(s.IPConfigurations) != 1 || s.ProvisioningState != azurefake.StateSucceeded {
				t.Errorf("refused PUT changed the NIC: %v %s", stateAddrs(s), s.ProvisioningState)
			}
		})
	}
	e.arm.SetMaxIPConfigs(azurefake.MaxIPConfigsPerNIC)
	// Exactly at the limit is fine.
	e.arm.SetMaxIPConfigs(3)
	if _, err := put(t, e.client, "nic0", withConfigs(t, get(), "a", "b"), ""); err != nil {
		t.Errorf("PUT at the limit: %v", err)
	}
}

func TestSubnetFull(t *testing.T) {
	e := newEnv(t)
	small := azurefake.SubnetID(sub, rg, "vnet", "small")
	// A /29 has 8 addresses; Azure reserves .0-.3 and .7, leaving .4, .5, .6.
	if err := e.arm.AddSubnet(small, netip.MustParsePrefix("10.241.0.0/29")); err != nil {
		t.Fatal(err)
	}
	st, err := e.arm.AddNIC(sub, rg, "smallnic", location, net.HardwareAddr{0, 0x0d, 0x3a, 9, 9, 9}, small, netip.Addr{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := e.client.Get(ctx(t), rg, "smallnic", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = put(t, e.client, "smallnic", withConfigs(t, got.Interface, "a", "b", "c"), st.ETag)
	responseError(t, err, http.StatusBadRequest, azurefake.CodeSubnetIsFull)
	res, err := put(t, e.client, "smallnic", withConfigs(t, got.Interface, "a", "b"), st.ETag)
	if err != nil {
		t.Fatal(err)
	}
	if a := addrsOf(res); !mapsEqual(a, map[string]string{"ipconfig1": "10.241.0.4", "a": "10.241.0.5", "b": "10.241.0.6"}) {
		t.Errorf("small subnet addresses %v", a)
	}
}

func TestAnotherOperationInProgress(t *testing.T) {
	e := newEnv(t)
	e.arm.SetOperationDelay(time.Second)
	got, err := e.client.Get(ctx(t), rg, "nic0", nil)
	if err != nil {
		t.Fatal(err)
	}
	poller, err := e.client.BeginCreateOrUpdate(ctx(t), rg, "nic0", withConfigs(t, got.Interface, "first"), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.client.BeginCreateOrUpdate(ctx(t), rg, "nic0", withConfigs(t, got.Interface, "second"), nil)
	responseError(t, err, http.StatusConflict, azurefake.CodeAnotherOperationInProgress)
	if _, err := poller.PollUntilDone(ctx(t), nil); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentNICsGetDistinctAddresses(t *testing.T) {
	e := newEnv(t)
	e.arm.SetOperationDelay(200 * time.Millisecond)
	var wg sync.WaitGroup
	results := make([]armnetwork.Interface, 2)
	errs := make([]error, 2)
	for i, name := range []string{"nic0", "nic1"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := e.client.Get(ctx(t), rg, name, nil)
			if err != nil {
				errs[i] = err
				return
			}
			results[i], errs[i] = put(t, e.client, name, withConfigs(t, got.Interface, "a", "b", "c"), *got.Etag)
		}()
	}
	wg.Wait()
	seen := map[string]string{}
	for i, r := range results {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		for cfg, addr := range addrsOf(r) {
			if other, dup := seen[addr]; dup {
				t.Errorf("%s given to both %s and %s/%s", addr, other, *r.Name, cfg)
			}
			seen[addr] = *r.Name + "/" + cfg
		}
	}
	if len(seen) != 8 {
		t.Errorf("%d distinct addresses, want 8", len(seen))
	}
}

func TestCreateNICByPUT(t *testing.T) {
	e := newEnv(t)
	nic := armnetwork.Interface{
		Location: to.Ptr(location),
		Tags:     map[string]*string{"owner": to.Ptr("test")},
		Properties: &armnetwork.InterfacePropertiesFormat{IPConfigurations: []*armnetwork.InterfaceIPConfiguration{{
			Name:       to.Ptr("ipconfig1"),
			Properties: &armnetwork.InterfaceIPConfigurationPropertiesFormat{Subnet: &armnetwork.Subnet{ID: to.Ptr(subnetID)}},
		}}},
	}
	res, err := put(t, e.client, "nic2", nic, "")
	if err != nil {
		t.Fatal(err)
	}
	if a := addrsOf(res); a["ipconfig1"] != "10.240.0.6" || !deref(res.Properties.IPConfigurations[0].Properties.Primary, false) {
		t.Errorf("created NIC: %v", a)
	}
	if deref(res.Tags["owner"], "") != "test" || !strings.HasPrefix(deref(res.Properties.MacAddress, ""), "00-0D-3A-") {
		t.Errorf("tags %v mac %s", res.Tags, deref(res.Properties.MacAddress, ""))
	}
	if n := e.arm.Count(http.MethodPut, http.StatusCreated); n != 1 {
		t.Errorf("PUT 201s = %d", n)
	}
	// If-None-Match: * refuses to overwrite it.
	_, err = e.client.BeginCreateOrUpdate(policy.WithHTTPHeader(ctx(t), http.Header{"If-None-Match": {"*"}}), rg, "nic2", nic, nil)
	responseError(t, err, http.StatusPreconditionFailed, azurefake.CodePreconditionFailed)
}

func TestTLSRequired(t *testing.T) {
	e := newEnv(t)
	// A client that does not trust the fake's CA fails the handshake.
	untrusted, err := armnetwork.NewInterfacesClient(sub, staticCredential{}, &arm.ClientOptions{
		ClientOptions: policy.ClientOptions{
			Cloud: cloud.Configuration{Services: map[cloud.ServiceName]cloud.ServiceConfiguration{
				cloud.ResourceManager: {Endpoint: e.srv.URL, Audience: "https://management.azure.com"},
			}},
			Retry: policy.RetryOptions{MaxRetries: -1},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := untrusted.Get(ctx(t), rg, "nic0", nil); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("untrusted client: %v, want a certificate error", err)
	}
	// And azcore refuses to send a token over plain http at all.
	plain := httptest.NewServer(e.arm)
	defer plain.Close()
	c := newClient(t, plain.URL, e.caFile, policy.RetryOptions{MaxRetries: -1})
	if _, err := c.Get(ctx(t), rg, "nic0", nil); err == nil || !strings.Contains(err.Error(), "https") {
		t.Errorf("plain http: %v, want the bearer policy's https error", err)
	}
	if n := e.arm.Count("", 0); n != 0 {
		t.Errorf("%d requests reached the fake", n)
	}
}

func TestRawARMChecks(t *testing.T) {
	e := newEnv(t)
	hc, err := azurefake.NewHTTPClient(e.caFile)
	if err != nil {
		t.Fatal(err)
	}
	do := func(path string, auth bool) int {
		req, _ := http.NewRequestWithContext(ctx(t), http.MethodGet, e.srv.URL+path, nil)
		if auth {
			req.Header.Set("Authorization", "Bearer x")
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	nicPath := "/subscriptions/" + sub + "/resourceGroups/" + rg + "/providers/Microsoft.Network/networkInterfaces/nic0"
	if st := do(nicPath+"?api-version=2025-01-01", false); st != http.StatusUnauthorized {
		t.Errorf("no token: %d", st)
	}
	if st := do(nicPath, true); st != http.StatusBadRequest {
		t.Errorf("no api-version: %d", st)
	}
	// ARM matches path segments and names case-insensitively.
	if st := do(strings.ToLower(strings.Replace(nicPath, "nic0", "NIC0", 1))+"?api-version=2025-01-01", true); st != http.StatusOK {
		t.Errorf("case-insensitive path: %d", st)
	}
}

func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}
