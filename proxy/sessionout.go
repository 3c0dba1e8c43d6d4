package proxy

// Session mode, the app's packets to upstream.
//
//  1. Read a packet from the app.
//  2. PUBLISH: resolve its topic alias (aliases end here: upstream gets
//     whole topics), apply the policy (first protect rule wins; unprotected
//     passes, or is refused with unmatched: deny), seal under the group's
//     current key with the confidential MQTT 5 properties inside, check the
//     broker's maximum packet size, write upstream with the app's packet id.
//     In a sender_auth group the sealed publish joins a batch, proved with
//     one signature and written once no further packet of the app is
//     already read (senderauth.go).
//     The broker's PUBACK/PUBREC/PUBCOMP come back to the app unchanged
//     (sessionin.go): the app's publish is acknowledged when upstream has it.
//  3. PUBACK or PUBREC of a delivery: mark the delivery in the session's
//     replay state, then relay it (the log is written before the broker
//     sees the acknowledgement: see begin's barrier).
//  4. SUBSCRIBE, UNSUBSCRIBE: remembered until upstream answers (the
//     session's subscriptions decide how many copies of a message it may
//     take), relayed.
//  5. DISCONNECT: relayed, and both connections end; the app's connection
//     ending without one ends the upstream connection without one, so the
//     broker publishes the Will.

import (
	"errors"
	"fmt"

	"github.com/smqtt/smqtt/envelope"
)

// MQTT 5 reason codes the relay sends itself.
const (
	reasonNotAuthorized     = 0x87
	reasonProtocolError     = 0x82
	reasonServerBusy        = 0x89
	reasonPacketTooLarge    = 0x95
	reasonTopicAliasInvalid = 0x94
)

// runOut relays the app's packets until the app's connection ends.
func (a *appConn) runOut() {
	var scratch []byte
	for {
		first, body, err := readPacket(a.local, &scratch, false)
		if err != nil {
			// Without DISCONNECT: upstream is cut too, and publishes the Will.
			a.abort()
			return
		}
		if n := 1 + len(envelope.AppendVarint(nil, len(body))) + len(body); a.toldMax > 0 && n > int(a.toldMax) {
			// What a broker does to a client above the maximum it was told.
			a.local.Write(disconnectFor(true, reasonPacketTooLarge))
			a.sc.log.Debug("ending a local session: a packet above its maximum packet size", "client", a.appID, "bytes", n, "maximum", a.toldMax)
			a.abort()
			return
		}
		err = a.outPacket(first, body)
		if err == nil && a.batchDue() {
			err = a.flushBatch()
		}
		if err != nil {
			if !errors.Is(err, errConnClosed) {
				a.sc.log.Debug("ending a local session", "client", a.appID, "error", err)
			}
			a.abort()
			return
		}
		if a.cleanEnd.Load() {
			return
		}
	}
}

func (a *appConn) outPacket(first byte, body []byte) error {
	if first>>4 != typePublish {
		// Every other packet goes after the batch before it.
		if err := a.flushBatch(); err != nil {
			return err
		}
	}
	switch first >> 4 {
	case typePublish:
		return a.outPublish(first, body)
	case typePuback, typePubrec:
		if len(body) < 2 {
			return fmt.Errorf("%w: acknowledgement of %d bytes", errMalformed, len(body))
		}
		a.delivered(packetID(body))
	case typePubrel:
		if len(body) < 2 {
			return fmt.Errorf("%w: PUBREL of %d bytes", errMalformed, len(body))
		}
		if id := packetID(body); a.ownedOut2[id] {
			delete(a.ownedOut2, id)
			_, err := a.local.Write(ackFor(typePubcomp, id, a.v5, 0))
			return err
		}
	case typeSubscribe:
		id, subs, err := parseSubscribe(body, a.v5)
		if err != nil {
			return err
		}
		filters := make([]string, len(subs))
		for i, s := range subs {
			filters[i] = s.filter
		}
		a.mu.Lock()
		a.subReqs[id], a.unsubs[id] = filters, false
		a.mu.Unlock()
	case typeUnsubscribe:
		id, filters, err := parseUnsubscribe(body, a.v5)
		if err != nil {
			return err
		}
		a.mu.Lock()
		a.subReqs[id], a.unsubs[id] = filters, true
		a.mu.Unlock()
	case typeDisconnect:
		if a.v5 && len(body) > 1 {
			r := &reader{b: body[1:]}
			if p := r.props("disconnect properties"); r.err == nil {
				if v, ok := propU32(p, propSessionExpiry); ok {
					a.expiry = v
				}
			}
		}
		a.cleanEnd.Store(true)
		_, err := a.up.Write(appendPacket(a.outBuf[:0], first, body))
		a.up.Close() // hands the DISCONNECT to the socket first
		a.local.Close()
		return err
	case typeConnect:
		return fmt.Errorf("%w: a second CONNECT", errMalformed)
	case typePubcomp, typePingreq, typeAuth:
	default:
		return fmt.Errorf("%w: packet type %d from an app", errMalformed, first>>4)
	}
	a.outBuf = appendPacket(a.outBuf[:0], first, body)
	_, err := a.up.Write(a.outBuf)
	return err
}

