package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"net"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// HostVethPrefix starts the name of every host-side veth vnetbpf creates.
const HostVethPrefix = "vnb"

// HostVethName is the host-side veth name of an attachment: "vnb" and 11 hex digits of
// sha256(containerID/ifName), 14 bytes, inside the kernel's 15. Deriving it from the key
// lets DEL find the veth with nothing but CNI_CONTAINERID and CNI_IFNAME, after the netns
// and the agent's state are gone; 44 bits make a collision among a node's containers
// unlikely, and ADD refuses a name that is taken rather than reuse it.
func HostVethName(k api.Key) string {
	sum := sha256.Sum256([]byte(k.String()))
	return HostVethPrefix + hex.EncodeToString(sum[:])[:11]
}

// hostMAC and containerMAC are fixed per attachment, so a repeated ADD after DEL, a CHECK
// and the agent's map all agree on them without being told.
func hostMAC(k api.Key) net.HardwareAddr { return attachmentMAC("host", k) }

func containerMAC(k api.Key) net.HardwareAddr { return attachmentMAC("container", k) }

// attachmentMAC salts the key so the two ends get unrelated addresses, then marks the
// address locally administered (bit 1) and unicast (bit 0 clear) so it can never clash with
// a vendor's MAC or be taken for a multicast group.
func attachmentMAC(salt string, k api.Key) net.HardwareAddr {
	sum := sha256.Sum256([]byte("vnetbpf/" + salt + "/" + k.String()))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}
