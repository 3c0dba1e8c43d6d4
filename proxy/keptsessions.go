package proxy

// Kept sessions: the local broker's persistent sessions, kept across a
// restart of the sidecar, crash included.
//
// An application with a persistent session (MQTT 3.1.1 clean session 0,
// MQTT 5 Session Expiry Interval > 0) trusts its broker to keep its
// subscriptions, and the QoS 1/2 messages for it until it has them, while
// it is away and across the broker's restarts. The sidecar acknowledges an
// upstream message once the local broker holds it, and mochi holds its
// sessions in memory only: a sidecar that died lost every message upstream
// had handed over for an application, and one that restarted resumed its
// upstream session, got the backlog at once and acknowledged it before the
// application was back to subscribe again. So the inbound log (state.go,
// inboundlog.go) also holds these sessions:
//
//  1. A session is recorded when a connection establishes it, with each
//     subscription (its SUBACK waits until the record is written), and
//     forgotten when it ends: it expires, a Clean Start replaces it, or a
//     connection without a persistent session takes its client id.
//  2. The inbound worker records each QoS 1/2 message a kept session
//     subscribes to (held), naming the sessions it is for, before it
//     commits the batch: the batch's one write holds it ahead of the
//     batch's replay state, so nothing acknowledged upstream, or refused as
//     a replay after a restart, is missing from it.
//  3. Delivery puts the message in flight to each of those sessions,
//     connected or not (handed). A session that did not get it (it had the
//     value as a retained message, its in-flight window was full) is done
//     with it at once, the others when their application acknowledges it
//     (PUBACK, PUBCOMP). Those marks go out with the next commit: a crash
//     before then sends the message again (a duplicate, as QoS 1 allows).
//  4. On start, the local broker loads the kept sessions through mochi's
//     storage hooks (StoredClients, StoredSubscriptions,
//     StoredInflightMessages): each with its subscriptions, mirrored
//     upstream again on connect, and the messages it has not acknowledged,
//     in flight, sent when its application comes back.
//
// A session's expiry is counted again from the restart (mochi's clock for a
// loaded session), and the Will of an application connected when the
// sidecar died is not sent: the process that held it is gone. A QoS 2
// message the application had received (PUBREC) but not completed comes
// again as a new PUBLISH: across a crash, QoS 2 to a local application is
// at least once.

