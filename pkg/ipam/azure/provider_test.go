package azure

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	azfake "github.com/Azure/azure-sdk-for-go/sdk/azcore/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v7"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v7/fake"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/ipam"
)

const (
	subnetID = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/nodes"
	asgID    = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/applicationSecurityGroups/web"
)

var nicMAC = net.HardwareAddr{0x00, 0x0d, 0x3a, 0x01, 0x02, 0x03}

// fakeNIC is the NIC behind the SDK's fake InterfacesServer: it assigns addresses to new
// dynamic configurations as ARM does, and lets a test inject the faults ARM has.
type fakeNIC struct {
	mu      sync.Mutex
	nic     armnetwork.Interface
	next    netip.Addr // next dynamic address
	etag    int
	puts    int
	gets    int
	failPut func(n int, errResp *azfake.ErrorResponder) bool // fail the PUT before accepting it
	failLRO func(n int) bool                                 // fail the long-running operation
	late    bool                                             // new configurations get addresses one GET later
	onPut   func(n int, params *armnetwork.Interface)        // observe or alter a PUT
	lateIPs map[string]netip.Addr
}

func newFakeNIC() *fakeNIC {
	f := &fakeNIC{next: netip.MustParseAddr("10.0.0.10"), lateIPs: map[string]netip.Addr{}}
	f.nic = armnetwork.Interface{
		Name: to.Ptr("node1-nic"),
		Etag: to.Ptr(`W/"0"`),
		Properties: &armnetwork.InterfacePropertiesFormat{
			MacAddress: to.Ptr("00-0D-3A-01-02-03"),
			IPConfigurations: []*armnetwork.InterfaceIPConfiguration{{
				Name: to.Ptr("ipconfig1"),
				Properties: &armnetwork.InterfaceIPConfigurationPropertiesFormat{
					Primary:                   to.Ptr(true),
					PrivateIPAddress:          to.Ptr("10.0.0.4"),
					PrivateIPAllocationMethod: to.Ptr(armnetwork.IPAllocationMethodDynamic),
					Subnet:                    &armnetwork.Subnet{ID: to.Ptr(subnetID)},
					ApplicationSecurityGroups: []*armnetwork.ApplicationSecurityGroup{{ID: to.Ptr(asgID)}},
					ProvisioningState:         to.Ptr(armnetwork.ProvisioningStateSucceeded),
				},
			}},
		},
	}
	return f
}

// addConfig adds a secondary configuration out of band (a person, or another writer).
func (f *fakeNIC) addConfig(name string, ip netip.Addr) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nic.Properties.IPConfigurations = append(f.nic.Properties.IPConfigurations, &armnetwork.InterfaceIPConfiguration{
		Name: to.Ptr(name),
		Properties: &armnetwork.InterfaceIPConfigurationPropertiesFormat{
			PrivateIPAddress: to.Ptr(ip.String()), Subnet: &armnetwork.Subnet{ID: to.Ptr(subnetID)},
			ProvisioningState: to.Ptr(armnetwork.ProvisioningStateSucceeded),
		},
	})
	f.bump()
}

func (f *fakeNIC) bump() {
	f.etag++
	f.nic.Etag = to.Ptr(fmt.Sprintf(`W/"%d"`, f.etag))
}

// snapshot deep-copies the NIC so the provider never shares memory with the "server".
func (f *fakeNIC) snapshot() armnetwork.Interface {
	b, _ := f.nic.MarshalJSON()
	var out armnetwork.Interface
	out.UnmarshalJSON(b)
	return out
}

func (f *fakeNIC) configs() []*armnetwork.InterfaceIPConfiguration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.snapshot().Properties.IPConfigurations
}

