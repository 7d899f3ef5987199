package agent

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/vishvananda/netlink"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
	"github.com/vnetbpf/vnetbpf/pkg/maps"
)

// eventHub is the one reader of the events ring buffer; it fans drop events out to every
// `vnetbpf-agent monitor` connected. A slow subscriber loses events rather than slowing the
// others or the ring buffer.
type eventHub struct {
	rd   *maps.EventReader
	log  *slog.Logger
	mu   sync.Mutex
	subs map[chan api.DropEvent]struct{}
	done chan struct{}
}

func newEventHub(m *maps.Maps, log *slog.Logger) (*eventHub, error) {
	rd, err := m.NewEventReader()
	if err != nil {
		return nil, err
	}
	h := &eventHub{rd: rd, log: log, subs: make(map[chan api.DropEvent]struct{}), done: make(chan struct{})}
	go h.run()
	return h, nil
}

// bootTime converts the events' bpf_ktime_get_coarse_ns (CLOCK_MONOTONIC, to a jiffy) to
// wall time.
var bootTime = sync.OnceValue(func() time.Time {
	return time.Now().Add(-monotonicNow())
})

func (h *eventHub) run() {
	defer close(h.done)
	for {
		ev, err := h.rd.Read()
		if errors.Is(err, ringbuf.ErrClosed) {
			return
		}
		if err != nil {
			h.log.Warn("read drop event", "err", err)
			continue
		}
		h.publish(toAPIEvent(ev))
	}
}

func toAPIEvent(ev maps.DropEvent) api.DropEvent {
	out := api.DropEvent{
		Time:      bootTime().Add(time.Duration(ev.TsNs)).UTC(),
		Reason:    loader.ReasonName(maps.EventReason(ev)),
		IfIndex:   ev.Ifindex,
		EtherType: ev.Ethertype,
		Protocol:  ev.Protocol,
		Src:       maps.EventSource(ev),
		Dst:       maps.EventDestination(ev),
		SrcPort:   ev.Sport,
		DstPort:   ev.Dport,
		SrcMAC:    maps.EventSourceMAC(ev).String(),
	}
	if l, err := netlink.LinkByIndex(int(ev.Ifindex)); err == nil {
		out.IfName = l.Attrs().Name
	}
	return out
}

func (h *eventHub) publish(ev api.DropEvent) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.subs {
		select {
		case ch <- ev:
		default:
		}
	}
}

// Subscribe returns a channel of events and a function that ends the subscription.
func (h *eventHub) Subscribe() (<-chan api.DropEvent, func()) {
	ch := make(chan api.DropEvent, 256)
	h.mu.Lock()
	h.subs[ch] = struct{}{}
	h.mu.Unlock()
	return ch, func() {
		h.mu.Lock()
		delete(h.subs, ch)
		h.mu.Unlock()
	}
}

// Close stops reading and waits for the reader to end.
func (h *eventHub) Close() {
	h.rd.Close()
	<-h.done
}

func listenTCP(addr string) (net.Listener, error) { return net.Listen("tcp", addr) }
