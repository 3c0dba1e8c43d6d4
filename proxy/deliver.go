package proxy

// Direct delivery of live upstream messages to local applications.
//
// The local broker's own path for a message the sidecar injects (Publish:
// the packet runs through the broker's hooks, is copied for each
// subscriber and queued for a writer goroutine per client) costs more than
// the rest of the inbound worker. For the common subscriber, an MQTT 3.1 or
// 3.1.1 application on a batched connection that keeps up, the worker
// instead encodes the PUBLISH and hands it to the connection itself, doing
// the broker's bookkeeping on the way: a packet id, the in-flight entry the
// broker completes on the application's PUBACK (and resends on a
// reconnect), the counters.
//
// Everyone else goes through the broker as before: MQTT 5 clients (receive
// maximum, topic aliases, subscription identifiers), members of shared
// subscriptions (the broker picks one per group), inline subscriptions,
// and an application whose connection has held directLimit bytes for
// directWait (it stopped reading: the broker's writer queues for it, and
// cuts it off). A message that needs the broker for some subscribers is
// published through it with every directly served client excluded (the ACL
// hook, as for claimLive).
//
// Order: each client is served by one of the two paths. A client the
// broker served once is served by it for the rest of its connection
// (directClients): a message handed to the broker's queue must never be
// overtaken by a later one written directly.

