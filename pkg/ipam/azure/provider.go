package azure

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v7"

	"github.com/vnetbpf/vnetbpf/pkg/ipam"
)

// MaxIPConfigs is Azure's limit of IP configurations on one NIC, the primary included.
const MaxIPConfigs = 256

// ConfigPrefix names the IP configurations vnetbpf creates: only those are ever removed, so
// configurations a person made by hand are used but never taken away.
const ConfigPrefix = "vnetbpf-"

// Config configures the provider.
type Config struct {
	IMDSURL        string
	ARMEndpoint    string
	CAFile         string
	Credential     string
	ClientID       string
	TokenFile      string
	SubscriptionID string
	ResourceGroup  string
	NICName        string
	// MinFree is how many free addresses the pool keeps; below it, it grows by Batch.
	MinFree int
	// Batch is how many IP configurations one growth adds.
	Batch int
	// MaxFree is how many free, cooled-down addresses the pool keeps at most; above it, it
	// gives the surplus back.
	MaxFree int
	// MaxIPs caps the NIC's IP configurations, the primary included (at most MaxIPConfigs).
	MaxIPs int
	// Interval is how often the pool is checked without a trigger.
	Interval time.Duration
	// MAC is the NIC's MAC, from the node's interface.
	MAC net.HardwareAddr
	// Transport replaces the HTTP transport of the ARM client (tests use the SDK's fakes).
	Transport policy.Transporter
	// Credential replaces the credential built from Credential (tests).
	TokenCredential azcore.TokenCredential
}

// Validate checks the warm-pool numbers.
func (c *Config) Validate() error {
	switch {
	case c.MaxIPs < 2 || c.MaxIPs > MaxIPConfigs:
		return fmt.Errorf("ipam.azure.maxIPs %d: want 2..%d (Azure's limit per NIC, primary included)", c.MaxIPs, MaxIPConfigs)
	case c.Batch < 1:
		return fmt.Errorf("ipam.azure.batch %d: want at least 1", c.Batch)
	case c.MinFree < 0 || c.MaxFree < c.MinFree:
		return fmt.Errorf("ipam.azure.minFree %d and maxFree %d: want 0 <= minFree <= maxFree", c.MinFree, c.MaxFree)
	}
	return nil
}

// Status is the provider's side of the pool, for `ipam show` and metrics.
type Status struct {
	NIC         string    // resource ID of the NIC once found
	IPConfigs   int       // on the NIC, primary included, as ARM last showed it
	Pending     int       // being added by a PUT not yet finished
	LastError   string    // the last ARM or IMDS failure, cleared by a success
	LastErrorAt time.Time // when it happened
	Grown       int       // IP configurations added since start
	Released    int       // IP configurations removed since start
}

// Provider keeps the NIC's secondary IP configurations in step with the pool's needs. It is
// the one writer of its NIC: every change goes through its loop.
type Provider struct {
	cfg  Config
	log  *slog.Logger
	imds *IMDS

	nics    *armnetwork.InterfacesClient
	rg, nic string

	trigger chan struct{}
	mu      sync.Mutex
	status  Status
}

// New returns a provider; it contacts nothing until Addresses or Run.
func New(cfg Config, log *slog.Logger) (*Provider, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.IMDSURL == "" {
		cfg.IMDSURL = DefaultIMDSURL
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
	}
	if len(cfg.MAC) != 6 {
		return nil, fmt.Errorf("azure provider: the NIC's MAC is required")
	}
	return &Provider{cfg: cfg, log: log, imds: NewIMDS(cfg.IMDSURL), trigger: make(chan struct{}, 1)}, nil
}

// Name is "azure".
func (p *Provider) Name() string { return "azure" }

// Addresses is what IMDS shows on the NIC, less the primary: the node's own.
func (p *Provider) Addresses(ctx context.Context) ([]netip.Addr, error) {
	doc, err := p.imds.Network(ctx)
	if err != nil {
		return nil, err
	}
	in, ok := doc.InterfaceByMAC(p.cfg.MAC)
	if !ok {
		return nil, fmt.Errorf("IMDS lists no interface with MAC %s (is 'nic' the VNet interface?)", p.cfg.MAC)
	}
	addrs := in.Addresses()
	if len(addrs) == 0 {
		return nil, nil
	}
	return addrs[1:], nil
}