import (
	"bytes"
	"encoding/binary"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

// maxKeptInflight is the most messages a loaded session gets in flight: one
// per packet id. A longer backlog loses its newest messages, as a full
// in-flight window does (local_full).
const maxKeptInflight = 65535

// takeoverWait bounds how long the inbound worker waits for the connection
// that took a session over to be registered (followTakeover): mochi copies
// the session (every in-flight message, for a session that comes back to a
// backlog) before it registers the new connection.
const takeoverWait = 5 * time.Second

// keptSessions is what the inbound log holds of the local persistent
// sessions. The local broker's hooks, the inbound worker and the log's
// commits share it under one mutex.
type keptSessions struct {
	mu       sync.Mutex
	sessions map[string]*keptSession // by client id
	messages map[uint64]*keptMessage
	lastID   uint64
	pend     []byte // frames for the log's next commit

	count      atomic.Int64                // len(sessions), for the inbound worker's fast path
	delivering atomic.Pointer[keptMessage] // the message the inbound worker publishes through the local broker
}

type keptSession struct {
	conn     *mqtt.Client // the connection that established it (nil: loaded)
	version  byte
	expiry   uint32 // MQTT 5 Session Expiry Interval
	username []byte
	subs     map[string]packets.Subscription
	queued   map[uint64]*keptMessage // held for it, not yet acknowledged
	inflight map[uint16]*keptMessage // put in flight to it under a packet id (this run)
}

// keptMessage is one upstream message held for kept sessions.
type keptMessage struct {
	id      uint64
	created int64 // Unix seconds
	qos     byte
	retain  bool // a retained value sent to a new subscription
	topic   string
	payload []byte
	waiting map[string]byte // session -> the QoS it gets the message at
	handed  []keptHandoff   // where the delivery in progress put it in flight
}

// keptHandoff is one in-flight entry of a message: the connection and the
// packet id.
type keptHandoff struct {
	cl  *mqtt.Client
	pid uint16
}

func newKeptSessions() *keptSessions {
	return &keptSessions{sessions: make(map[string]*keptSession), messages: make(map[uint64]*keptMessage)}
}

func newKeptSession() *keptSession {
	return &keptSession{
		subs:     make(map[string]packets.Subscription),
		queued:   make(map[uint64]*keptMessage),
		inflight: make(map[uint16]*keptMessage),
	}
}

// persistentSession reports whether cl's session outlives its connection.
func persistentSession(cl *mqtt.Client) bool {
	if cl.Properties.ProtocolVersion == 5 {
		return cl.Properties.Props.SessionExpiryInterval > 0
	}
	return !cl.Properties.Clean
}

// established records the session of a new connection (step 1). A Clean
// Start, or a connection whose session ends with it, ends the kept session
// of its client id: mochi discarded it, or will at the disconnect.
func (k *keptSessions) established(cl *mqtt.Client, cleanStart bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ks := k.sessions[cl.ID]
	persistent := persistentSession(cl)
	if ks != nil && (cleanStart || !persistent) {
		k.endLocked(cl.ID, ks)
		ks = nil
	}
	if !persistent {
		return
	}
	version, expiry := cl.Properties.ProtocolVersion, cl.Properties.Props.SessionExpiryInterval
	fresh := ks == nil
	if fresh {
		ks = newKeptSession()
		k.sessions[cl.ID] = ks
		k.count.Add(1)
	} else if ks.version == version && ks.expiry == expiry && bytes.Equal(ks.username, cl.Properties.Username) {
		ks.conn = cl
		return // resumed as it was
	}
	ks.conn, ks.version, ks.expiry, ks.username = cl, version, expiry, bytes.Clone(cl.Properties.Username)
	k.pend = appendSessionFrame(k.pend, cl.ID, ks)
	if fresh && !cleanStart && cl.State.Subscriptions != nil {
		// A session that was not kept until now (an MQTT 5 connection
		// that took over one with a Session Expiry Interval of 0) keeps
		// the subscriptions mochi carried over.
		for _, sub := range cl.State.Subscriptions.GetAll() {
			sub.RetainHandling = 0
			ks.subs[sub.Filter] = sub
			k.pend = appendSubscribedFrame(k.pend, cl.ID, sub)
		}
	}
}

// disconnected ends the kept session of a connection whose session ends
// with it (expire: an MQTT 5 client that set its Session Expiry Interval
// to 0 when it disconnected), or records the interval it set instead.
func (k *keptSessions) disconnected(cl *mqtt.Client, expire bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ks := k.sessions[cl.ID]
	switch {
	case ks == nil || ks.conn != cl:
	case expire:
		k.endLocked(cl.ID, ks)
	case ks.expiry != cl.Properties.Props.SessionExpiryInterval:
		ks.expiry = cl.Properties.Props.SessionExpiryInterval
		k.pend = appendSessionFrame(k.pend, cl.ID, ks)
	}
}

// expired ends the kept session of a client id whose session expired.
func (k *keptSessions) expired(client string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if ks := k.sessions[client]; ks != nil {
		k.endLocked(client, ks)
	}
}

// subscribed records a subscription of a kept session; it reports whether
// it did (the SUBACK then waits for the record to be written).
func (k *keptSessions) subscribed(cl *mqtt.Client, sub packets.Subscription) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	ks := k.sessions[cl.ID]
	if ks == nil || ks.conn != cl {
		return false
	}
	sub.RetainHandling = 0 // the local broker serves no retained messages (retained.go)
	ks.subs[sub.Filter] = sub
	k.pend = appendSubscribedFrame(k.pend, cl.ID, sub)
	return true
}

func (k *keptSessions) unsubscribed(cl *mqtt.Client, filter string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ks := k.sessions[cl.ID]
	if ks == nil || ks.conn != cl {
		return
	}
	if _, ok := ks.subs[filter]; ok {
		delete(ks.subs, filter)
		k.pend = appendUnsubscribedFrame(k.pend, cl.ID, filter)
	}
}

// hold records an upstream message for the kept sessions among to (client
// id -> QoS) before its batch is committed (step 2). It returns nil when
// none of them is kept.
func (k *keptSessions) hold(topic string, payload []byte, qos byte, retain bool, to map[string]byte) *keptMessage {
	k.mu.Lock()
	defer k.mu.Unlock()
	m := &keptMessage{id: k.lastID + 1, created: time.Now().Unix(), qos: qos, retain: retain, topic: topic}
	for client, q := range to {
		if ks := k.sessions[client]; ks != nil {
			if m.waiting == nil {
				m.waiting = make(map[string]byte, len(to))
			}
			m.waiting[client] = q
			ks.queued[m.id] = m
		}
	}
	if m.waiting == nil {
		return nil
	}
	k.lastID = m.id
	m.payload = bytes.Clone(payload)
	k.messages[m.id] = m
	k.pend = appendHeldFrame(k.pend, m)
	return m
}