import (
	"bytes"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// directLimit is how many bytes may wait in a local connection for the
// worker to add more directly; past it the worker waits up to directWait
// for the application to read (backpressure, as on the upstream side)
// before it leaves the client to the broker's queue. directWait is the
// local write timeout: an application that reads nothing at all is cut off
// by then (its connection fails), as when the broker's writer holds the
// client's lock that the worker needs for a packet id.
const (
	directLimit = 16 * upstreamWriteBacklog
	directWait  = localWriteTimeout
)

// directClients remembers the clients the broker's own path served: from
// then on (for that connection) it serves them every message.
type directClients struct {
	mu     sync.Mutex
	broker map[string]*mqtt.Client // client id -> the connection served by the broker
	served []string                // scratch: clients served directly, one message

	// The broker's subscriber lookup allocates a handful of maps per
	// message; its answers are kept per topic until a local subscription
	// changes: every change passes OnSubscribed, OnUnsubscribed or
	// OnClientExpired, which call mirrorAdd or mirrorRemove, which bump
	// version; a session taken over re-adds subscriptions without a hook,
	// but changes the broker's subscription count when it adds one.
	version  atomic.Uint64
	cachedAt uint64
	cachedN  int64
	cached   map[string]*mqtt.Subscribers
}

// maxCachedSubscribers bounds the topics whose subscribers are kept.
const maxCachedSubscribers = 4096

// subscriptionsChanged drops every kept subscriber lookup; it is called
// after the broker applied a change.
func (d *directClients) subscriptionsChanged() { d.version.Add(1) }

// subscribersLocked returns the local subscribers of topic, from the broker
// or kept from an earlier message. The result is shared: not to be
// modified.
func (d *directClients) subscribersLocked(server *mqtt.Server, topic string) *mqtt.Subscribers {
	v, n := d.version.Load(), atomic.LoadInt64(&server.Info.Subscriptions)
	if d.cached == nil || v != d.cachedAt || n != d.cachedN || len(d.cached) >= maxCachedSubscribers {
		if d.cached == nil {
			d.cached = make(map[string]*mqtt.Subscribers)
		}
		clear(d.cached)
		d.cachedAt, d.cachedN = v, n
	}
	if s, ok := d.cached[topic]; ok {
		return s
	}
	s := server.Topics.Subscribers(topic) // after reading the version: a change meanwhile is seen next time
	d.cached[topic] = s
	return s
}

// subscribers is subscribersLocked for a caller that does not hold mu.
func (d *directClients) subscribers(server *mqtt.Server, topic string) *mqtt.Subscribers {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.subscribersLocked(server, topic)
}

func (d *directClients) markLocked(cl *mqtt.Client) {
	if d.broker == nil {
		d.broker = make(map[string]*mqtt.Client)
	}
	if len(d.broker) >= 1024 {
		for id, c := range d.broker {
			if c.Closed() {
				delete(d.broker, id)
			}
		}
	}
	d.broker[cl.ID] = cl
}

// encodePool recycles the buffers direct deliveries are encoded in: the
// connection copies what it is given.
var encodePool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// deliverLive sends a live message to every local subscriber of topic,
// except the clients in had (they had it as a retained message). km is the
// message as held for local persistent sessions, if it is: each in-flight
// entry it gets is recorded (keptSessions.handed).
func (sc *Sidecar) deliverLive(topic string, payload []byte, qos byte, had map[string]bool, km *keptMessage) {
	d := &sc.direct
	d.mu.Lock() // one worker delivers; the lock guards the scratch and the lookups kept
	defer d.mu.Unlock()
	subs := d.subscribersLocked(sc.server, topic)
	shared := map[string]bool(nil)
	for _, group := range subs.Shared {
		for id := range group {
			if shared == nil {
				shared = make(map[string]bool)
			}
			shared[id] = true
		}
	}
	needBroker := len(subs.Shared) > 0 || len(subs.InlineSubscriptions) > 0
	served := d.served[:0]
	created := time.Now().Unix()
	for id, sub := range subs.Subscriptions {
		if had[id] {
			continue
		}
		cl, ok := sc.server.Clients.Get(id)
		if !ok {
			continue
		}
		if shared[id] || len(subs.InlineSubscriptions) > 0 || d.broker[id] == cl || !sc.writeDirect(cl, sub, topic, payload, qos, created, km) {
			needBroker = true
			continue
		}
		served = append(served, id)
	}
	d.served = served
	if !needBroker {
		return
	}
	// Whoever the broker may serve now stays with it.
	for id := range subs.Subscriptions {
		if cl, ok := sc.server.Clients.Get(id); ok && !had[id] && !contains(served, id) {
			d.markLocked(cl)
		}
	}
	for id := range shared {
		if cl, ok := sc.server.Clients.Get(id); ok && !had[id] && !contains(served, id) {
			d.markLocked(cl)
		}
	}
	exclude := make(map[string]bool, len(had)+len(served))
	for id := range had {
		exclude[id] = true
	}
	for _, id := range served {
		exclude[id] = true
	}
	if km != nil {
		sc.kept.delivering.Store(km) // the OnQosPublish hook records its entries
		defer sc.kept.delivering.Store(nil)
	}
	sc.publishViaBroker(topic, payload, qos, exclude)
}

func contains(ids []string, id string) bool {
	for _, s := range ids {
		if s == id {
			return true
		}
	}
	return false
}

// publishViaBroker delivers through the local broker, keeping the message
// from the clients in exclude (see OnACLCheck).
func (sc *Sidecar) publishViaBroker(topic string, payload []byte, qos byte, exclude map[string]bool) {
	if len(exclude) > 0 {
		sc.excludeMu.Lock()
		sc.exclude, sc.excludeTopic = exclude, topic
		sc.excludeMu.Unlock()
		defer func() {
			sc.excludeMu.Lock()
			sc.exclude, sc.excludeTopic = nil, ""
			sc.excludeMu.Unlock()
		}()
	}
	if err := sc.server.Publish(topic, payload, false, qos); err != nil {
		sc.log.Error("local delivery failed", "topic", topic, "error", err)
	}
}

// writeDirect delivers one message to cl as the broker's publishToClient
// would, and reports false, having done nothing, when cl must be served by
// the broker instead.
func (sc *Sidecar) writeDirect(cl *mqtt.Client, sub packets.Subscription, topic string, payload []byte, qos byte, created int64, km *keptMessage) bool {
	if cl.Net.Inline || cl.Properties.ProtocolVersion >= 5 {
		return false
	}
	// A client whose connection is gone may still have a session that
	// outlives it (MQTT 3.1.1 clean session 0, or one loaded at start): as
	// the broker does, a QoS 1/2 message waits in flight for the client to
	// come back (it is sent when the session resumes), and a QoS 0 one is
	// dropped.
	offline := cl.Closed()
	if offline && !persistentSession(cl) {
		return true // gone with its session: nothing to deliver
	}
	bc, ok := cl.Net.Conn.(*batchedConn)
	if !ok && !offline {
		return false
	}
	qos = min(qos, sub.Qos, sc.server.Options.Capabilities.MaximumQos)
	out := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:       topic,
		Payload:         payload,
		Created:         created,
		ProtocolVersion: cl.Properties.ProtocolVersion,
	}
	info := sc.server.Info
	if qos > 0 {
		if cl.State.Inflight.Len() >= int(sc.server.Options.Capabilities.MaximumInflight) {
			atomic.AddInt64(&info.InflightDropped, 1)
			sc.metrics.drop("in", DropLocalFull)
			sc.limitedWarn("local-full", "local subscriber too slow: message dropped", "client", cl.ID, "topic", topic)
			return true
		}
		id, err := cl.NextPacketID()
		if err != nil {
			atomic.AddInt64(&info.InflightDropped, 1)
			sc.metrics.drop("in", DropLocalFull)
			return true
		}
		out.PacketID = uint16(id)
		if cl.State.Inflight.Set(out) {
			atomic.AddInt64(&info.Inflight, 1)
		}
		cl.State.Inflight.DecreaseSendQuota()
		if km != nil {
			sc.kept.handed(km, cl, out.PacketID)
		}
	}
	if offline {
		return true
	}
	buf := encodePool.Get().(*bytes.Buffer)
	defer func() {
		if buf.Cap() <= 64<<10 {
			buf.Reset()
			encodePool.Put(buf)
		}
	}()
	if err := out.PublishEncode(buf); err != nil {
		sc.undoInflight(cl, out, km)
		sc.log.Error("local delivery failed", "client", cl.ID, "topic", topic, "error", err)
		return true
	}
	cl.Lock() // as the broker's writes hold it
	taken, err := bc.tryWrite(buf.Bytes(), directLimit, directWait)
	cl.Unlock()
	switch {
	case err != nil:
		// The connection failed: the broker closes it. A QoS 1/2 message
		// stays in flight and is resent if the session resumes.
		return true
	case !taken:
		sc.undoInflight(cl, out, km)
		return false
	}
	atomic.AddInt64(&info.BytesSent, int64(buf.Len()))
	atomic.AddInt64(&info.PacketsSent, 1)
	atomic.AddInt64(&info.MessagesSent, 1)
	return true
}