func (f *fakeNIC) server() *fake.InterfacesServer {
	return &fake.InterfacesServer{
		Get: func(_ context.Context, rg, name string, _ *armnetwork.InterfacesClientGetOptions) (resp azfake.Responder[armnetwork.InterfacesClientGetResponse], errResp azfake.ErrorResponder) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.gets++
			for _, c := range f.nic.Properties.IPConfigurations {
				if ip, ok := f.lateIPs[*c.Name]; ok && c.Properties.PrivateIPAddress == nil {
					// The address shows from the second read on.
					c.Properties.PrivateIPAddress = to.Ptr(ip.String())
					c.Properties.ProvisioningState = to.Ptr(armnetwork.ProvisioningStateSucceeded)
				}
			}
			resp.SetResponse(http.StatusOK, armnetwork.InterfacesClientGetResponse{Interface: f.snapshot()}, nil)
			return
		},
		BeginCreateOrUpdate: func(_ context.Context, rg, name string, params armnetwork.Interface, _ *armnetwork.InterfacesClientBeginCreateOrUpdateOptions) (resp azfake.PollerResponder[armnetwork.InterfacesClientCreateOrUpdateResponse], errResp azfake.ErrorResponder) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.puts++
			if f.failPut != nil && f.failPut(f.puts, &errResp) {
				return
			}
			if f.onPut != nil {
				f.onPut(f.puts, &params)
			}
			if params.Etag != nil && *params.Etag != *f.nic.Etag {
				errResp.SetResponseError(http.StatusPreconditionFailed, "PreconditionFailed")
				return
			}
			for _, c := range params.Properties.IPConfigurations {
				if c.Properties.PrivateIPAddress != nil {
					continue
				}
				ip := f.next
				f.next = f.next.Next()
				if f.late {
					f.lateIPs[*c.Name] = ip
					c.Properties.ProvisioningState = to.Ptr(armnetwork.ProvisioningStateUpdating)
					continue
				}
				c.Properties.PrivateIPAddress = to.Ptr(ip.String())
				c.Properties.ProvisioningState = to.Ptr(armnetwork.ProvisioningStateSucceeded)
			}
			resp.AddNonTerminalResponse(http.StatusOK, nil)
			if f.failLRO != nil && f.failLRO(f.puts) {
				resp.SetTerminalError(http.StatusInternalServerError, "InternalServerError")
				return
			}
			f.nic = params
			f.bump()
			resp.SetTerminalResponse(http.StatusOK, armnetwork.InterfacesClientCreateOrUpdateResponse{Interface: f.snapshot()}, nil)
			return
		},
	}
}

type harness struct {
	t    *testing.T
	nic  *fakeNIC
	pool *ipam.Pool
	p    *Provider
}

