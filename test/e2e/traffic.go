package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

// Ping sends count ICMP echo requests from namespace from to dst, interval apart, and returns
// how many replies arrived within timeout of the last request. The socket is opened inside
// from, so the packets really leave from there.
func Ping(from ns.NetNS, dst netip.Addr, count int, interval, timeout time.Duration) (int, error) {
	var conn *icmp.PacketConn
	err := from.Do(func(ns.NetNS) error {
		var err error
		conn, err = icmp.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("open ICMP socket: %w", err)
	}
	defer conn.Close()

	id := os.Getpid() & 0xffff
	seen := make(map[int]bool)
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, peer, err := conn.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					err = nil
				}
				done <- err
				return
			}
			m, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
				continue
			}
			echo, ok := m.Body.(*icmp.Echo)
			if !ok || echo.ID != id || peer.String() != dst.String() {
				continue
			}
			seen[echo.Seq] = true
			if len(seen) == count {
				done <- nil
				return
			}
		}
	}()
	for seq := 0; seq < count; seq++ {
		msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("vnetbpf-ping")}}
		b, err := msg.Marshal(nil)
		if err != nil {
			return 0, err
		}
		if _, err := conn.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
			// A send error (no route, say) is a lost packet, not a test failure.
			_ = err
		}
		if seq < count-1 {
			time.Sleep(interval)
		}
	}
	conn.SetReadDeadline(time.Now().Add(timeout))
	if err := <-done; err != nil {
		return 0, err
	}
	return len(seen), nil
}

// TCPExchange listens on port in namespace server, connects from namespace client to dst,
// sends a message and reads it back (the server echoes). It returns nil only if the echo
// came back intact before timeout.
func TCPExchange(server ns.NetNS, client ns.NetNS, dst netip.Addr, port int, timeout time.Duration) error {
	var ln net.Listener
	err := server.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		io.Copy(c, c)
	}()

	var conn net.Conn
	err = client.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp4", netip.AddrPortFrom(dst, uint16(port)).String(), timeout)
		return err
	})
	if err != nil {
		return fmt.Errorf("connect to %s:%d: %w", dst, port, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	msg := bytes.Repeat([]byte("vnetbpf "), 4096) // 32 KiB: several segments each way
	go conn.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil {
		return fmt.Errorf("read echo from %s:%d: %w", dst, port, err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo from %s:%d differs from what was sent", dst, port)
	}
	return nil
}

// SendSpoofedUDP sends one UDP datagram from namespace from with a forged source address,
// through a raw socket, as a hostile container would.
func SendSpoofedUDP(from ns.NetNS, src, dst netip.Addr, port int) error {
	var pc net.PacketConn
	err := from.Do(func(ns.NetNS) error {
		var err error
		pc, err = net.ListenPacket("ip4:udp", "0.0.0.0")
		return err
	})
	if err != nil {
		return fmt.Errorf("open raw socket: %w", err)
	}
	defer pc.Close()
	raw, err := ipv4.NewRawConn(pc)
	if err != nil {
		return err
	}
	payload := []byte("spoofed")
	udp := make([]byte, 8+len(payload))
	udp[0], udp[1] = 0x30, 0x39 // source port 12345
	udp[2], udp[3] = byte(port>>8), byte(port)
	udp[4], udp[5] = byte(len(udp)>>8), byte(len(udp))
	copy(udp[8:], payload) // checksum 0: none, valid for UDP over IPv4
	h := &ipv4.Header{Version: 4, Len: ipv4.HeaderLen, TotalLen: ipv4.HeaderLen + len(udp), TTL: 64,
		Protocol: 17, Src: src.AsSlice(), Dst: dst.AsSlice()}
	return raw.WriteTo(h, udp, nil)
}

// ListenUDP opens a UDP socket on port inside namespace n; read it with ExpectNothing.
func ListenUDP(n ns.NetNS, port int) (net.PacketConn, error) {
	var pc net.PacketConn
	err := n.Do(func(ns.NetNS) error {
		var err error
		pc, err = net.ListenPacket("udp4", fmt.Sprintf(":%d", port))
		return err
	})
	return pc, err
}

// ExpectNothing fails if pc receives a datagram within wait.
func ExpectNothing(pc net.PacketConn, wait time.Duration) error {
	pc.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 1500)
	n, from, err := pc.ReadFrom(buf)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return nil
	}
	if err != nil {
		return err
	}
	return fmt.Errorf("received %q from %s", buf[:n], from)
}