// handed records that the delivery of m put it in flight to cl under pid
// (step 3). It is called before the message is written, so that the
// application's acknowledgement always finds it.
//
// A connection already taken over (its in-flight messages copied to the
// new one, maybe before m was added) no longer names the session's packet
// ids: m is put in flight again on the new connection, or found among what
// was copied, when the delivery settles (Sidecar.followTakeover), and only
// then recorded under a packet id.
func (k *keptSessions) handed(m *keptMessage, cl *mqtt.Client, pid uint16) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ks := k.sessions[cl.ID]
	if _, waits := m.waiting[cl.ID]; ks == nil || !waits {
		return // a session that subscribed since the message was held: not kept
	}
	if !cl.IsTakenOver() {
		ks.inflight[pid] = m
	}
	m.handed = append(m.handed, keptHandoff{cl, pid})
}

// unhanded withdraws a handoff whose message was not written after all (the
// local broker delivers it instead, and it is handed again then).
func (k *keptSessions) unhanded(m *keptMessage, cl *mqtt.Client, pid uint16) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if ks := k.sessions[cl.ID]; ks != nil && ks.inflight[pid] == m {
		delete(ks.inflight, pid)
	}
	m.handed = slices.DeleteFunc(m.handed, func(h keptHandoff) bool { return h.cl == cl && h.pid == pid })
}

// settle ends the delivery of m: the sessions it was not put in flight to
// are done with it. It returns the handoffs to connections that have been
// taken over since (see Sidecar.followTakeover).
func (k *keptSessions) settle(m *keptMessage) []keptHandoff {
	k.mu.Lock()
	defer k.mu.Unlock()
	for client := range m.waiting {
		if !slices.ContainsFunc(m.handed, func(h keptHandoff) bool { return h.cl.ID == client }) {
			k.doneLocked(m, client)
		}
	}
	var moved []keptHandoff
	for _, h := range m.handed {
		if h.cl.IsTakenOver() {
			moved = append(moved, h)
		}
	}
	m.handed = nil
	return moved
}

// moved forgets the handoff h of m, for the connection that took h's
// session over and does not have m; it returns the QoS m goes there at, or
// false when the session is done with m.
func (k *keptSessions) moved(m *keptMessage, h keptHandoff) (byte, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if ks := k.sessions[h.cl.ID]; ks != nil && ks.inflight[h.pid] == m {
		delete(ks.inflight, h.pid)
	}
	qos, ok := m.waiting[h.cl.ID]
	return qos, ok
}

// rehanded records m in flight to cl under pid, after its delivery: on the
// connection that took over the one m was delivered to. A packet id
// recorded for another message is left to it.
func (k *keptSessions) rehanded(m *keptMessage, cl *mqtt.Client, pid uint16) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, waits := m.waiting[cl.ID]; !waits {
		return
	}
	if ks := k.sessions[cl.ID]; ks != nil && (ks.inflight[pid] == nil || ks.inflight[pid] == m) {
		ks.inflight[pid] = m
	}
}

// completed marks the message in flight to cl under pid done for cl's
// session: its application acknowledged it, or the local broker dropped
// it.
func (k *keptSessions) completed(cl *mqtt.Client, pid uint16) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ks := k.sessions[cl.ID]
	if ks == nil {
		return
	}
	if m := ks.inflight[pid]; m != nil {
		delete(ks.inflight, pid)
		k.doneLocked(m, cl.ID)
	}
}

// dropLocked removes client from m's recipients, and m once nobody waits
// for it; it reports whether client was one.
func (k *keptSessions) dropLocked(m *keptMessage, client string) bool {
	if _, ok := m.waiting[client]; !ok {
		return false
	}
	delete(m.waiting, client)
	if ks := k.sessions[client]; ks != nil {
		delete(ks.queued, m.id)
	}
	if len(m.waiting) == 0 {
		delete(k.messages, m.id)
	}
	return true
}

func (k *keptSessions) doneLocked(m *keptMessage, client string) {
	if k.dropLocked(m, client) {
		k.pend = appendDoneFrame(k.pend, m.id, client)
	}
}

// removeLocked forgets a session and what was held for it.
func (k *keptSessions) removeLocked(client string, ks *keptSession) {
	for _, m := range ks.queued {
		k.dropLocked(m, client)
	}
	delete(k.sessions, client)
	k.count.Add(-1)
}

func (k *keptSessions) endLocked(client string, ks *keptSession) {
	k.removeLocked(client, ks)
	k.pend = appendEndedFrame(k.pend, client)
}

// drain appends the frames not yet written to b and forgets them.
func (k *keptSessions) drain(b []byte) []byte {
	k.mu.Lock()
	defer k.mu.Unlock()
	b = append(b, k.pend...)
	k.pend = k.pend[:0]
	return b
}

// snapshot appends frames that rebuild the whole state, in a fixed order,
// and forgets the frames not yet written: the snapshot holds them.
func (k *keptSessions) snapshot(b []byte) []byte {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.pend = k.pend[:0]
	for _, client := range slices.Sorted(maps.Keys(k.sessions)) {
		ks := k.sessions[client]
		b = appendSessionFrame(b, client, ks)
		for _, filter := range slices.Sorted(maps.Keys(ks.subs)) {
			b = appendSubscribedFrame(b, client, ks.subs[filter])
		}
	}
	for _, id := range slices.Sorted(maps.Keys(k.messages)) {
		b = appendHeldFrame(b, k.messages[id])
	}
	return b
}

