package proxy

// Session mode, upstream's packets to the app.
//
//  1. Read a packet from upstream.
//  2. PUBLISH on an unprotected topic: relayed as it came.
//  3. PUBLISH on a protected topic: open the envelope (authenticity, topic
//     binding, epoch key); anything that fails is dropped and counted,
//     never delivered.
//  4. Replay: a stored retained value (delivered by the broker with the
//     retain flag) passes the session's retained register; a Will the
//     session's Will register; anything else the session's windows
//     (sessionstate.go). A replay is dropped and counted.
//  5. Rebuild the PUBLISH: the plaintext, the sealed MQTT 5 properties back
//     after the broker's own (MQTT 3.1.1 apps get none, as from a broker),
//     the broker's packet id and flags. Too large for the app: dropped, as
//     the broker would. Deliver; the replay mark waits in pending for the
//     app's acknowledgement (sessionout.go), which then goes upstream.
//  6. What the sidecar dropped it acknowledges upstream itself (QoS 2: and
//     answers the PUBREL), so the broker does not send it again.
//  7. SUBACK, UNSUBACK: the session's subscriptions updated, relayed.
//     DISCONNECT: relayed, and both connections end. Anything else is
//     relayed as it came.

import (
	"errors"

	"github.com/smqtt/smqtt/envelope"
)

// DropTooLarge: opened, the message is larger than the app's maximum
// packet size.
const DropTooLarge = "too_large"

// runIn relays upstream's packets until upstream's connection ends.
func (a *appConn) runIn() {
	var scratch []byte
	for {
		first, body, err := readPacket(a.up, &scratch, false)
		if err != nil {
			a.abort()
			return
		}
		if err := a.inPacket(first, body); err != nil {
			if !errors.Is(err, errConnClosed) {
				a.sc.log.Debug("ending a local session: upstream", "client", a.appID, "error", err)
			}
			a.abort()
			return
		}
	}
}

func (a *appConn) inPacket(first byte, body []byte) error {
	switch first >> 4 {
	case typePublish:
		return a.inPublish(first, body)
	case typePubrel:
		if len(body) < 2 {
			return errMalformed
		}
		if id := packetID(body); a.ownedIn2[id] {
			delete(a.ownedIn2, id)
			_, err := a.up.Write(ackFor(typePubcomp, id, a.v5, 0))
			return err
		}
	case typeSuback, typeUnsuback:
		id, codes, err := parseAckCodes(body, a.v5)
		if err != nil {
			return err
		}
		a.subscribed(id, first>>4 == typeUnsuback, codes)
	case typeDisconnect:
		_, err := a.local.Write(appendPacket(a.inBuf[:0], first, body))
		a.abort()
		if err == nil {
			err = errConnClosed
		}
		return err
	}
	a.inBuf = appendPacket(a.inBuf[:0], first, body)
	_, err := a.local.Write(a.inBuf)
	return err
}

// subscribed applies upstream's answer to a SUBSCRIBE or UNSUBSCRIBE to
// the session's subscriptions.
func (a *appConn) subscribed(id uint16, unsub bool, codes []byte) {
	a.mu.Lock()
	filters := a.subReqs[id]
	wasUnsub := a.unsubs[id]
	delete(a.subReqs, id)
	delete(a.unsubs, id)
	a.mu.Unlock()
	if filters == nil || wasUnsub != unsub {
		return
	}
	for i, f := range filters {
		switch {
		case unsub:
			a.sc.state.sessionSubscribed(a.sess, f, false)
		case i < len(codes) && codes[i] < 0x80:
			a.sc.state.sessionSubscribed(a.sess, f, true)
		}
	}
}