// Trigger asks the loop to check the pool now, e.g. because an allocation found it empty.
func (p *Provider) Trigger() {
	select {
	case p.trigger <- struct{}{}:
	default:
	}
}

// Status returns the provider's state.
func (p *Provider) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status
}

func (p *Provider) update(fn func(*Status)) {
	p.mu.Lock()
	fn(&p.status)
	p.mu.Unlock()
}

func (p *Provider) fail(err error) {
	p.log.Warn("azure provider", "err", err)
	p.update(func(s *Status) { s.LastError, s.LastErrorAt = err.Error(), time.Now().UTC() })
}

// Run keeps the pool between MinFree and MaxFree until ctx ends. Failures are logged, kept
// in Status and retried with backoff; they never corrupt the pool, because the pool only
// learns of addresses ARM shows as provisioned.
func (p *Provider) Run(ctx context.Context, pool *ipam.Pool) {
	backoff := time.Second
	for {
		wait := p.cfg.Interval
		if err := p.step(ctx, pool); err != nil {
			if ctx.Err() != nil {
				return
			}
			p.fail(err)
			wait, backoff = backoff, min(backoff*2, 30*time.Second)
		} else {
			backoff = time.Second
			p.update(func(s *Status) { s.LastError, s.LastErrorAt = "", time.Time{} })
		}
		select {
		case <-ctx.Done():
			return
		case <-p.trigger:
		case <-time.After(wait):
		}
	}
}

// step makes one decision: read the NIC, give the pool what ARM shows, then grow or shrink
// by one batch. Several steps converge; each leaves a consistent state.
func (p *Provider) step(ctx context.Context, pool *ipam.Pool) error {
	if err := p.resolve(ctx); err != nil {
		return err
	}
	nic, err := p.get(ctx)
	if err != nil {
		return err
	}
	view := parseNIC(nic)
	if err := pool.SetAddresses(view.secondaries()); err != nil {
		return err
	}
	st := pool.State()
	p.update(func(s *Status) { s.IPConfigs = len(view.configs) })
	switch {
	case st.Free+view.pending < p.cfg.MinFree && len(view.configs) < p.cfg.MaxIPs:
		n := min(p.cfg.Batch, p.cfg.MaxIPs-len(view.configs))
		return p.grow(ctx, pool, nic, view, n)
	case st.Free > p.cfg.MaxFree:
		return p.shrink(ctx, pool, nic, view, st.Free-p.cfg.MaxFree)
	}
	if view.pending > 0 {
		// ARM accepted configurations that have no address yet: look again soon.
		p.Trigger()
	}
	return nil
}

// resolve finds the NIC's resource group and name: from the config, else from IMDS's
// compute document and the resource group's NIC whose MAC is the node's.
func (p *Provider) resolve(ctx context.Context) error {
	if p.nics != nil {
		return nil
	}
	cfg := p.cfg
	if cfg.SubscriptionID == "" || cfg.ResourceGroup == "" {
		doc, err := p.imds.Compute(ctx)
		if err != nil {
			return fmt.Errorf("find subscription and resource group: %w", err)
		}
		if cfg.SubscriptionID == "" {
			cfg.SubscriptionID = doc.SubscriptionID
		}
		if cfg.ResourceGroup == "" {
			cfg.ResourceGroup = doc.ResourceGroupName
		}
	}
	cred := cfg.TokenCredential
	if cred == nil {
		var err error
		if cred, err = newCredential(cfg); err != nil {
			return err
		}
	}
	client, err := newInterfacesClient(cfg, cred, cfg.Transport)
	if err != nil {
		return err
	}
	name := cfg.NICName
	if name == "" {
		if name, err = findNICByMAC(ctx, client, cfg.ResourceGroup, p.cfg.MAC); err != nil {
			return err
		}
	}
	p.nics, p.rg, p.nic = client, cfg.ResourceGroup, name
	p.update(func(s *Status) {
		s.NIC = fmt.Sprintf("/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Network/networkInterfaces/%s", cfg.SubscriptionID, p.rg, p.nic)
	})
	p.log.Info("azure provider found its NIC", "subscription", cfg.SubscriptionID, "resourceGroup", p.rg, "nic", p.nic)
	return nil
}

