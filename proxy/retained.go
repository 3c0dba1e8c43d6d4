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
	"crypto/sha256"
	"encoding/hex"
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
	got    map[string]string // topic -> id of the value it has had ("" for any live message)
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

// claimLive records that a live message goes to every local subscriber of
// topic: waiting subscriptions are current from now on. It returns the
// clients that already had this very value as a retained message (upstream
// may send both when a publish races a subscribe), which must not get it
// twice. valueID names the value, and is called only when some
// subscription is waiting; "" derives the name from the payload
// (unprotected topics).
func (p *pendingRetained) claimLive(topic string, valueID func() string, payload []byte) map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.subs) == 0 {
		return nil
	}
	id := valueID()
	if id == "" {
		id = payloadID(payload)
	}
	var had map[string]bool
	for _, s := range p.subs {
		prev, seen := s.got[topic]
		if seen && id != "" && prev == id {
			if had == nil {
				had = map[string]bool{}
			}
			had[s.client] = true
		}
		if !seen && config.MatchFilter(s.sub.Filter, topic) {
			s.got[topic] = id
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
// it, with retain=1, as the local broker would at subscribe time.
func (sc *Sidecar) deliverRetained(topic, id string, payload []byte, qos byte) {
	for _, p := range sc.pendingRetained.claimRetained(topic, id) {
		cl, ok := sc.server.Clients.Get(p.client)
		if !ok || cl.Closed() {
			continue
		}
		if err := sendRetained(cl, p.sub, topic, payload, qos); err != nil {
			sc.log.Debug("retained delivery to local client failed", "client", p.client, "topic", topic, "error", err)
		}
	}
}

// payloadID names an unprotected value by its content.
func payloadID(payload []byte) string {
	h := sha256.Sum256(payload)
	return "p." + hex.EncodeToString(h[:16])
}

// valueID names a sealed value for deduplication between the retained and
// the live path.
func valueID(t retainedTriple) string {
	return strconv.FormatUint(uint64(t.Epoch), 16) + "." + strconv.FormatUint(t.Sender, 16) + "." + strconv.FormatUint(t.Seq, 16)
}

// sendRetained writes one retained PUBLISH to a local client, tracking it
// in flight for QoS 1/2 as the broker's own delivery does.
func sendRetained(cl *mqtt.Client, sub packets.Subscription, topic string, payload []byte, qos byte) error {
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
	}
	return cl.WritePacket(out)
}
