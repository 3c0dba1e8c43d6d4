package proxy

import (
	"bytes"
	"errors"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

// subKey names one client's subscription to one filter.
type subKey struct{ client, filter string }

// relayedWillTopic is where the local broker "publishes" a Will the sidecar
// has already relayed upstream: a $-topic no wildcard matches and no
// application subscribes to.
const relayedWillTopic = "$smqtt/relayed-will"

// hook is the sidecar's one hook on the local broker.
type hook struct {
	mqtt.HookBase
	sc *Sidecar
}

func (h *hook) ID() string { return "smqtt-sidecar" }

func (h *hook) Provides(b byte) bool {
	return bytes.Contains([]byte{
		mqtt.OnConnectAuthenticate,
		mqtt.OnACLCheck,
		mqtt.OnPublish,
		mqtt.OnSubscribe,
		mqtt.OnSubscribed,
		mqtt.OnUnsubscribed,
		mqtt.OnWill,
		mqtt.OnSessionEstablished,
		mqtt.OnDisconnect,
		mqtt.OnClientExpired,
		mqtt.OnPublishDropped,
		mqtt.OnQosPublish,
		mqtt.OnQosComplete,
		mqtt.OnQosDropped,
		mqtt.StoredClients,
		mqtt.StoredSubscriptions,
		mqtt.StoredInflightMessages,
	}, []byte{b})
}

// OnConnectAuthenticate admits everyone when no users are configured, and
// otherwise checks the username and password.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	users := h.sc.opts.Users
	if len(users) == 0 {
		return true
	}
	pw, ok := users[string(pk.Connect.Username)]
	if !ok || !constantTimeEqual(pw, string(pk.Connect.Password)) {
		h.sc.limitedWarn("auth", "local client refused: bad username or password", "client", cl.ID, "remote", cl.Net.Remote)
		return false
	}
	return true
}

// OnACLCheck lets everything through, except a live message to a client
// that already had it as a retained message (see claimLive). The check for
// a SUBSCRIBE in progress is told apart by the subscribing mark.
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if write {
		return true
	}
	sc := h.sc
	sc.excludeMu.Lock()
	excluded := sc.exclude[cl.ID] && topic == sc.excludeTopic
	sc.excludeMu.Unlock()
	if excluded {
		if _, subscribing := sc.subscribing.Load(cl.ID); subscribing {
			return true
		}
	}
	return !excluded
}

// errSuccessIgnore is packets.CodeSuccessIgnore as an error, boxed once
// rather than on every publish.
var errSuccessIgnore error = packets.CodeSuccessIgnore

// OnPublish sends a local application's publish upstream instead of routing
// it locally; it comes back through the mirror to local subscribers.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil // the sidecar's own delivery of an upstream message
	}
	sc := h.sc
	m, err := sc.sealOutbound(pk.TopicName, pk.FixedHeader.Qos, pk.FixedHeader.Retain, pk.Payload)
	if err == nil {
		err = sc.sendOutbound(sc.ctx, m)
	}
	if err == nil && m.qos > 0 {
		err = sc.holdAcks(cl) // the acknowledgement waits for the queue's write
	}
	switch {
	case err == nil:
		return pk, errSuccessIgnore // acknowledged; routed by upstream, not locally
	case cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos > 0:
		if errors.Is(err, errDenied) || errors.Is(err, errNoKey) {
			return pk, packets.ErrNotAuthorized // a negative PUBACK/PUBREC
		}
		return pk, packets.ErrImplementationSpecificError
	case errors.Is(err, errDenied):
		// MQTT 3.1.1 has no negative acknowledgement: like a broker whose
		// ACL denies a publish, acknowledge and drop (counted).
		return pk, packets.CodeSuccessIgnore
	case pk.FixedHeader.Qos > 0:
		// No key, or the queue failed: the application must not take the
		// message as delivered. Disconnecting it makes it send the message
		// again when it reconnects.
		sc.limitedWarn("disconnect-"+cl.ID, "disconnecting a local client whose QoS 1/2 publish cannot be sent", "client", cl.ID, "topic", pk.TopicName, "error", err)
		sc.server.DisconnectClient(cl, packets.ErrNotAuthorized)
		return pk, packets.ErrRejectPacket
	default:
		return pk, packets.ErrRejectPacket
	}
}

// OnWill relays a local client's Will upstream, protected like any publish,
// now or after its Will Delay Interval (will.go), and leaves the local
// broker a harmless stand-in to publish.
func (h *hook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	h.sc.wills.will(cl, will)
	// The sidecar keeps the delay; the local broker publishes its stand-in
	// at once. (Its own delayed-Will path would also clear the client's
	// Will without synchronisation, racing with a reconnect.)
	cl.Properties.Will.WillDelayInterval = 0
	return mqtt.Will{TopicName: relayedWillTopic, Payload: nil, Qos: 0}, nil
}

// OnSessionEstablished records a persistent session (keptsessions.go) and
// settles a delayed Will the client id left behind.
func (h *hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	h.sc.kept.established(cl, pk.Connect.Clean)
	h.sc.wills.connected(cl, pk.Connect.Clean)
}

func (h *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	if !cl.IsTakenOver() {
		h.sc.kept.disconnected(cl, expire)
	}
	h.sc.wills.disconnected(cl)
}

