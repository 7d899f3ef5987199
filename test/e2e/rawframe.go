package e2e

import (
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// SendFrame writes a raw Ethernet frame out of device dev in namespace n (AF_PACKET), for
// frames no socket API would build: truncated headers, forged ARP.
func SendFrame(n ns.NetNS, dev string, frame []byte) error {
	return n.Do(func(ns.NetNS) error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6}
		copy(sa.Addr[:], frame[0:6])
		if err := unix.Sendto(fd, frame, 0, sa); err != nil {
			return fmt.Errorf("send frame on %s: %w", dev, err)
		}
		return nil
	})
}
