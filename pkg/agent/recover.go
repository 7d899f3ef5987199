package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/ipam"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// The agent's files are a cache of what the kernel already knows: every live endpoint has a
// host veth whose alias holds its key, a /32 route carrying its address, and (unless bpffs was
// wiped) an entry in the pinned endpoints map. So a state file that is missing, truncated or
// garbage never stops a node: it is moved aside and the state is rebuilt from those.

// openRecovering opens a state file with open; if the file cannot be read for any reason but
// another agent holding it, it is renamed aside and a fresh one opened. moved is the new name
// of the broken file, "" if none.
func openRecovering[T any](path string, open func(string) (T, error)) (v T, moved string, err error) {
	v, err = open(path)
	if err == nil || !isCorrupt(err) {
		return v, "", err
	}
	moved = fmt.Sprintf("%s.broken-%d", path, time.Now().Unix())
	if rerr := os.Rename(path, moved); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		return v, "", fmt.Errorf("%w; and moving it aside failed: %v", err, rerr)
	}
	v, err2 := open(path)
	if err2 != nil {
		return v, moved, fmt.Errorf("open a fresh %s after moving the broken one to %s: %w", path, moved, err2)
	}
	return v, moved, nil
}

// errCorrupt marks an endpoint store that cannot be read.
var errCorrupt = errors.New("corrupt")

// isCorrupt tells a file that cannot be trusted (moved aside and rebuilt) from one that cannot
// be opened for another reason (locked, permissions, I/O: the agent stops and says so).
func isCorrupt(err error) bool {
	for _, target := range []error{ipam.ErrCorrupt, errCorrupt, berrors.ErrInvalid, berrors.ErrChecksum,
		berrors.ErrVersionMismatch, berrors.ErrInvalidMapping} {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

// openPool opens the IPAM store, recovering from a broken one.
func (a *Agent) openPool(path string, opts ipam.Options) (*ipam.Pool, error) {
	pool, moved, err := openRecovering(path, func(p string) (*ipam.Pool, error) { return ipam.Open(p, opts) })
	if moved != "" {
		a.log.Error("the address store was unreadable; moved it aside and rebuilding allocations from the datapath and live veths",
			"file", path, "movedTo", moved)
	}
	return pool, err
}

// openStore opens the endpoint store, recovering from a broken one.
func (a *Agent) openStore(path string) (*endpointStore, error) {
	store, moved, err := openRecovering(path, openEndpointStore)
	if moved != "" {
		a.log.Error("the endpoint store was unreadable; moved it aside and rebuilding endpoints from the datapath and live veths",
			"file", path, "movedTo", moved)
	}
	return store, err
}

// rebuild adds, for every live vnetbpf veth the stores do not know, the endpoint and the
// allocation the kernel shows: the key from the veth's alias, the address from the pinned
// map entry on that veth or else from its /32 route, the MACs from the map or the link (the
// container's derives from the key, as the CNI plugin set it).
func (a *Agent) rebuild() error {
	links, err := netlinksafe.LinkList() // retries a dump that concurrent veth changes interrupted
	if err != nil {
		return err
	}
	inMap, err := a.maps.ListEndpoints()
	if err != nil {
		return err
	}
	byIfindex := make(map[uint32]netip.Addr, len(inMap))
	for ip, ep := range inMap {
		byIfindex[ep.Ifindex] = ip
	}
	records, err := a.store.all()
	if err != nil {
		return err
	}
	known := make(map[api.Key]bool, len(records))
	usedIDs := make(map[uint32]bool, len(records))
	for _, ep := range records {
		known[ep.Key] = true
		usedIDs[ep.ID] = true
	}
	for _, l := range links {
		k, ok := api.ParseVethAlias(l.Attrs().Alias)
		if !ok || known[k] {
			continue
		}
		ep, err := a.endpointFromKernel(l, k, inMap, byIfindex)
		if err != nil {
			a.log.Warn("cannot rebuild endpoint from its veth; leaving it for reconcile", "veth", l.Attrs().Name, "key", k.String(), "err", err)
			continue
		}
		if id := ep.ID; id == 0 || usedIDs[id] || id >= a.maps.MaxEndpointIDs() {
			if ep.ID, err = freeIDOf(usedIDs, a.maps.MaxEndpointIDs()); err != nil {
				return err
			}
		}
		usedIDs[ep.ID] = true
		if _, ok := a.pool.Get(k); !ok {
			if err := a.pool.Restore([]api.Allocation{{Owner: ep.Owner, IP: ep.IP, AllocatedAt: ep.CreatedAt}}); err != nil {
				a.log.Warn("cannot restore allocation from a live veth", "key", k.String(), "ip", ep.IP.String(), "err", err)
				continue
			}
		}
		if err := a.store.put(ep); err != nil {
			return err
		}
		a.log.Warn("rebuilt endpoint from the kernel", "key", k.String(), "ip", ep.IP.String(), "veth", ep.HostIfName, "id", ep.ID)
	}
	return nil
}

func (a *Agent) endpointFromKernel(l netlink.Link, k api.Key, inMap map[netip.Addr]maps.Endpoint, byIfindex map[uint32]netip.Addr) (api.Endpoint, error) {
	attrs := l.Attrs()
	ep := api.Endpoint{
		EndpointRequest: api.EndpointRequest{
			Owner:       api.Owner{Key: k},
			HostIfName:  attrs.Name,
			HostIfIndex: attrs.Index,
			HostMAC:     attrs.HardwareAddr.String(),
		},
		CreatedAt: time.Now().UTC(),
	}
	if ip, ok := byIfindex[uint32(attrs.Index)]; ok {
		m := inMap[ip]
		ep.IP, ep.ID, ep.ContainerMAC = ip, m.Id, net.HardwareAddr(m.Mac[:]).String()
		return ep, nil
	}
	routes, err := netlinksafe.RouteList(l, netlink.FAMILY_V4)
	if err != nil {
		return ep, err
	}
	for _, r := range routes {
		if r.Dst != nil {
			if ones, bits := r.Dst.Mask.Size(); ones == 32 && bits == 32 {
				ep.IP, _ = netip.AddrFromSlice(r.Dst.IP.To4())
				break
			}
		}
	}
	if !ep.IP.IsValid() {
		return ep, fmt.Errorf("no endpoints map entry and no /32 route on %s", attrs.Name)
	}
	ep.ContainerMAC = api.ContainerMAC(k).String()
	return ep, nil
}

// freeIDOf is the lowest id from 1 below limit (the size of endpoint_stats) not in used.
func freeIDOf(used map[uint32]bool, limit uint32) (uint32, error) {
	for id := uint32(1); id < limit; id++ {
		if !used[id] {
			return id, nil
		}
	}
	return 0, fmt.Errorf("all %d endpoint ids are in use: this node has the most containers the datapath counts (endpoint_stats holds %d)", limit-1, limit)
}
