package api

import (
	"crypto/sha256"
	"encoding/hex"
	"net"
	"strings"
)

// HostVethPrefix starts the name of every host-side veth vnetbpf creates.
const HostVethPrefix = "vnb"

// HostVethName is the host-side veth name of an attachment: "vnb" and 11 hex digits of
// sha256(containerID/ifName), 14 bytes, inside the kernel's 15. Deriving it from the key
// lets DEL find the veth with nothing but CNI_CONTAINERID and CNI_IFNAME, after the netns
// and the agent's state are gone; 44 bits make a collision among a node's containers
// unlikely, and ADD refuses a name that is taken rather than reuse it.
func HostVethName(k Key) string {
	sum := sha256.Sum256([]byte(k.String()))
	return HostVethPrefix + hex.EncodeToString(sum[:])[:11]
}

// HostMAC and ContainerMAC are fixed per attachment, so a repeated ADD after DEL, a CHECK,
// the agent's map and a rebuild after lost state all agree on them without being told.
func HostMAC(k Key) net.HardwareAddr { return attachmentMAC("host", k) }

// ContainerMAC is the MAC of the container's interface of attachment k.
func ContainerMAC(k Key) net.HardwareAddr { return attachmentMAC("container", k) }

// attachmentMAC salts the key so the two ends get unrelated addresses, then marks the
// address locally administered (bit 1) and unicast (bit 0 clear) so it can never clash with
// a vendor's MAC or be taken for a multicast group.
func attachmentMAC(salt string, k Key) net.HardwareAddr {
	sum := sha256.Sum256([]byte("vnetbpf/" + salt + "/" + k.String()))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}

// vethAliasPrefix marks a host veth's alias (IFLA_IFALIAS) as vnetbpf's.
const vethAliasPrefix = "vnetbpf:"

// VethAlias is the alias the agent gives a host veth: the attachment's key, kept by the
// kernel, so that the agent can rebuild its state from live veths when its files are lost.
func VethAlias(k Key) string { return vethAliasPrefix + k.ContainerID + "/" + k.IfName }

// ParseVethAlias reads a key back from a host veth's alias.
func ParseVethAlias(alias string) (Key, bool) {
	rest, ok := strings.CutPrefix(alias, vethAliasPrefix)
	if !ok {
		return Key{}, false
	}
	i := strings.LastIndexByte(rest, '/')
	if i <= 0 || i == len(rest)-1 {
		return Key{}, false
	}
	return Key{ContainerID: rest[:i], IfName: rest[i+1:]}, true
}