func findNICByMAC(ctx context.Context, client *armnetwork.InterfacesClient, rg string, mac net.HardwareAddr) (string, error) {
	want := normalizeMAC(mac.String())
	pager := client.NewListPager(rg, nil)
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return "", fmt.Errorf("list NICs of resource group %s: %w", rg, err)
		}
		for _, n := range page.Value {
			if n.Properties != nil && n.Properties.MacAddress != nil && normalizeMAC(*n.Properties.MacAddress) == want && n.Name != nil {
				return *n.Name, nil
			}
		}
	}
	return "", fmt.Errorf("no NIC in resource group %s has MAC %s; set ipam.azure.nicName", rg, mac)
}

func (p *Provider) get(ctx context.Context) (armnetwork.Interface, error) {
	resp, err := p.nics.Get(ctx, p.rg, p.nic, nil)
	if err != nil {
		return armnetwork.Interface{}, fmt.Errorf("get NIC %s: %w", p.nic, err)
	}
	return resp.Interface, nil
}

// nicView is what the provider reads from a NIC.
type nicView struct {
	configs []*armnetwork.InterfaceIPConfiguration
	primary *armnetwork.InterfaceIPConfiguration
	// ready holds the secondary configurations ARM shows provisioned with an address.
	ready   map[netip.Addr]*armnetwork.InterfaceIPConfiguration
	pending int
}

func parseNIC(nic armnetwork.Interface) nicView {
	v := nicView{ready: make(map[netip.Addr]*armnetwork.InterfaceIPConfiguration)}
	if nic.Properties == nil {
		return v
	}
	v.configs = nic.Properties.IPConfigurations
	for _, c := range v.configs {
		if c == nil || c.Properties == nil {
			continue
		}
		pr := c.Properties
		if pr.Primary != nil && *pr.Primary {
			v.primary = c
			continue
		}
		ip, err := netip.ParseAddr(str(pr.PrivateIPAddress))
		provisioned := pr.ProvisioningState == nil || *pr.ProvisioningState == armnetwork.ProvisioningStateSucceeded
		if err != nil || !ip.Is4() || !provisioned {
			v.pending++
			continue
		}
		v.ready[ip] = c
	}
	return v
}