// delivered marks the delivery the app acknowledged in the session's
// replay state. It stays pending until it is marked, so that a copy
// arriving meanwhile finds it one way or the other.
func (a *appConn) delivered(id uint16) {
	a.mu.Lock()
	m, ok := a.pending[id]
	a.mu.Unlock()
	if !ok {
		return
	}
	a.sc.state.commitSession(a.sess, m)
	a.mu.Lock()
	if a.pending[id] == m {
		delete(a.pending, id)
		if a.marks[m]--; a.marks[m] <= 0 {
			delete(a.marks, m)
		}
	}
	a.mu.Unlock()
}

// outPublish relays one PUBLISH of the app.
func (a *appConn) outPublish(first byte, body []byte) error {
	p, err := parsePublishPacket(first, body, a.v5)
	if err != nil {
		return err
	}
	raw := body // nil once the packet changed
	if a.v5 {
		if v, ok := findProp(p.props, propTopicAlias); ok {
			raw = nil
			alias := uint16(v[0])<<8 | uint16(v[1])
			if alias == 0 || alias > a.aliasMax {
				a.local.Write(disconnectFor(true, reasonTopicAliasInvalid))
				return fmt.Errorf("%w: topic alias %d out of 1..%d", errMalformed, alias, a.aliasMax)
			}
			if p.topic != "" {
				a.outAliases[alias] = p.topic
			} else if p.topic = a.outAliases[alias]; p.topic == "" {
				a.local.Write(disconnectFor(true, reasonProtocolError))
				return fmt.Errorf("%w: unknown topic alias %d", errMalformed, alias)
			}
		}
	}
	if p.topic == "" {
		return fmt.Errorf("%w: PUBLISH without a topic", errMalformed)
	}
	group, protected := a.sc.policy.Group(p.topic)
	if !protected || a.batch.n > 0 && a.batch.group != group {
		// What is not for the batch goes after it.
		if err := a.flushBatch(); err != nil {
			return err
		}
	}
	if !protected {
		if a.sc.deny.Load() {
			a.sc.metrics.drop("out", DropDenied)
			return a.refuseOut(&p, reasonNotAuthorized)
		}
		if raw == nil {
			p.props = withoutProps(nil, p.props, func(id byte) bool { return id == propTopicAlias })
		}
		return a.writeUp(&p, raw, false)
	}
	sealer, err := a.sc.sealerFor(group)
	if err != nil && p.qos() > 0 && a.sc.opts.NoKeyWait > 0 {
		sealer, err = a.sc.waitSealer(group)
	}
	if err != nil {
		a.sc.metrics.drop("out", DropNoKey)
		a.sc.limitedWarn("no-key-"+group, "no key for protected topic: message refused", "topic", p.topic, "group", group, "error", err)
		if p.qos() == 0 {
			return nil
		}
		// The app must not take it as delivered: disconnected, it sends it
		// again when it comes back (and upstream publishes its Will, as a
		// broker that drops a client does).
		a.local.Write(disconnectFor(a.v5, reasonServerBusy))
		return errNoKey
	}
	flags := envelope.Flags(0)
	if p.retain() {
		flags |= envelope.FlagRetain
	}
	plain := p.payload
	if a.v5 {
		inner, outer := splitSealedProps(p.props)
		p.props = outer
		if len(inner) > 0 {
			flags |= envelope.FlagProps
			a.plainBuf = envelope.AppendProps(a.plainBuf[:0], inner, p.payload)
			plain = a.plainBuf
		}
	}
	if a.sc.keys.SenderAuth(group) {
		if err := a.batchPublish(&p, group, sealer, flags, plain); err != nil {
			a.sc.metrics.drop("out", DropNoKey)
			return err
		}
		return nil
	}
	if err := a.flushBatch(); err != nil {
		return err
	}
	a.sealBuf, _, err = sealer.Seal(a.sealBuf[:0], p.topic, flags, plain)
	if err != nil {
		a.sc.metrics.drop("out", DropNoKey)
		return fmt.Errorf("seal %q: %w", p.topic, err)
	}
	p.payload = a.sealBuf
	return a.writeUp(&p, nil, true)
}

// writeUp writes a PUBLISH upstream: as it came (raw) when nothing in it
// changed, else encoded again.
func (a *appConn) writeUp(p *publishPacket, raw []byte, protected bool) error {
	if a.upMaxPacket > 0 && p.encodedLen(a.v5) > int(a.upMaxPacket) {
		// Only an app that ignores the maximum it was told gets here, as
		// with the broker itself.
		a.local.Write(disconnectFor(a.v5, reasonPacketTooLarge))
		return fmt.Errorf("%w: PUBLISH on %q larger than the broker's maximum packet size %d", errMalformed, p.topic, a.upMaxPacket)
	}
	if raw != nil {
		a.outBuf = appendPacket(a.outBuf[:0], p.first, raw)
	} else {
		a.outBuf = p.append(a.outBuf[:0], a.v5)
	}
	if _, err := a.up.Write(a.outBuf); err != nil {
		return err
	}
	a.sc.countOut(protected)
	return nil
}

// refuseOut answers a publish the sidecar will not relay as a broker whose
// ACL refuses it would: MQTT 5 with a negative acknowledgement, MQTT 3.1.1
// with a positive one (it has no other), QoS 0 with nothing.
func (a *appConn) refuseOut(p *publishPacket, reason byte) error {
	switch p.qos() {
	case 1:
		_, err := a.local.Write(ackFor(typePuback, p.id, a.v5, reason))
		return err
	case 2:
		if !a.v5 {
			a.ownedOut2[p.id] = true
		}
		_, err := a.local.Write(ackFor(typePubrec, p.id, a.v5, reason))
		return err
	}
	return nil
}
