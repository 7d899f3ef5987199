package loader_test

import (
	"testing"

	"github.com/google/gopacket/layers"

	"github.com/vnetbpf/vnetbpf/internal/testutils"
)

// FuzzFromContainer runs from_container on arbitrary frames arriving from container A. The
// invariant a tenant relies on: a frame whose source is not A's own address and MAC is never
// forwarded or passed on. And whatever arrives, the program answers with a TC verdict.
func FuzzFromContainer(f *testing.F) {
	fx := newFixture(f)
	f.Add(udp(fx.a, fx.b).Frame())
	f.Add(udp(fx.a, host{remoteIP, nil}).Frame())
	f.Add(udp(host{fx.b.ip, fx.a.mac}, fx.b).Frame())
	f.Add(testutils.ARP{SrcMAC: fx.a.mac, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: fx.a.mac, SPA: fx.a.ip, TPA: gatewayIP}.Frame())
	f.Add(ethOnly(fx.a.mac, 0x86dd, 40))
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < 14 || len(frame) > maxTestRunFrame {
			return // BPF_PROG_TEST_RUN needs an Ethernet header and at most about a page
		}
		ret, _, err := fx.tryRun(fx.dp.Objects.FromContainer, fx.a.hostIfindex, frame)
		if err != nil {
			if testRunRefuses(frame) {
				return
			}
			t.Fatalf("run: %v", err)
		}
		if ret != actOK && ret != actShot && ret != actRedirect {
			t.Fatalf("verdict %d", ret)
		}
		if ret != actShot && !sentByA(fx, frame) {
			t.Fatalf("verdict %d for a frame not sent by A: % x", ret, frame)
		}
	})
}

// FuzzFromVNet runs from_vnet on arbitrary frames from the fabric: it must always answer
// with a TC verdict and never drop what is not addressed to one of its containers.
func FuzzFromVNet(f *testing.F) {
	fx := newFixture(f)
	f.Add(udp(host{remoteIP, neighMAC}, host{fx.a.ip, nicMAC}).Frame())
	f.Add(testutils.ARP{SrcMAC: neighMAC, DstMAC: layers.EthernetBroadcast, Op: layers.ARPRequest, SHA: neighMAC, SPA: remoteIP, TPA: fx.b.ip}.Frame())
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < 14 || len(frame) > maxTestRunFrame {
			return
		}
		ret, _, err := fx.tryRun(fx.dp.Objects.FromVnet, fx.nicIdx, frame)
		if err != nil {
			if testRunRefuses(frame) {
				return
			}
			t.Fatalf("run: %v", err)
		}
		if ret != actOK && ret != actShot && ret != actRedirect {
			t.Fatalf("verdict %d", ret)
		}
		if ret == actShot && !toAnEndpoint(fx, frame) {
			t.Fatalf("dropped a frame not addressed to an endpoint: % x", frame)
		}
	})
}

// toAnEndpoint: an IPv4 frame whose destination is A or B.
func toAnEndpoint(fx *fixture, frame []byte) bool {
	if len(frame) < 14+20 || frame[12] != 0x08 || frame[13] != 0x00 {
		return false
	}
	dst := [4]byte(frame[14+16 : 14+20])
	return dst == fx.a.ip.As4() || dst == fx.b.ip.As4()
}
