package maps

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

// EventReader reads drop events from the events ring buffer. The ring buffer has one
// consumer position: run one reader per node (the agent), and fan events out from there.
type EventReader struct {
	rd  *ringbuf.Reader
	rec ringbuf.Record
}

// NewEventReader starts reading the events ring buffer.
func (m *Maps) NewEventReader() (*EventReader, error) {
	rd, err := ringbuf.NewReader(m.Events)
	if err != nil {
		return nil, fmt.Errorf("open events ring buffer: %w", err)
	}
	return &EventReader{rd: rd}, nil
}

// SetDeadline makes Read return os.ErrDeadlineExceeded once t passes without an event.
func (r *EventReader) SetDeadline(t time.Time) { r.rd.SetDeadline(t) }

// Read blocks until the next event, or until Close (ringbuf.ErrClosed).
func (r *EventReader) Read() (DropEvent, error) {
	var ev DropEvent
	if err := r.rd.ReadInto(&r.rec); err != nil {
		return ev, err
	}
	if err := binary.Read(bytes.NewReader(r.rec.RawSample), binary.NativeEndian, &ev); err != nil {
		return ev, fmt.Errorf("decode drop event: %w", err)
	}
	return ev, nil
}

// Close stops the reader; a blocked Read returns.
func (r *EventReader) Close() error { return r.rd.Close() }

// EventSource returns the event's source address.
func EventSource(ev DropEvent) netip.Addr { return netip.AddrFrom4(ev.Saddr) }

// EventDestination returns the event's destination address.
func EventDestination(ev DropEvent) netip.Addr { return netip.AddrFrom4(ev.Daddr) }

// EventSourceMAC returns the event's source MAC.
func EventSourceMAC(ev DropEvent) net.HardwareAddr { return net.HardwareAddr(ev.Smac[:]) }

// EventReason returns the event's reason.
func EventReason(ev DropEvent) Reason { return loader.DatapathStatReason(ev.Reason) }
