// Package agent is vnetbpf-agent's daemon: it owns the datapath and the address pool of one
// node, serves the CNI binary over a Unix socket, and exports metrics.
package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/ipam"
	"github.com/vnetbpf/vnetbpf/pkg/ipam/azure"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// Version is the agent's version, set at build time.
var Version = "dev"

// Agent is one node's daemon.
type Agent struct {
	cfg  Config
	log  *slog.Logger
	vnet []netip.Prefix

	dp       *loader.Datapath
	maps     *maps.Maps
	pool     *ipam.Pool
	provider ipam.Provider
	grower   grower // the provider, if it grows the pool (azure); nil for static
	store    *endpointStore
	nic      nicInfo
	events   *eventHub
	metrics  *metrics

	mu        sync.Mutex               // serialises endpoint changes
	endpoints map[api.Key]api.Endpoint // guarded by mu; mirrors store
	settle    *settler                 // background attach work; its maps guarded by mu

	ready   atomic.Bool
	started time.Time
}

type nicInfo struct {
	name  string
	index int
	mac   net.HardwareAddr
	mtu   int
	addrs []netip.Addr
	// subnets are the prefixes of the NIC's addresses: on its link.
	subnets []netip.Prefix
}

// grower is a provider that changes the pool's addresses over time (azure).
type grower interface {
	Run(ctx context.Context, pool *ipam.Pool)
	Trigger()
	Status() azure.Status
}

// New checks cfg and returns an agent ready to Run.
func New(cfg Config, log *slog.Logger) (*Agent, error) {
	vnet, err := cfg.Validate()
	if err != nil {
		return nil, fmt.Errorf("invalid configuration: %w", err)
	}
	a := &Agent{cfg: cfg, log: log, vnet: vnet, endpoints: make(map[api.Key]api.Endpoint), settle: newSettler()}
	if cfg.IPAM.Provider == "static" {
		if a.provider, err = ipam.NewStatic(cfg.IPAM.Static.Addresses); err != nil {
			return nil, fmt.Errorf("invalid configuration: ipam.static.addresses: %w", err)
		}
	}
	return a, nil
}

// newAzureProvider builds the azure provider once the NIC's MAC is known.
func (a *Agent) newAzureProvider() error {
	p, err := azure.New(a.cfg.azureProviderConfig(a.nic.mac), a.log.With("provider", "azure"))
	if err != nil {
		return err
	}
	a.provider, a.grower = p, p
	return nil
}

// Run sets the node up, serves until ctx ends, then stops serving. The datapath stays: maps
// and links are pinned, so containers keep forwarding while no agent runs.
func (a *Agent) Run(ctx context.Context) error {
	a.started = time.Now()
	defer a.close()
	// Background work ends, and the settler's step in progress finishes, before close
	// releases the datapath it uses, however Run returns.
	ctx, stop := context.WithCancel(ctx)
	var background sync.WaitGroup
	defer background.Wait()
	defer stop()
	if err := a.setup(ctx); err != nil {
		return err
	}

	if a.grower != nil {
		go a.grower.Run(ctx, a.pool)
	}
	errc := make(chan error, 2)
	apiSrv, err := a.serveAPI(errc)
	if err != nil {
		return err
	}
	var metricsSrv *http.Server
	if a.cfg.MetricsAddr != "" {
		if metricsSrv, err = a.serveMetrics(errc); err != nil {
			apiSrv.Close()
			return err
		}
	}
	a.ready.Store(true)
	background.Go(func() { a.runSettler(ctx) })
	a.log.Info("agent ready", "socket", a.cfg.Socket, "metrics", a.cfg.MetricsAddr, "nic", a.nic.name,
		"attachMode", a.dp.Mode(), "endpointAttachMode", a.dp.EndpointMode(), "endpoints", len(a.endpoints), "startup", time.Since(a.started).Round(time.Millisecond).String())

	select {
	case <-ctx.Done():
		a.log.Info("stopping; the datapath keeps forwarding")
	case err = <-errc:
	}
	a.ready.Store(false)
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	apiSrv.Shutdown(shutdown)
	if metricsSrv != nil {
		metricsSrv.Shutdown(shutdown)
	}
	return err
}

