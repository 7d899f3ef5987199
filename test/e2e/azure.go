package e2e

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/vnetbpf/vnetbpf/pkg/agent"
	"github.com/vnetbpf/vnetbpf/test/e2e/azurefake"
)

// Identifiers of the simulated subscription.
const (
	SimSubscription  = "00000000-0000-0000-0000-00000000cafe"
	SimResourceGroup = "vnetbpf-sim"
	SimLocation      = "westeurope"
	simARMPort       = 8443
	simIMDSPort      = 8080
)

// AzureSim is a simulated VNet driven by a fake ARM: every IP configuration ARM commits on a
// node's NIC becomes routable to that node in the fabric, and shows in that node's IMDS.
type AzureSim struct {
	Fabric    *Fabric
	ARM       *azurefake.ARM
	SubnetID  string
	CAFile    string
	TokenFile string

	dir     string
	tls     *tls.Config
	mu      sync.Mutex
	nodes   map[string]*AzureNode // by normalised MAC
	servers []*http.Server
}

// AzureNode is one simulated VM: its namespace, its NIC's ARM name and its IMDS.
type AzureNode struct {
	*Node
	NICName string
	IMDS    *azurefake.IMDS
	routed  map[netip.Addr]bool
}

// NewAzureSim creates the fabric for prefix, the fake ARM with one subnet covering it, and a
// CA and token file under dir.
func NewAzureSim(dir string, prefix netip.Prefix) (*AzureSim, error) {
	f, err := NewFabric(prefix)
	if err != nil {
		return nil, err
	}
	s := &AzureSim{Fabric: f, ARM: azurefake.NewARM(), dir: dir, nodes: map[string]*AzureNode{},
		SubnetID: azurefake.SubnetID(SimSubscription, SimResourceGroup, "vnet", "nodes")}
	fail := func(err error) (*AzureSim, error) { s.Close(); return nil, err }
	if err := s.ARM.AddSubnet(s.SubnetID, prefix); err != nil {
		return fail(err)
	}
	serverTLS, caFile, err := azurefake.NewTLS(dir, "127.0.0.1")
	if err != nil {
		return fail(err)
	}
	s.tls, s.CAFile = serverTLS, caFile
	s.TokenFile = filepath.Join(dir, "arm-token")
	if err := os.WriteFile(s.TokenFile, []byte("simulated-token"), 0o600); err != nil {
		return fail(err)
	}
	s.ARM.OnChange(s.apply)
	return s, nil
}

// AddNode creates a node namespace plugged into the fabric, its NIC in ARM (primary address
// only), and serves ARM (HTTPS, port 8443) and the node's IMDS (port 8080) on the node's own
// loopback, as 169.254.169.254 and management.azure.com would be reached from a VM.
func (s *AzureSim) AddNode(name string, mac net.HardwareAddr, primary netip.Addr) (*AzureNode, error) {
	node, err := s.Fabric.AddNode(name, mac, primary)
	if err != nil {
		return nil, err
	}
	nicName := name + "-nic"
	state, err := s.ARM.AddNIC(SimSubscription, SimResourceGroup, nicName, SimLocation, mac, s.SubnetID, primary, nil)
	if err != nil {
		return nil, err
	}
	an := &AzureNode{Node: node, NICName: nicName, routed: map[netip.Addr]bool{primary: true},
		IMDS: azurefake.NewIMDS(azurefake.VM{SubscriptionID: SimSubscription, ResourceGroup: SimResourceGroup,
			Name: name, Location: SimLocation, VMID: "vm-" + name}, state)}
	s.mu.Lock()
	s.nodes[mac.String()] = an
	s.mu.Unlock()
	if err := s.serve(node, simARMPort, s.ARM, true); err != nil {
		return nil, err
	}
	if err := s.serve(node, simIMDSPort, an.IMDS, false); err != nil {
		return nil, err
	}
	return an, nil
}

// serve listens on 127.0.0.1:port inside node's namespace; the test process serves it.
func (s *AzureSim) serve(node *Node, port int, h http.Handler, withTLS bool) error {
	var ln net.Listener
	err := node.NS.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
		return err
	})
	if err != nil {
		return fmt.Errorf("listen in %s: %w", node.Name, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	s.mu.Lock()
	s.servers = append(s.servers, srv)
	s.mu.Unlock()
	go func() {
		if withTLS {
			srv.TLSConfig = s.tls
			srv.ServeTLS(ln, "", "")
		} else {
			srv.Serve(ln)
		}
	}()
	return nil
}

// apply makes the fabric route exactly the NIC's committed IP configurations to its node,
// and tells the node's IMDS.
func (s *AzureSim) apply(nic azurefake.NICState) {
	s.mu.Lock()
	node := s.nodes[nic.MAC.String()]
	s.mu.Unlock()
	if node == nil {
		return
	}
	node.IMDS.Update(nic)
	want := map[netip.Addr]bool{}
	for _, ip := range nic.Addresses() {
		want[ip] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for ip := range want {
		if !node.routed[ip] {
			if err := s.Fabric.AddIPConfig(node.Node, ip); err == nil {
				node.routed[ip] = true
			}
		}
	}
	for ip := range node.routed {
		if !want[ip] {
			if err := s.Fabric.RemoveIPConfig(node.Node, ip); err == nil {
				delete(node.routed, ip)
			}
		}
	}
}

// Routed lists the addresses the fabric routes to node (its committed IP configurations).
func (s *AzureSim) Routed(node *AzureNode) []netip.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []netip.Addr
	for ip := range node.routed {
		out = append(out, ip)
	}
	return out
}

// AgentConfig is an azure-provider configuration for node's agent, everything under dir, with
// a small warm pool so tests see it grow and shrink.
func (s *AzureSim) AgentConfig(node *AzureNode, dir string) agent.Config {
	cfg := NewAgentConfig(node.Node, dir, nil)
	cfg.IPAM.Provider = "azure"
	cfg.IPAM.Cooldown.Duration = time.Second
	cfg.IPAM.AllocateTimeout.Duration = 45 * time.Second
	az := &cfg.IPAM.Azure
	az.IMDSURL = fmt.Sprintf("http://127.0.0.1:%d", simIMDSPort)
	az.ARMEndpoint = fmt.Sprintf("https://127.0.0.1:%d", simARMPort)
	az.CAFile = s.CAFile
	az.Credential = "tokenFile"
	az.TokenFile = s.TokenFile
	az.MinFree, az.Batch, az.MaxFree, az.MaxIPs = 2, 4, 4, 32
	az.Interval.Duration = time.Second
	return cfg
}

// Close stops the servers and removes every namespace.
func (s *AzureSim) Close() error {
	s.mu.Lock()
	servers := s.servers
	s.servers = nil
	s.mu.Unlock()
	for _, srv := range servers {
		srv.Close()
	}
	s.ARM.Close()
	return errors.Join(s.Fabric.Close())
}