func (v nicView) secondaries() []netip.Addr {
	out := make([]netip.Addr, 0, len(v.ready))
	for ip := range v.ready {
		out = append(out, ip)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// grow adds n dynamic IP configurations in the primary's subnet, with its application
// security groups, so NSG rules written for the node apply to its containers.
func (p *Provider) grow(ctx context.Context, pool *ipam.Pool, nic armnetwork.Interface, v nicView, n int) error {
	if v.primary == nil || v.primary.Properties.Subnet == nil {
		return fmt.Errorf("NIC %s has no primary IP configuration with a subnet", p.nic)
	}
	names := make(map[string]bool, len(v.configs))
	for _, c := range v.configs {
		if c != nil {
			names[str(c.Name)] = true
		}
	}
	for i := 0; i < n; i++ {
		name := newConfigName(names)
		nic.Properties.IPConfigurations = append(nic.Properties.IPConfigurations, &armnetwork.InterfaceIPConfiguration{
			Name: to.Ptr(name),
			Properties: &armnetwork.InterfaceIPConfigurationPropertiesFormat{
				Primary:                   to.Ptr(false),
				PrivateIPAllocationMethod: to.Ptr(armnetwork.IPAllocationMethodDynamic),
				PrivateIPAddressVersion:   to.Ptr(armnetwork.IPVersionIPv4),
				Subnet:                    &armnetwork.Subnet{ID: v.primary.Properties.Subnet.ID},
				ApplicationSecurityGroups: v.primary.Properties.ApplicationSecurityGroups,
			},
		})
	}
	p.log.Info("growing the pool", "nic", p.nic, "add", n, "ipConfigs", len(v.configs))
	p.update(func(s *Status) { s.Pending = n })
	defer p.update(func(s *Status) { s.Pending = 0 })
	after, err := p.put(ctx, nic)
	if err != nil {
		return fmt.Errorf("add %d IP configurations: %w", n, err)
	}
	view := parseNIC(after)
	added := len(view.ready) - len(v.ready)
	p.update(func(s *Status) { s.Grown += max(added, 0); s.IPConfigs = len(view.configs) })
	p.log.Info("pool grown", "nic", p.nic, "added", added, "addresses", len(view.ready))
	return pool.SetAddresses(view.secondaries())
}

// shrink gives back up to n of vnetbpf's own configurations whose addresses are free and
// cooled down. The pool gives them up first, so none can be allocated while ARM removes them;
// if ARM fails they return to the pool at the next step, which reads the NIC again.
func (p *Provider) shrink(ctx context.Context, pool *ipam.Pool, nic armnetwork.Interface, v nicView, n int) error {
	var ours []netip.Addr
	for ip, c := range v.ready {
		if strings.HasPrefix(str(c.Name), ConfigPrefix) {
			ours = append(ours, ip)
		}
	}
	// Highest first, so the addresses left are the low, long-lived ones.
	slices.SortFunc(ours, func(a, b netip.Addr) int { return b.Compare(a) })
	gone, err := pool.Withdraw(ours, n)
	if err != nil || len(gone) == 0 {
		return err
	}
	drop := make(map[netip.Addr]bool, len(gone))
	for _, ip := range gone {
		drop[ip] = true
	}
	kept := nic.Properties.IPConfigurations[:0:0]
	for _, c := range nic.Properties.IPConfigurations {
		if c == nil || c.Properties == nil {
			kept = append(kept, c)
			continue
		}
		ip, _ := netip.ParseAddr(str(c.Properties.PrivateIPAddress))
		if !drop[ip] || v.ready[ip] != c {
			kept = append(kept, c)
		}
	}
	nic.Properties.IPConfigurations = kept
	p.log.Info("shrinking the pool", "nic", p.nic, "remove", len(gone), "addresses", gone)
	after, err := p.put(ctx, nic)
	if err != nil {
		if serr := pool.SetAddresses(v.secondaries()); serr != nil {
			err = errors.Join(err, serr)
		}
		return fmt.Errorf("remove %d IP configurations: %w", len(gone), err)
	}
	view := parseNIC(after)
	p.update(func(s *Status) { s.Released += len(gone); s.IPConfigs = len(view.configs) })
	return pool.SetAddresses(view.secondaries())
}

// put writes the NIC only if nobody changed it since it was read (If-Match on its ETag): a
// concurrent writer makes the PUT fail with 412, and the next step reads the NIC again.
//
// The If-Match header goes on the PUT's context only: azcore would send it with every request
// made with that context, and the poller's final GET of the NIC, whose ETag the PUT changed,
// would then fail.
func (p *Provider) put(ctx context.Context, nic armnetwork.Interface) (armnetwork.Interface, error) {
	putCtx := ctx
	if nic.Etag != nil {
		putCtx = policy.WithHTTPHeader(ctx, http.Header{"If-Match": []string{*nic.Etag}})
	}
	poller, err := p.nics.BeginCreateOrUpdate(putCtx, p.rg, p.nic, nic, nil)
	if err != nil {
		return armnetwork.Interface{}, describe(err)
	}
	// 1 s is azcore's minimum; ARM's Retry-After on each poll takes precedence.
	resp, err := poller.PollUntilDone(ctx, &runtime.PollUntilDoneOptions{Frequency: time.Second})
	if err != nil {
		return armnetwork.Interface{}, describe(err)
	}
	return resp.Interface, nil
}

// describe adds what a person should know about an ARM error.
func describe(err error) error {
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		switch re.StatusCode {
		case http.StatusPreconditionFailed:
			return fmt.Errorf("the NIC changed while we wrote it (someone else is writing it); retrying: %w", err)
		case http.StatusForbidden:
			return fmt.Errorf("the agent's identity may not write the NIC (needs Microsoft.Network/networkInterfaces/write and Microsoft.Network/virtualNetworks/subnets/join/action, see docs/azure.md): %w", err)
		case http.StatusTooManyRequests:
			return fmt.Errorf("ARM is throttling this subscription; backing off: %w", err)
		case http.StatusConflict:
			return fmt.Errorf("another operation on the NIC is in progress; retrying: %w", err)
		}
	}
	return err
}

func newConfigName(taken map[string]bool) string {
	for {
		b := make([]byte, 4)
		rand.Read(b)
		name := ConfigPrefix + hex.EncodeToString(b)
		if !taken[name] {
			taken[name] = true
			return name
		}
	}
}

func str(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}