func (a *Agent) setup(ctx context.Context) error {
	if err := os.MkdirAll(a.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	// The stores first: their file locks make a second agent on the same stateDir fail here,
	// before it touches the datapath the first one runs.
	cooldown := a.cfg.IPAM.Cooldown.Duration
	if cooldown == 0 {
		cooldown = -1 // ipam reads 0 as "default"; a configured 0s means none
	}
	pool, err := a.openPool(filepath.Join(a.cfg.StateDir, "state.db"), ipam.Options{Cooldown: cooldown})
	if err != nil {
		return err
	}
	a.pool = pool
	if a.store, err = a.openStore(filepath.Join(a.cfg.StateDir, "endpoints.db")); err != nil {
		return err
	}

	if err := ensureBPFFS(a.cfg.BPFRoot, a.log); err != nil {
		return err
	}
	dp, err := loader.Load(loader.Options{Root: a.cfg.BPFRoot, Mode: a.cfg.AttachMode})
	if err != nil {
		return err
	}
	a.dp = dp
	a.maps = maps.FromObjects(&dp.Objects)
	if len(dp.Replaced) > 0 {
		a.log.Warn("maps pinned by another version had another definition: replaced them with new ones, filled from this agent's state; running containers keep forwarding on the old ones until their programs are replaced",
			"maps", dp.Replaced, "root", a.cfg.BPFRoot)
	}
	if err := a.setupNIC(); err != nil {
		return err
	}
	if a.cfg.IPAM.Provider == "azure" {
		if err := a.newAzureProvider(); err != nil {
			return err
		}
	}
	addrs, err := a.provider.Addresses(ctx)
	switch {
	case err != nil && a.grower == nil:
		return fmt.Errorf("ipam provider %s: %w", a.provider.Name(), err)
	case err != nil:
		// Running containers need no provider; the pool fills once IMDS or ARM answers.
		a.log.Warn("cannot read the NIC's addresses yet; starting with an empty pool", "provider", a.provider.Name(), "err", err)
	default:
		if err := pool.SetAddresses(addrs); err != nil {
			return err
		}
	}
	if err := a.rebuild(); err != nil {
		return fmt.Errorf("rebuild from the kernel: %w", err)
	}
	if err := a.reconcile(); err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	if err := a.dp.Attach(a.nic.name, loader.FromVNet); err != nil {
		return err
	}
	a.metrics = newMetrics(a)
	if a.events, err = newEventHub(a.maps, a.log); err != nil {
		return err
	}
	return nil
}

// setupNIC points the datapath at the NIC: its config entry, the VNet prefixes and the
// node's own addresses. from_vnet is attached to it after reconcile has written every
// endpoint.
func (a *Agent) setupNIC() error {
	l, err := netlink.LinkByName(a.cfg.NIC)
	if err != nil {
		return fmt.Errorf("nic %q: %w (set 'nic' to the interface on the VNet)", a.cfg.NIC, err)
	}
	attrs := l.Attrs()
	a.nic = nicInfo{name: attrs.Name, index: attrs.Index, mac: attrs.HardwareAddr, mtu: attrs.MTU}
	addrs, err := netlinksafe.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("nic %s addresses: %w", a.cfg.NIC, err)
	}
	for _, ad := range addrs {
		if ip, ok := netip.AddrFromSlice(ad.IP.To4()); ok {
			a.nic.addrs = append(a.nic.addrs, ip)
			if ones, _ := ad.Mask.Size(); ones < 32 {
				a.nic.subnets = append(a.nic.subnets, netip.PrefixFrom(ip, ones).Masked())
			}
		}
	}
	mac, err := maps.MAC(attrs.HardwareAddr)
	if err != nil {
		return fmt.Errorf("nic %s: %w", a.cfg.NIC, err)
	}
	var flags uint32
	if a.cfg.AllowIMDS {
		flags |= uint32(loader.DatapathNodeConfigFlagsCONFIG_F_ALLOW_IMDS)
	}
	if attrs.MTU > 0xffff {
		return fmt.Errorf("nic %s: MTU %d does not fit the datapath's config", a.cfg.NIC, attrs.MTU)
	}
	if err := a.maps.SetConfig(maps.NodeConfig{NicIfindex: uint32(attrs.Index), NicMac: mac, NicMtu: uint16(attrs.MTU), Flags: flags}); err != nil {
		return err
	}
	return a.syncVNetCIDRs()
}

// syncVNetCIDRs makes the vnet_cidrs map hold exactly the configured prefixes, the NIC's own
// subnets inside them and the NIC's own addresses, adding before removing so no lookup
// misses in between.
func (a *Agent) syncVNetCIDRs() error {
	want := a.vnetEntries()
	for _, c := range want {
		if err := a.maps.PutVNetCIDR(c); err != nil {
			return err
		}
	}
	have, err := a.maps.ListVNetCIDRs()
	if err != nil {
		return err
	}
	for _, c := range have {
		if !slices.Contains(want, c) {
			if err := a.maps.DeleteVNetCIDR(c.Prefix); err != nil {
				return err
			}
		}
	}
	return nil
}

func (a *Agent) close() {
	if a.events != nil {
		a.events.Close()
	}
	if a.store != nil {
		a.store.Close()
	}
	if a.pool != nil {
		a.pool.Close()
	}
	if a.dp != nil {
		a.dp.Close()
	}
}

const bpffsMagic = 0xcafe4a11

// ensureBPFFS makes sure root lies on bpffs, mounting /sys/fs/bpf if root is below it and
// nothing is mounted there, as a node fresh from boot may have it.
func ensureBPFFS(root string, log *slog.Logger) error {
	isBPF := func(p string) bool {
		var st unix.Statfs_t
		return unix.Statfs(p, &st) == nil && uint32(st.Type) == bpffsMagic
	}
	dir := root
	for dir != "/" {
		if _, err := os.Stat(dir); err == nil {
			break
		}
		dir = filepath.Dir(dir)
	}
	if isBPF(dir) {
		return nil
	}
	const sysBPF = "/sys/fs/bpf"
	if rel, err := filepath.Rel(sysBPF, root); err == nil && rel != ".." && !filepath.IsAbs(rel) && len(rel) >= 1 && rel[0] != '.' {
		if err := unix.Mount("bpf", sysBPF, "bpf", 0, ""); err != nil {
			return fmt.Errorf("bpffs is not mounted at %s and mounting it failed: %w (run 'mount -t bpf bpf %s')", sysBPF, err, sysBPF)
		}
		// On a node fresh from boot this is what is wanted; in a container without the host's
		// /sys/fs/bpf (or under 'ip netns exec', which remounts /sys) the pins would die with
		// the agent and forwarding with them.
		log.Warn("mounted a new bpffs: if the agent runs in a container, mount the host's /sys/fs/bpf into it, or forwarding stops whenever the agent does",
			"path", sysBPF)
		return nil
	}
	return fmt.Errorf("bpfRoot %s is not on bpffs: mount one (mount -t bpf bpf DIR) or use a directory under /sys/fs/bpf", root)
}
