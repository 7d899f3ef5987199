package azure

import (
	"encoding/json"
	"net"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v7"
)

// FuzzIMDSNetwork: whatever IMDS sends, the provider only ever takes IPv4 addresses from
// the interface with the node's MAC.
func FuzzIMDSNetwork(f *testing.F) {
	f.Add([]byte(networkDoc))
	f.Add([]byte(`{"interface":[{"macAddress":"000d3a010203","ipv4":{"ipAddress":[{"privateIpAddress":"::1"},{"privateIpAddress":"10.0.0.4"},{"privateIpAddress":"x"}]}}]}`))
	f.Add([]byte(`{"interface":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var doc NetworkDocument
		if json.Unmarshal(b, &doc) != nil {
			return
		}
		in, ok := doc.InterfaceByMAC(nicMAC)
		if !ok {
			return
		}
		if normalizeMAC(in.MACAddress) != normalizeMAC(net.HardwareAddr(nicMAC).String()) {
			t.Fatalf("picked interface %q for MAC %s", in.MACAddress, nicMAC)
		}
		for _, a := range in.Addresses() {
			if !a.Is4() {
				t.Fatalf("address %s is not IPv4", a)
			}
		}
	})
}

// FuzzARMInterface: whatever ARM sends for the NIC, the pool is offered only provisioned IPv4
// secondaries, never the primary.
func FuzzARMInterface(f *testing.F) {
	nic := newFakeNIC()
	nic.addConfig("by-hand", mustAddr("10.0.0.200"))
	b, _ := json.Marshal(nic.snapshot())
	f.Add(b)
	f.Add([]byte(`{"properties":{"ipConfigurations":[{"name":"a","properties":{"primary":true,"privateIPAddress":"10.0.0.4"}},{"name":"b","properties":{"privateIPAddress":"10.0.0.4"}},{"name":"c","properties":{"privateIPAddress":"fe80::1","provisioningState":"Succeeded"}},null,{"name":"d"}]}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var in armnetwork.Interface
		if in.UnmarshalJSON(b) != nil {
			return
		}
		v := parseNIC(in)
		for _, ip := range v.secondaries() {
			c := v.ready[ip]
			if !ip.Is4() || c == nil || (c.Properties.Primary != nil && *c.Properties.Primary) {
				t.Fatalf("offered %s from configuration %+v", ip, c)
			}
		}
	})
}