// inPublish relays one PUBLISH from upstream.
func (a *appConn) inPublish(first byte, body []byte) error {
	p, err := parsePublishPacket(first, body, a.v5)
	if err != nil {
		return err
	}
	raw := body
	if a.v5 {
		// The sidecar asks for no aliases; a broker that sends them anyway
		// is followed, and the app gets whole topics.
		if v, ok := findProp(p.props, propTopicAlias); ok {
			alias := uint16(v[0])<<8 | uint16(v[1])
			if p.topic != "" {
				a.inAliases[alias] = p.topic
			} else if p.topic = a.inAliases[alias]; p.topic == "" {
				return errors.New("upstream used an unknown topic alias")
			}
			p.props = withoutProps(nil, p.props, func(id byte) bool { return id == propTopicAlias })
			raw = nil
		}
	}
	group, protected := a.sc.policy.Group(p.topic)
	var mark sessionMark
	marked := false
	if protected {
		var reason string
		mark, marked, reason = a.openIn(&p, group)
		if reason != "" {
			return a.dropIn(&p, reason)
		}
		raw = nil
		a.sc.mInProtected.Inc()
	} else {
		a.sc.mInPlain.Inc()
	}
	if a.appMaxPacket > 0 && p.encodedLen(a.v5) > int(a.appMaxPacket) {
		return a.dropIn(&p, DropTooLarge)
	}
	if marked {
		if p.qos() == 0 {
			a.sc.state.commitSession(a.sess, mark)
		} else {
			a.mu.Lock()
			if old, ok := a.pending[p.id]; ok { // a broker that reuses an id before its ack
				if a.marks[old]--; a.marks[old] <= 0 {
					delete(a.marks, old)
				}
			}
			a.pending[p.id] = mark
			a.marks[mark]++
			a.mu.Unlock()
		}
	}
	if raw != nil {
		a.inBuf = appendPacket(a.inBuf[:0], p.first, raw)
	} else {
		a.inBuf = p.append(a.inBuf[:0], a.v5)
	}
	_, err = a.local.Write(a.inBuf)
	return err
}

// openIn opens a protected PUBLISH in place and runs its replay check. It
// returns the mark to commit once the app has it (marked false for a
// retained value, which has none), or the reason to drop it.
func (a *appConn) openIn(p *publishPacket, group string) (mark sessionMark, marked bool, reason string) {
	h, plain, err := a.sc.openEnvelope(a.openBuf[:0], group, p.topic, p.payload)
	if err != nil {
		reason = envelope.Reason(err)
		if errors.Is(err, envelope.ErrNoKey) {
			reason = DropUnknownKey
		}
		a.sc.limitedWarn("open-"+reason, "dropped an upstream message that failed to open", "topic", p.topic, "group", group, "reason", reason)
		return mark, false, reason
	}
	a.openBuf = plain
	payload := plain
	var inner []byte
	if h.Flags.Props() {
		if inner, payload, err = envelope.SplitProps(plain); err != nil {
			a.sc.limitedWarn("open-props", "dropped an upstream message with bad sealed properties", "topic", p.topic, "group", group, "error", err)
			return mark, false, DropMalformed
		}
	}
	t := retainedTriple{Epoch: h.Epoch, Sender: h.Sender, Seq: h.Seq}
	switch {
	case h.Flags.Retain() && (p.retain() || h.Flags.Reseal()):
		// A stored retained value (or one sealed again under a new epoch):
		// it may come on every subscription, and is ordered per topic.
		if !a.sc.state.sessionRetained(a.sess, p.topic, t) {
			a.sc.limitedWarn("stale-retained", "dropped a stale retained message", "topic", p.topic, "group", group)
			return mark, false, DropStaleRetain
		}
		if h.Flags.Reseal() || !p.retain() || len(payload) == 0 {
			return mark, false, dropQuietly // a reseal or a tombstone is delivered to no one
		}
	default:
		mark, marked = a.sc.state.judgeSession(a.sess, group, p.topic, h, a.v5, a.isPending)
		if !marked {
			a.sc.limitedWarn("replay", "dropped a replayed or duplicated message", "topic", p.topic, "group", group, "sender", h.Sender, "seq", h.Seq)
			return mark, false, DropReplay
		}
		if h.Flags.Retain() {
			a.sc.state.sessionRetained(a.sess, p.topic, t) // a live retained publish: the topic's newest value
		}
	}
	p.payload = payload
	if a.v5 && len(inner) > 0 {
		p.props = append(append(make([]byte, 0, len(p.props)+len(inner)), p.props...), inner...)
	}
	return mark, marked, ""
}

// dropQuietly drops a message that is fine but for no one, uncounted.
const dropQuietly = "-"

// dropIn drops an upstream PUBLISH, counted, and acknowledges it upstream
// so that the broker does not send it again.
func (a *appConn) dropIn(p *publishPacket, reason string) error {
	if reason != dropQuietly {
		a.sc.metrics.drop("in", reason)
	}
	switch p.qos() {
	case 1:
		_, err := a.up.Write(ackFor(typePuback, p.id, a.v5, 0))
		return err
	case 2:
		a.ownedIn2[p.id] = true
		_, err := a.up.Write(ackFor(typePubrec, p.id, a.v5, 0))
		return err
	}
	return nil
}
