package proxy

// Inbound: upstream delivers, and the message reaches local subscribers.
//
//  1. bridge.go hands every upstream PUBLISH to onUpstreamMessage, which
//     queues it for the inbound worker (a full queue holds the bridge's
//     reader, which holds the upstream connection: backpressure, not loss).
//  2. The worker takes a batch. Per message: policy lookup; unprotected
//     topics pass as they are. Protected: open the envelope (version, epoch
//     key, per-sender subkey, AEAD over header, group and topic). Anything
//     that fails is dropped and counted by reason, never delivered.
//  3. Replay: a live message must be new in its sender's sliding window.
//     A retained delivery (a stored value upstream replays on subscribe, or a
//     re-sealed one) goes through the topic's retained register instead.
//  4. Hold: a QoS 1/2 message that local persistent sessions subscribe to
//     is recorded for them (keptsessions.go), so that a crash loses none of
//     what is acknowledged upstream.
//  5. One write(2) appends the batch's held messages and its window and
//     register changes to the inbound log (state.go, inboundlog.go),
//     fsynced by the sync policy.
//  6. Deliver to the local subscribers (deliver.go; never forwarded
//     upstream again), then acknowledge upstream.

import (
	"context"
	"errors"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/envelope"
)

const inboundBatch = 256

// delivery is what the worker does with one upstream message after the
// batch's state is committed.
type delivery struct {
	msg     paho.Message
	topic   string
	payload []byte
	qos     byte
	action  deliveryAction
	valueID string         // names a sealed value for the retained path (valueID)
	sealed  bool           // protected: triple names the value
	triple  retainedTriple // the sealed value's (epoch, sender, seq)
	kept    *keptMessage   // held for local persistent sessions
}

// id names the delivery's value (see pendingRetained.claimLive).
func (d *delivery) id() string {
	if d.valueID == "" && d.sealed {
		d.valueID = valueID(d.triple)
	}
	return d.valueID
}

type deliveryAction int

const (
	actDrop     deliveryAction = iota // counted already, or nothing to deliver: just acknowledge
	actPublish                        // a live message: to every current local subscriber
	actRetained                       // a stored retained value: only to subscriptions waiting for it
)

func (sc *Sidecar) onUpstreamMessage(m paho.Message) {
	select {
	case sc.inbound <- m:
	case <-sc.ctx.Done():
	}
}

// runInbound is the inbound worker.
func (sc *Sidecar) runInbound(ctx context.Context) {
	batch := make([]delivery, 0, inboundBatch)
	for {
		var first paho.Message
		select {
		case first = <-sc.inbound:
		case done := <-sc.commitReq:
			// Between batches what is pending is whole: no message's
			// replay state goes out without its held record.
			done <- sc.state.commit()
			continue
		case <-ctx.Done():
			return
		}
		batch = append(batch[:0], sc.judge(first))
	fill:
		for len(batch) < inboundBatch {
			select {
			case m := <-sc.inbound:
				batch = append(batch, sc.judge(m))
			default:
				break fill
			}
		}
		sc.holdForSessions(batch)
		for {
			err := sc.state.commit()
			if err == nil {
				break
			}
			// Without stored replay state nothing may be delivered or
			// acknowledged: upstream will redeliver once the disk recovers.
			sc.log.Error("storing inbound replay state failed; retrying", "error", err)
			select {
			case <-time.After(time.Second):
			case <-ctx.Done():
				return
			}
		}
		for i := range batch {
			sc.deliver(&batch[i])
			batch[i].msg.Ack()
			batch[i] = delivery{}
		}
	}
}