// undoInflight withdraws the in-flight entry of a message that was not
// written.
func (sc *Sidecar) undoInflight(cl *mqtt.Client, out packets.Packet, km *keptMessage) {
	if out.FixedHeader.Qos == 0 {
		return
	}
	if km != nil {
		sc.kept.unhanded(km, cl, out.PacketID)
	}
	if cl.State.Inflight.Delete(out.PacketID) {
		atomic.AddInt64(&sc.server.Info.Inflight, -1)
	}
	cl.State.Inflight.IncreaseSendQuota()
}

// settleKept ends the delivery of a message held for local persistent
// sessions (keptSessions.settle).
func (sc *Sidecar) settleKept(km *keptMessage) {
	for _, h := range sc.kept.settle(km) {
		sc.followTakeover(km, h, 3)
	}
}

// followTakeover puts km in flight on the connection that took over the
// session of h's connection. mochi copies the in-flight messages of the
// connection it takes over at one moment, and km may have been added to
// the old connection after it: it would then be lost with the old
// connection (the new one is registered just after the copy, and gets
// whatever follows). km went to the old connection before the takeover
// when it is among what the new one has under the same packet id. hops
// bounds how many takeovers in a row are followed.
func (sc *Sidecar) followTakeover(km *keptMessage, h keptHandoff, hops int) {
	cl := sc.takenOverBy(h.cl)
	if cl == nil || cl.Properties.Clean {
		return // gone, or a Clean Start: the session ended, and km with it
	}
	// Recorded first, so that an acknowledgement right after the check
	// finds it.
	sc.kept.rehanded(km, cl, h.pid)
	if pk, ok := cl.State.Inflight.Get(h.pid); ok && pk.TopicName == km.topic && bytes.Equal(pk.Payload, km.payload) {
		return // copied with the rest
	}
	qos, waits := sc.kept.moved(km, h)
	if !waits {
		return
	}
	id, err := cl.NextPacketID()
	if err != nil {
		sc.metrics.drop("in", DropLocalFull)
		return
	}
	out := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: km.retain},
		TopicName:   km.topic,
		Payload:     km.payload,
		Created:     km.created,
		PacketID:    uint16(id),
	}
	if cl.State.Inflight.Set(out) {
		atomic.AddInt64(&sc.server.Info.Inflight, 1)
	}
	sc.kept.rehanded(km, cl, out.PacketID)
	if cl.IsTakenOver() && hops > 1 {
		sc.followTakeover(km, keptHandoff{cl, out.PacketID}, hops-1)
		return
	}
	_ = cl.WritePacket(out) // an error leaves it in flight, for the next connection
}

// takenOverBy waits for the connection that took over old's session to be
// registered, and returns it; nil when the client id is gone or it takes
// longer than takeoverWait. mochi registers it right after copying the old
// connection's session, and says nothing when it has: the registry is
// polled.
func (sc *Sidecar) takenOverBy(old *mqtt.Client) *mqtt.Client {
	deadline := time.Now().Add(takeoverWait)
	for {
		cl, ok := sc.server.Clients.Get(old.ID)
		switch {
		case !ok:
			return nil
		case cl != old:
			return cl
		case time.Now().After(deadline) || sc.ctx.Err() != nil:
			sc.log.Warn("a local persistent session was taken over, and its new connection did not appear; a message for it waits for the next restart", "client", old.ID)
			return nil
		}
		time.Sleep(100 * time.Microsecond)
	}
}
