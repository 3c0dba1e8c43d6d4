package mqttc

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Publisher is an app that publishes over a persistent session and keeps
// that session's outbound state across reconnects, as MQTT requires of a
// client: after a reconnect it sends again, with DUP, every PUBLISH whose
// acknowledgement it did not get, and for QoS 2 the PUBREL of every one
// whose PUBREC it got. It reconnects by itself, with the options it was
// made with (Clean is ignored: the session is kept).
type Publisher struct {
	addr   string
	opts   Options
	window chan struct{}

	mu      sync.Mutex
	c       *Client
	flows   map[*Client]*sync.WaitGroup // the flows followed on each connection
	pending map[uint16]*pubState        // in flight on the session, by packet id
	nextID  uint16
	closed  bool
	acked   sync.WaitGroup
}

type pubState struct {
	pk  packets.Packet
	rec bool // QoS 2: PUBREC received; what to send again is the PUBREL
}

// NewPublisher connects to addr with a persistent session and at most
// window publishes in flight.
func NewPublisher(addr string, o Options, window int) (*Publisher, error) {
	o.Clean = false
	c, ack, err := Connect(addr, o)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("mqttc: publisher %s refused: 0x%02x", o.ClientID, ack.ReasonCode)
	}
	return &Publisher{addr: addr, opts: o, window: make(chan struct{}, window), c: c,
		flows: map[*Client]*sync.WaitGroup{c: {}}, pending: map[uint16]*pubState{}}, nil
}

// Publish sends pk (QoS 1 or 2) and returns once it is in flight; Wait
// waits for every acknowledgement.
func (p *Publisher) Publish(pk packets.Packet) error {
	if pk.FixedHeader.Qos == 0 {
		return errors.New("mqttc: Publisher is for QoS 1 and 2")
	}
	p.window <- struct{}{}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return errors.New("mqttc: publisher closed")
	}
	for {
		p.nextID++
		if p.nextID != 0 && p.pending[p.nextID] == nil {
			break
		}
	}
	pk.PacketID = p.nextID
	st := &pubState{pk: pk}
	p.pending[pk.PacketID] = st
	c := p.c
	p.acked.Add(1)
	p.mu.Unlock()
	p.send(c, st)
	return nil
}

// send sends st on c (a PUBLISH, or its PUBREL) and follows its flow; a flow
// cut by the connection's end is sent again by the reconnect.
func (p *Publisher) send(c *Client, st *pubState) {
	if c == nil {
		return // reconnecting: the reconnect sends it
	}
	p.mu.Lock()
	pk, rec := st.pk, st.rec
	wg := p.flows[c]
	wg.Add(1)
	p.mu.Unlock()
	if rec {
		go func() {
			defer wg.Done()
			if _, err := c.Release(pk.PacketID); err == nil {
				p.done(pk.PacketID)
			} else {
				p.lost(c)
			}
		}()
		return
	}
	ch, err := c.PublishAsync(pk)
	if err != nil {
		wg.Done()
		p.lost(c)
		return
	}
	go func() {
		defer wg.Done()
		a := <-ch
		switch {
		case a.Err == nil:
			p.done(pk.PacketID)
		default:
			if a.Pubrec.FixedHeader.Type == packets.Pubrec {
				p.mu.Lock()
				st.rec = true
				p.mu.Unlock()
			}
			p.lost(c)
		}
	}()
}

func (p *Publisher) done(id uint16) {
	p.mu.Lock()
	_, ok := p.pending[id]
	delete(p.pending, id)
	p.mu.Unlock()
	if ok {
		<-p.window
		p.acked.Done()
	}
}

// lost reconnects after c ended (once per connection) and resends what is
// pending, once every flow followed on c has ended: what it got before the
// end (a PUBREC) decides what to send again.
func (p *Publisher) lost(c *Client) {
	c.Close()
	p.mu.Lock()
	if p.c != c || p.closed {
		p.mu.Unlock()
		return
	}
	p.c = nil
	wg := p.flows[c]
	delete(p.flows, c)
	p.mu.Unlock()
	go p.reconnect(wg)
}

func (p *Publisher) reconnect(flows *sync.WaitGroup) {
	flows.Wait()
	for {
		nc, ack, err := Connect(p.addr, p.opts)
		if err == nil && nc != nil {
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				nc.Close()
				return
			}
			p.c = nc
			p.flows[nc] = &sync.WaitGroup{}
			var resend []*pubState
			for _, st := range p.pending {
				if !ack.SessionPresent {
					st.rec = false // a new session: every message again, as new
				}
				st.pk.FixedHeader.Dup = ack.SessionPresent && !st.rec
				resend = append(resend, st)
			}
			p.mu.Unlock()
			for _, st := range resend {
				p.send(nc, st)
			}
			return
		}
		time.Sleep(50 * time.Millisecond)
		p.mu.Lock()
		closed := p.closed
		p.mu.Unlock()
		if closed {
			return
		}
	}
}

// Wait waits until every publish so far is acknowledged, or d passes.
func (p *Publisher) Wait(d time.Duration) bool {
	done := make(chan struct{})
	go func() { p.acked.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// Close disconnects.
func (p *Publisher) Close() {
	p.mu.Lock()
	p.closed = true
	c := p.c
	p.mu.Unlock()
	if c != nil {
		c.Disconnect(0, packets.Properties{})
	}
}
