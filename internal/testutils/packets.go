package testutils

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf/btf"
	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

// IPv4 describes a test frame: Ethernet, IPv4 and UDP (or ICMP echo) with a payload.
type IPv4 struct {
	SrcMAC, DstMAC net.HardwareAddr
	Src, Dst       netip.Addr
	TTL            uint8 // 64 when zero
	ICMP           bool  // an echo request instead of UDP
	SrcPort        uint16
	DstPort        uint16
	Options        []layers.IPv4Option
	FragOffset     uint16
	Payload        []byte
}

// Frame serialises f with correct lengths and checksums.
func (f IPv4) Frame() []byte {
	ttl := f.TTL
	if ttl == 0 {
		ttl = 64
	}
	eth := &layers.Ethernet{SrcMAC: orZero(f.SrcMAC), DstMAC: orZero(f.DstMAC), EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{
		Version: 4, TTL: ttl, SrcIP: f.Src.AsSlice(), DstIP: f.Dst.AsSlice(),
		Options: f.Options, FragOffset: f.FragOffset, Id: 0x1234,
	}
	payload := gopacket.Payload(f.Payload)
	var ls []gopacket.SerializableLayer
	if f.ICMP {
		ip.Protocol = layers.IPProtocolICMPv4
		ls = []gopacket.SerializableLayer{eth, ip,
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: 1, Seq: 1}, payload}
	} else {
		ip.Protocol = layers.IPProtocolUDP
		udp := &layers.UDP{SrcPort: layers.UDPPort(f.SrcPort), DstPort: layers.UDPPort(f.DstPort)}
		if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
			panic(err)
		}
		ls = []gopacket.SerializableLayer{eth, ip, udp, payload}
	}
	return serialize(ls...)
}

func orZero(mac net.HardwareAddr) net.HardwareAddr {
	if mac == nil {
		return make(net.HardwareAddr, 6)
	}
	return mac
}

// ARP describes an ARP-over-Ethernet test frame.
type ARP struct {
	SrcMAC, DstMAC net.HardwareAddr // Ethernet header
	Op             uint16           // layers.ARPRequest or layers.ARPReply
	SHA, THA       net.HardwareAddr
	SPA, TPA       netip.Addr
}

// Frame serialises a.
func (a ARP) Frame() []byte {
	tha := orZero(a.THA)
	return serialize(
		&layers.Ethernet{SrcMAC: a.SrcMAC, DstMAC: a.DstMAC, EthernetType: layers.EthernetTypeARP},
		&layers.ARP{
			AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4,
			HwAddressSize: 6, ProtAddressSize: 4, Operation: a.Op,
			SourceHwAddress: a.SHA, SourceProtAddress: a.SPA.AsSlice(),
			DstHwAddress: tha, DstProtAddress: a.TPA.AsSlice(),
		})
}

func serialize(ls ...gopacket.SerializableLayer) []byte {
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ls...); err != nil {
		panic(fmt.Sprintf("serialize test frame: %v", err))
	}
	return buf.Bytes()
}

// Decode parses a frame into its Ethernet, IPv4 and ARP layers (nil where absent).
func Decode(frame []byte) (*layers.Ethernet, *layers.IPv4, *layers.ARP) {
	p := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
	eth, _ := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
	ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	arp, _ := p.Layer(layers.LayerTypeARP).(*layers.ARP)
	return eth, ip, arp
}

// IPv4HeaderChecksumOK reports whether the IPv4 header after a 14-byte Ethernet header sums
// to 0xffff, as a receiver checks it.
func IPv4HeaderChecksumOK(frame []byte) bool {
	if len(frame) < 14+20 {
		return false
	}
	hl := int(frame[14]&0x0f) * 4
	if len(frame) < 14+hl {
		return false
	}
	var sum uint32
	for i := 14; i < 14+hl; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(frame[i:]))
	}
	for sum > 0xffff {
		sum = (sum & 0xffff) + sum>>16
	}
	return sum == 0xffff
}

var skbLayout = sync.OnceValues(func() ([2]uint32, error) {
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return [2]uint32{}, fmt.Errorf("load kernel BTF: %w", err)
	}
	var skb *btf.Struct
	if err := kernel.TypeByName("__sk_buff", &skb); err != nil {
		return [2]uint32{}, err
	}
	for _, m := range skb.Members {
		if m.Name == "ifindex" {
			return [2]uint32{skb.Size, m.Offset.Bytes()}, nil
		}
	}
	return [2]uint32{}, fmt.Errorf("__sk_buff has no ifindex in kernel BTF")
})

// SkbContext returns a struct __sk_buff for BPF_PROG_TEST_RUN with ifindex set, so that the
// program sees the packet arrive on that device of the caller's network namespace. Its layout
// comes from the running kernel's BTF.
func SkbContext(ifindex int) ([]byte, error) {
	l, err := skbLayout()
	if err != nil {
		return nil, err
	}
	ctx := make([]byte, l[0])
	binary.NativeEndian.PutUint32(ctx[l[1]:], uint32(ifindex))
	return ctx, nil
}