// apply replays one logged frame of a kept session.
func (k *keptSessions) apply(r *inboundRecord) {
	k.mu.Lock()
	defer k.mu.Unlock()
	client := string(r.client)
	ks := k.sessions[client]
	switch r.kind {
	case frameKindKeptSession:
		if ks == nil {
			ks = newKeptSession()
			k.sessions[client] = ks
			k.count.Add(1)
		}
		ks.version, ks.expiry, ks.username = r.version, r.expiry, bytes.Clone(r.username)
	case frameKindKeptEnded:
		if ks != nil {
			k.removeLocked(client, ks)
		}
	case frameKindKeptSubscribed:
		if ks != nil {
			ks.subs[string(r.filter)] = packets.Subscription{
				Filter:            string(r.filter),
				Qos:               r.qos,
				NoLocal:           r.options&1 != 0,
				RetainAsPublished: r.options&2 != 0,
				RetainHandling:    (r.options >> 2) & 3,
				Identifier:        int(r.subID),
			}
		}
	case frameKindKeptUnsubscribed:
		if ks != nil {
			delete(ks.subs, string(r.filter))
		}
	case frameKindKeptHeld:
		k.lastID = max(k.lastID, r.id)
		if k.messages[r.id] != nil {
			return
		}
		m := &keptMessage{id: r.id, created: r.created, qos: r.qos, retain: r.retain, topic: string(r.topic), waiting: make(map[string]byte)}
		to := r.to // checked whole by parseKeptFrame
		for range r.n {
			qos := to[0]
			n := int(binary.LittleEndian.Uint16(to[1:]))
			name := string(to[3 : 3+n])
			to = to[3+n:]
			if ks := k.sessions[name]; ks != nil {
				m.waiting[name] = qos
				ks.queued[m.id] = m
			}
		}
		if len(m.waiting) > 0 {
			m.payload = bytes.Clone(r.payload)
			k.messages[m.id] = m
		}
	case frameKindKeptDone:
		if m := k.messages[r.id]; m != nil {
			k.dropLocked(m, client)
		}
	}
}

// messagesHeld is the number of messages held for kept sessions.
func (k *keptSessions) messagesHeld() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.messages)
}

// storedClients, storedSubscriptions and storedInflight hand the kept
// sessions to the local broker when it starts (step 4), in this order.
func (k *keptSessions) storedClients() []storage.Client {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]storage.Client, 0, len(k.sessions))
	for _, client := range slices.Sorted(maps.Keys(k.sessions)) {
		ks := k.sessions[client]
		out = append(out, storage.Client{
			ID:              client,
			T:               storage.ClientKey,
			ProtocolVersion: ks.version,
			Username:        bytes.Clone(ks.username),
			Properties: storage.ClientProperties{
				SessionExpiryInterval:     ks.expiry,
				SessionExpiryIntervalFlag: ks.version == 5,
			},
		})
	}
	return out
}

func (k *keptSessions) storedSubscriptions() []storage.Subscription {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []storage.Subscription
	for _, client := range slices.Sorted(maps.Keys(k.sessions)) {
		ks := k.sessions[client]
		for _, filter := range slices.Sorted(maps.Keys(ks.subs)) {
			sub := ks.subs[filter]
			out = append(out, storage.Subscription{
				T:                 storage.SubscriptionKey,
				Client:            client,
				Filter:            filter,
				Qos:               sub.Qos,
				NoLocal:           sub.NoLocal,
				RetainAsPublished: sub.RetainAsPublished,
				RetainHandling:    sub.RetainHandling,
				Identifier:        sub.Identifier,
			})
		}
	}
	return out
}

// storedInflight puts every session's held messages in flight, oldest
// first, under packet ids from 1; it returns them and how many it had to
// drop.
func (k *keptSessions) storedInflight() ([]storage.Message, int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []storage.Message
	dropped := 0
	for _, client := range slices.Sorted(maps.Keys(k.sessions)) {
		ks := k.sessions[client]
		for i, id := range slices.Sorted(maps.Keys(ks.queued)) {
			m := ks.queued[id]
			if i >= maxKeptInflight {
				k.doneLocked(m, client)
				dropped++
				continue
			}
			pid := uint16(i + 1)
			ks.inflight[pid] = m
			out = append(out, storage.Message{
				T:           storage.InflightKey,
				Client:      client,
				PacketID:    pid,
				TopicName:   m.topic,
				Payload:     m.payload,
				Created:     m.created,
				FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: m.waiting[client], Retain: m.retain},
			})
		}
	}
	return out, dropped
}