// OnSubscribe keeps the local broker from serving retained messages of its
// own (see retained.go): a subscription's retained messages come from
// upstream. The Retain Handling the client asked for is remembered for
// OnSubscribed.
func (h *hook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if cl.Net.Inline {
		return pk
	}
	h.sc.subscribing.Store(cl.ID, true)
	filters := make(packets.Subscriptions, len(pk.Filters))
	for i, f := range pk.Filters {
		h.sc.wantsRetained.Store(subKey{cl.ID, f.Filter}, f.RetainHandling)
		f.RetainHandling = 2
		filters[i] = f
	}
	pk.Filters = filters
	return pk
}

func (h *hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if cl.Net.Inline {
		return
	}
	h.sc.subscribing.Delete(cl.ID)
	var subs []change
	kept := false
	for i, f := range pk.Filters {
		handling, _ := h.sc.wantsRetained.LoadAndDelete(subKey{cl.ID, f.Filter})
		if i < len(reasonCodes) && reasonCodes[i] >= 0x80 {
			continue
		}
		_, existed := h.sc.mirror.holds(cl.ID, f.Filter)
		// Retain Handling (MQTT 5): 0 send retained messages, 1 only for a new
		// subscription, 2 never. Shared subscriptions get none.
		if rh, _ := handling.(byte); !isShared(f.Filter) && (rh == 0 || rh == 1 && !existed) {
			f.RetainHandling = rh
			h.sc.pendingRetained.add(cl.ID, f)
		}
		if c, ok := h.sc.mirrorTrack(cl.ID, f.Filter, f.Qos); ok {
			subs = append(subs, c)
		}
		if h.sc.kept.subscribed(cl, f) {
			kept = true
		}
	}
	if kept {
		// A persistent session's subscription is on disk before its SUBACK:
		// after a crash, what upstream sends for it is still kept for it.
		if err := h.sc.awaitCommit(); err != nil {
			h.sc.log.Warn("a local persistent session's subscription is not stored yet", "client", cl.ID, "error", err)
		}
	}
	h.sc.subscribeUpstream(subs)
}

func (h *hook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	for _, f := range pk.Filters {
		h.sc.pendingRetained.drop(cl.ID, f.Filter)
		h.sc.kept.unsubscribed(cl, f.Filter)
		h.sc.mirrorRemove(cl.ID, f.Filter)
	}
}

// OnClientExpired: mochi drops an expired persistent session without
// unsubscribing it, so the mirror lets go of its filters here.
func (h *hook) OnClientExpired(cl *mqtt.Client) {
	h.sc.kept.expired(cl.ID)
	h.sc.wills.sessionEnded(cl.ID)
	for filter := range cl.State.Subscriptions.GetAll() {
		h.sc.server.Topics.Unsubscribe(filter, cl.ID)
		h.sc.mirrorRemove(cl.ID, filter)
	}
}

func (h *hook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	h.sc.metrics.drop("in", DropLocalFull)
	h.sc.limitedWarn("local-full", "local subscriber too slow: message dropped", "client", cl.ID, "topic", pk.TopicName)
}

// OnQosPublish: the local broker put a message in flight to cl. A message
// held for kept sessions that the inbound worker publishes through the
// broker (deliver.go) is recorded there; resends (DUP) are in flight
// already.
func (h *hook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int) {
	if pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Dup {
		return
	}
	// (A topic alias leaves an MQTT 5 packet without its topic name.)
	if m := h.sc.kept.delivering.Load(); m != nil && (pk.TopicName == m.topic || pk.TopicName == "") && bytes.Equal(pk.Payload, m.payload) {
		h.sc.kept.handed(m, cl, pk.PacketID)
	}
}

// OnQosComplete: cl's application acknowledged a message (PUBACK, PUBCOMP).
func (h *hook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	h.sc.kept.completed(cl, pk.PacketID)
}

// OnQosDropped: the local broker gave up a message in flight to cl. A
// session taken over hands its messages to the new connection first: they
// are not dropped.
func (h *hook) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	if cl.IsTakenOver() {
		return
	}
	h.sc.metrics.drop("in", DropLocalFull)
	h.sc.kept.completed(cl, pk.PacketID)
}

// StoredClients, StoredSubscriptions and StoredInflightMessages load the
// kept sessions into the local broker as it starts; their subscriptions
// go into the mirror, subscribed upstream on connect.
func (h *hook) StoredClients() ([]storage.Client, error) {
	return h.sc.kept.storedClients(), nil
}

func (h *hook) StoredSubscriptions() ([]storage.Subscription, error) {
	subs := h.sc.kept.storedSubscriptions()
	for _, s := range subs {
		h.sc.mirrorTrack(s.Client, s.Filter, s.Qos)
	}
	return subs, nil
}

func (h *hook) StoredInflightMessages() ([]storage.Message, error) {
	msgs, dropped := h.sc.kept.storedInflight()
	if dropped > 0 {
		h.sc.metrics.dropN("in", DropLocalFull, dropped)
		h.sc.log.Warn("local persistent sessions held more messages than fit in flight; the newest were dropped", "dropped", dropped, "limit", maxKeptInflight)
	}
	return msgs, nil
}