func newHarness(t *testing.T, minFree, batch, maxFree, maxIPs int) *harness {
	t.Helper()
	f := newFakeNIC()
	pool, err := ipam.Open(filepath.Join(t.TempDir(), "state.db"), ipam.Options{Cooldown: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	p, err := New(Config{
		SubscriptionID: "sub", ResourceGroup: "rg", NICName: "node1-nic", MAC: nicMAC,
		MinFree: minFree, Batch: batch, MaxFree: maxFree, MaxIPs: maxIPs,
		Transport:       fake.NewInterfacesServerTransport(f.server()),
		TokenCredential: &azfake.TokenCredential{},
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return &harness{t: t, nic: f, pool: pool, p: p}
}

// freshClient replaces the ARM client: the SDK's fake transport keeps a failed poller keyed
// by URL and would replay it to the next PUT, which real ARM does not do.
func (h *harness) freshClient() {
	h.p.nics = nil
	h.p.cfg.Transport = fake.NewInterfacesServerTransport(h.nic.server())
}

func (h *harness) step() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return h.p.step(ctx, h.pool)
}

func (h *harness) mustStep() {
	h.t.Helper()
	if err := h.step(); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) allocate(n int) []netip.Addr {
	h.t.Helper()
	var out []netip.Addr
	for i := 0; i < n; i++ {
		a, _, err := h.pool.Allocate(api.Owner{Key: api.Key{ContainerID: fmt.Sprintf("c%d-%d", time.Now().UnixNano(), i), IfName: "eth0"}})
		if err != nil {
			h.t.Fatal(err)
		}
		out = append(out, a.IP)
	}
	return out
}

func TestGrowCopiesSubnetAndASGsOfPrimary(t *testing.T) {
	h := newHarness(t, 2, 4, 8, MaxIPConfigs)
	h.mustStep()
	cfgs := h.nic.configs()
	if len(cfgs) != 5 {
		t.Fatalf("NIC has %d IP configurations after growing from 1 by a batch of 4", len(cfgs))
	}
	for _, c := range cfgs[1:] {
		pr := c.Properties
		if !strings.HasPrefix(*c.Name, ConfigPrefix) || *pr.Primary || *pr.Subnet.ID != subnetID ||
			len(pr.ApplicationSecurityGroups) != 1 || *pr.ApplicationSecurityGroups[0].ID != asgID {
			t.Errorf("added configuration %s: %+v, want a secondary named %s* in the primary's subnet and ASGs", *c.Name, pr, ConfigPrefix)
		}
	}
	if st := h.pool.State(); st.Size != 4 || st.Free != 4 {
		t.Errorf("pool %d addresses, %d free; want the 4 new ones", st.Size, st.Free)
	}
	h.mustStep() // 4 free >= minFree 2: nothing to do
	if h.nic.puts != 1 {
		t.Errorf("%d PUTs, want 1: the pool was warm", h.nic.puts)
	}
}

func TestGrowStopsAtMaxIPs(t *testing.T) {
	h := newHarness(t, 8, 16, 24, 3)
	h.mustStep()
	h.mustStep()
	if n := len(h.nic.configs()); n != 3 {
		t.Fatalf("NIC has %d IP configurations, want maxIPs 3", n)
	}
	if h.nic.puts != 1 {
		t.Errorf("%d PUTs: the provider kept asking past maxIPs", h.nic.puts)
	}
}

func TestGrowWhenAllocationsUseThePool(t *testing.T) {
	h := newHarness(t, 2, 4, 8, MaxIPConfigs)
	h.mustStep()
	h.allocate(3) // 1 free left < minFree
	h.mustStep()
	if st := h.pool.State(); st.Size != 8 || st.Free != 5 {
		t.Errorf("pool %d addresses, %d free after a second growth; want 8 and 5", st.Size, st.Free)
	}
}

func TestShrinkReleasesOnlyOwnFreeConfigs(t *testing.T) {
	h := newHarness(t, 1, 8, 2, MaxIPConfigs)
	h.nic.addConfig("by-hand", netip.MustParseAddr("10.0.0.200"))
	h.mustStep() // pool: 1 hand-made, free 1 >= minFree: no growth
	h.p.cfg.MinFree = 3
	h.mustStep() // grows by 8: 9 addresses
	held := h.allocate(2)
	h.p.cfg.MinFree = 1
	h.mustStep() // free 7 > maxFree 2: give back 5 of ours
	st := h.pool.State()
	if st.Free != 2 || st.Used != 2 {
		t.Fatalf("pool after shrink: %d free, %d used; want 2 and 2", st.Free, st.Used)
	}
	names := map[string]bool{}
	addrs := map[string]bool{}
	for _, c := range h.nic.configs() {
		names[*c.Name] = true
		addrs[*c.Properties.PrivateIPAddress] = true
	}
	if !names["by-hand"] || !names["ipconfig1"] {
		t.Errorf("shrink removed a configuration vnetbpf did not create: %v", names)
	}
	for _, ip := range held {
		if !addrs[ip.String()] {
			t.Errorf("shrink removed %s, which is allocated", ip)
		}
	}
	// 7 free (by-hand + 6 of ours) above maxFree 2: 5 of ours go, leaving by-hand and one
	// of ours free.
	if len(names) != 1+1+2+1 {
		t.Errorf("NIC keeps %d configurations, want primary + by-hand + 2 used + 1 own free", len(names))
	}
}

// The SDK's fake transport hands an injected error straight back, past azcore's retry policy,
// so this checks the provider's own handling: the step fails with a message naming the
// throttling, and the next step succeeds. (The e2e fake ARM, over real HTTP, checks that the
// SDK honours Retry-After.)
func TestThrottledPutIsRetriedNextStep(t *testing.T) {
	h := newHarness(t, 2, 4, 8, MaxIPConfigs)
	h.nic.failPut = func(n int, e *azfake.ErrorResponder) bool {
		if n == 1 {
			e.SetResponseError(http.StatusTooManyRequests, "TooManyRequests")
			return true
		}
		return false
	}
	if err := h.step(); err == nil || !strings.Contains(err.Error(), "throttling") {
		t.Fatalf("step: %v, want an error that says ARM is throttling", err)
	}
	if st := h.pool.State(); st.Size != 0 {
		t.Fatalf("pool has %d addresses after a refused PUT", st.Size)
	}
	h.mustStep()
	if st := h.pool.State(); st.Free != 4 {
		t.Errorf("pool has %d free after the retry, want 4", st.Free)
	}
}

func TestFailedOperationLeavesPoolUnchangedThenConverges(t *testing.T) {
	h := newHarness(t, 2, 4, 8, MaxIPConfigs)
	h.nic.failLRO = func(n int) bool { return n == 1 }
	if err := h.step(); err == nil {
		t.Fatal("step succeeded although the long-running operation failed")
	}
	if st := h.pool.State(); st.Size != 0 {
		t.Fatalf("pool has %d addresses after a failed growth; it must only learn what ARM provisioned", st.Size)
	}
	if n := len(h.nic.configs()); n != 1 {
		t.Fatalf("NIC has %d configurations after the failed operation", n)
	}
	h.freshClient()
	h.mustStep()
	if st := h.pool.State(); st.Size != 4 {
		t.Errorf("pool has %d addresses after the retry, want 4", st.Size)
	}
}

func TestConcurrentWriterIsNotOverwritten(t *testing.T) {
	h := newHarness(t, 2, 4, 8, MaxIPConfigs)
	h.nic.onPut = func(n int, params *armnetwork.Interface) {
		if n == 1 { // someone else writes the NIC between our GET and PUT
			h.nic.nic.Properties.IPConfigurations = append(h.nic.nic.Properties.IPConfigurations, &armnetwork.InterfaceIPConfiguration{
				Name: to.Ptr("other-writer"),
				Properties: &armnetwork.InterfaceIPConfigurationPropertiesFormat{
					PrivateIPAddress: to.Ptr("10.0.0.250"), Subnet: &armnetwork.Subnet{ID: to.Ptr(subnetID)},
					ProvisioningState: to.Ptr(armnetwork.ProvisioningStateSucceeded),
				},
			})
			h.nic.bump()
		}
	}
	if err := h.step(); err == nil || !strings.Contains(err.Error(), "changed while we wrote it") {
		t.Fatalf("step: %v, want a precondition failure", err)
	}
	h.mustStep()
	names := map[string]bool{}
	for _, c := range h.nic.configs() {
		names[*c.Name] = true
	}
	if !names["other-writer"] || len(names) != 1+1+4 {
		t.Errorf("configurations %v: want the other writer's kept and our batch of 4 added", names)
	}
}

func TestLateAddressesAreNotHandedOutEarly(t *testing.T) {
	h := newHarness(t, 2, 4, 8, MaxIPConfigs)
	h.nic.late = true
	h.mustStep()
	if st := h.pool.State(); st.Size != 0 {
		t.Fatalf("pool has %d addresses before ARM showed any", st.Size)
	}
	h.mustStep() // the addresses show now; no second growth for the pending ones
	if st := h.pool.State(); st.Size != 4 {
		t.Errorf("pool has %d addresses once ARM shows them, want 4", st.Size)
	}
	if h.nic.puts != 1 {
		t.Errorf("%d PUTs: the provider grew again while configurations were pending", h.nic.puts)
	}
}

func TestFailedShrinkReturnsAddresses(t *testing.T) {
	h := newHarness(t, 1, 6, 2, MaxIPConfigs)
	h.mustStep() // 6 free
	h.nic.failLRO = func(n int) bool { return true }
	if err := h.step(); err == nil {
		t.Fatal("shrink succeeded although ARM failed")
	}
	if st := h.pool.State(); st.Size != 6 || st.Free != 6 {
		t.Errorf("pool %d addresses, %d free after a failed shrink; want all 6 back", st.Size, st.Free)
	}
}
