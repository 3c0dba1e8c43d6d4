package proxy

// Retained messages.
//
// The local broker never serves retained messages from a store of its own:
// every SUBSCRIBE from a local application is sent upstream as well, and
// upstream (which holds the one current retained value of each topic) sends
// its retained messages again, flagged retain=1. Those go only to the local
// subscriptions that are waiting for them (pendingRetained): a subscription
// made in the last pendingRetainedTTL that has not yet had that value.
// Existing subscribers get no extra copy, and a retained message upstream
// replays after a reconnect reaches no one, as on a plain broker.
//
// On protected topics the value's (epoch, sender, seq) also passes the
// topic's register (state.go), which refuses a value older than one already
// seen: a broker cannot roll a topic back to a superseded value.

import (
	"strconv"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/config"
)

// pendingRetainedTTL is how long after a local SUBSCRIBE its retained
// messages may still arrive from upstream.
const pendingRetainedTTL = 10 * time.Second

type pendingSub struct {
	client string
	sub    packets.Subscription
	until  time.Time
	got    map[string]string // topic -> the sealed value it had as retained ("" for any other message)
}

type pendingRetained struct {
	mu   sync.Mutex
	subs []*pendingSub
}

func (p *pendingRetained) add(client string, sub packets.Subscription) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.expireLocked(time.Now())
	p.subs = append(p.subs, &pendingSub{client: client, sub: sub, until: time.Now().Add(pendingRetainedTTL), got: map[string]string{}})
}

func (p *pendingRetained) expireLocked(now time.Time) {
	keep := p.subs[:0]
	for _, s := range p.subs {
		if now.Before(s.until) {
			keep = append(keep, s)
		}
	}
	clear(p.subs[len(keep):])
	p.subs = keep
}

// claimRetained returns the waiting subscriptions that match topic and have
// had no message on it yet, and records that they had value id.
func (p *pendingRetained) claimRetained(topic, id string) []*pendingSub {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.subs) == 0 {
		return nil
	}
	p.expireLocked(time.Now())
	var out []*pendingSub
	for _, s := range p.subs {
		if _, had := s.got[topic]; !had && config.MatchFilter(s.sub.Filter, topic) {
			s.got[topic] = id
			out = append(out, s)
		}
	}
	return out
}

// waiting returns the subscriptions that claimRetained would return for
// topic now, without claiming them.
func (p *pendingRetained) waiting(topic string) []pendingSub {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.subs) == 0 {
		return nil
	}
	p.expireLocked(time.Now())
	var out []pendingSub
	for _, s := range p.subs {
		if _, had := s.got[topic]; !had && config.MatchFilter(s.sub.Filter, topic) {
			out = append(out, pendingSub{client: s.client, sub: s.sub})
		}
	}
	return out
}

// claimLive records that a live message goes to every local subscriber of
// topic: waiting subscriptions are current from now on. It returns the
// clients that already had this very value as a retained message (upstream
// may send both when a publish races a subscribe), which must not get it
// twice. valueID names the value, and is called only when some
// subscription is waiting.
//
// Only a sealed value has a name (its epoch, sender and sequence number,
// which no other publish shares). An unprotected one has none: two
// publishes may carry the same payload (a sensor that reads 21.5 twice),
// and each is a message of its own, so a live unprotected message is never
// held back. A subscriber there may get a value twice when a broker sends
// it both ways, as it would get it directly from such a broker.
func (p *pendingRetained) claimLive(topic string, valueID func() string) map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.subs) == 0 {
		return nil
	}
	id := valueID()
	var had map[string]bool
	for _, s := range p.subs {
		if !config.MatchFilter(s.sub.Filter, topic) {
			continue
		}
		prev, seen := s.got[topic]
		if id != "" && prev == id {
			if had == nil {
				had = map[string]bool{}
			}
			had[s.client] = true
		}
		if !seen || prev != "" {
			s.got[topic] = "" // current: a retained value arriving now is older
		}
	}
	return had
}

// drop forgets a client's waiting subscriptions (it unsubscribed or left).
func (p *pendingRetained) drop(client, filter string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	keep := p.subs[:0]
	for _, s := range p.subs {
		if s.client != client || (filter != "" && s.sub.Filter != filter) {
			keep = append(keep, s)
		}
	}
	clear(p.subs[len(keep):])
	p.subs = keep
}

// deliverRetained sends a retained value to the subscriptions waiting for
// it, with retain=1, as the local broker would at subscribe time. km is the
// value as held for local persistent sessions, if it is.
func (sc *Sidecar) deliverRetained(topic, id string, payload []byte, qos byte, km *keptMessage) {
	for _, p := range sc.pendingRetained.claimRetained(topic, id) {
		cl, ok := sc.server.Clients.Get(p.client)
		if !ok || cl.Closed() {
			continue
		}
		var inflight func(pid uint16)
		if km != nil {
			inflight = func(pid uint16) { sc.kept.handed(km, cl, pid) }
		}
		if err := sendRetained(cl, p.sub, topic, payload, qos, inflight); err != nil {
			sc.log.Debug("retained delivery to local client failed", "client", p.client, "topic", topic, "error", err)
		}
	}
}

// valueID names a sealed value for deduplication between the retained and
// the live path.
func valueID(t retainedTriple) string {
	return strconv.FormatUint(uint64(t.Epoch), 16) + "." + strconv.FormatUint(t.Sender, 16) + "." + strconv.FormatUint(t.Seq, 16)
}

// sendRetained writes one retained PUBLISH to a local client, tracking it
// in flight for QoS 1/2 as the broker's own delivery does; inflight, if not
// nil, learns the packet id before the message is written.
func sendRetained(cl *mqtt.Client, sub packets.Subscription, topic string, payload []byte, qos byte, inflight func(pid uint16)) error {
	if sub.Qos < qos {
		qos = sub.Qos
	}
	out := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: true},
		TopicName:   topic,
		Payload:     payload,
		Created:     time.Now().Unix(),
	}
	if sub.Identifier > 0 {
		out.Properties.SubscriptionIdentifier = []int{sub.Identifier}
	}
	if qos > 0 {
		id, err := cl.NextPacketID()
		if err != nil {
			return err
		}
		out.PacketID = uint16(id)
		cl.State.Inflight.Set(out)
		if inflight != nil {
			inflight(out.PacketID)
		}
	}
	return cl.WritePacket(out)
}