// judge opens and checks one upstream message and decides its delivery.
func (sc *Sidecar) judge(m paho.Message) delivery {
	d := delivery{msg: m, topic: m.Topic(), qos: m.Qos()}
	group, protected := sc.policy.Group(d.topic)
	if !protected {
		d.payload = m.Payload()
		d.action = actPublish
		if m.Retained() {
			d.action = actRetained
		}
		sc.mInPlain.Inc()
		return d
	}
	h, plain, err := sc.openEnvelope(nil, group, d.topic, m.Payload())
	if err != nil {
		reason := envelope.Reason(err)
		if errors.Is(err, envelope.ErrNoKey) {
			reason = DropUnknownKey // inbound: no key for the envelope's epoch
		}
		sc.metrics.drop("in", reason)
		sc.limitedWarn("open-"+reason, "dropped an upstream message that failed to open", "topic", d.topic, "group", group, "reason", reason)
		return d
	}
	d.payload = plain
	triple := retainedTriple{Epoch: h.Epoch, Sender: h.Sender, Seq: h.Seq}
	d.sealed, d.triple = true, triple
	if h.Flags.Retain() && (m.Retained() || h.Flags.Reseal()) {
		// A stored retained value (or one re-sealed under a new epoch):
		// it bypasses the sliding window and goes through the register.
		if !sc.state.freshRetained(d.topic, triple) {
			sc.metrics.drop("in", DropStaleRetain)
			sc.limitedWarn("stale-retained", "dropped a stale retained message", "topic", d.topic, "group", group)
			return d
		}
		if m.Retained() && len(plain) > 0 { // a tombstone or a reseal is delivered to no one
			d.action = actRetained
		}
		sc.mInProtected.Inc()
		return d
	}
	if !sc.state.accept(group, h.Epoch, h.Sender, h.Seq) {
		sc.metrics.drop("in", DropReplay)
		sc.limitedWarn("replay", "dropped a replayed or duplicated message", "topic", d.topic, "group", group, "sender", h.Sender, "seq", h.Seq)
		return d
	}
	if h.Flags.Retain() {
		sc.state.freshRetained(d.topic, triple) // a live retained publish: the topic's newest value
	}
	d.action = actPublish
	sc.mInProtected.Inc()
	return d
}

// awaitCommit has the inbound worker write what is pending, between two
// batches, and waits until it is written.
func (sc *Sidecar) awaitCommit() error {
	done := make(chan error, 1)
	select {
	case sc.commitReq <- done:
	case <-sc.ctx.Done():
		return sc.ctx.Err()
	}
	select {
	case err := <-done:
		return err
	case <-sc.ctx.Done():
		return sc.ctx.Err()
	}
}

// holdForSessions records the batch's QoS 1/2 messages for the local persistent
// sessions that subscribe to them (step 4): a live message for the kept
// sessions among its subscribers, a retained one for those among the
// subscriptions waiting for it. Sessions that end up not getting it (they
// had it as a retained value, or are one of a shared group's other
// members) are done with it once it is delivered.
func (sc *Sidecar) holdForSessions(batch []delivery) {
	if sc.kept.count.Load() == 0 {
		return
	}
	maxQos := sc.server.Options.Capabilities.MaximumQos
	for i := range batch {
		d := &batch[i]
		if d.qos == 0 {
			continue
		}
		var to map[string]byte
		add := func(client string, subQos byte) {
			if q := min(d.qos, subQos, maxQos); q > 0 {
				if to == nil {
					to = make(map[string]byte)
				}
				to[client] = max(to[client], q)
			}
		}
		switch d.action {
		case actPublish:
			subs := sc.direct.subscribers(sc.server, d.topic)
			for client, sub := range subs.Subscriptions {
				add(client, sub.Qos)
			}
			for _, group := range subs.Shared {
				for client, sub := range group {
					add(client, sub.Qos)
				}
			}
		case actRetained:
			for _, p := range sc.pendingRetained.waiting(d.topic) {
				add(p.client, p.sub.Qos)
			}
		}
		if to != nil {
			d.kept = sc.kept.hold(d.topic, d.payload, d.qos, d.action == actRetained, to)
		}
	}
}

// deliver carries out one decision on the local broker.
func (sc *Sidecar) deliver(d *delivery) {
	switch d.action {
	case actPublish:
		had := sc.pendingRetained.claimLive(d.topic, d.id)
		sc.deliverLive(d.topic, d.payload, d.qos, had, d.kept) // deliver.go
	case actRetained:
		sc.deliverRetained(d.topic, d.id(), d.payload, d.qos, d.kept)
	}
	if d.kept != nil {
		sc.settleKept(d.kept)
	}
}
