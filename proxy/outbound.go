package proxy

// Outbound: a local application publishes, and the message goes upstream.
//
//  1. hook.go OnPublish (or OnWill) hands the packet to sealOutbound.
//  2. Policy: the first protect rule whose filter matches names the group;
//     no rule: relay as is, or refuse with unmatched: deny.
//  3. Seal under the group's current key (fail closed: no key, no send).
//  4. QoS 0: straight to upstream if it is connected, else dropped and
//     counted. QoS 1/2: appended to the durable outbound queue; the
//     application's PUBACK/PUBREC reaches its socket only after the queue
//     wrote the record (the queue writes behind, many records per system
//     call: holdAcks), and a full queue makes Append wait, which holds the
//     application's connection (backpressure) instead of dropping.
//  5. The sender goroutine takes queued records in order and hands them to
//     the bridge with a bounded in-flight window; the bridge releases each
//     record when upstream acknowledges it.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/proxy/queue"
)

// errDenied and errNoKey are the reasons a local publish is refused.
var (
	errDenied = errors.New("topic not protected and unmatched: deny")
	errNoKey  = errors.New("no group key: refusing to send in clear")
)

// outboundMessage is what goes upstream for one local publish.
type outboundMessage struct {
	topic     string
	qos       byte
	retain    bool
	payload   []byte // sealed when protected
	protected bool
	sealed    *[]byte // payload's buffer from sealedPool, when protected
}

// sealOutbound applies the policy to one local publish.
func (sc *Sidecar) sealOutbound(topic string, qos byte, retain bool, payload []byte) (outboundMessage, error) {
	m := outboundMessage{topic: topic, qos: qos, retain: retain, payload: payload}
	group, ok := sc.policy.Group(topic)
	if !ok {
		if sc.deny.Load() {
			sc.metrics.drop("out", DropDenied)
			return m, errDenied
		}
		return m, nil
	}
	sealer, err := sc.sealerFor(group)
	if err != nil && qos > 0 && sc.opts.NoKeyWait > 0 {
		sealer, err = sc.waitSealer(group)
	}
	if err != nil {
		sc.metrics.drop("out", DropNoKey)
		sc.log.Warn("no key for protected topic: message refused", "topic", topic, "group", group, "error", err)
		return m, errNoKey
	}
	var flags envelope.Flags
	if retain {
		flags |= envelope.FlagRetain
	}
	buf := sealedPool.Get().(*[]byte)
	sealed, err := sc.sealAlone((*buf)[:0], sealer, topic, flags, payload)
	if err != nil {
		sealedPool.Put(buf)
		sc.metrics.drop("out", DropNoKey)
		return m, fmt.Errorf("seal %q: %w", topic, err)
	}
	*buf = sealed
	m.payload, m.protected, m.sealed = sealed, true, buf
	return m, nil
}

// sealedPool recycles the buffers messages are sealed into: the queue and
// the upstream connection copy what they are given, so sendOutbound hands
// the buffer back.
var sealedPool = sync.Pool{New: func() any { return new([]byte) }}

// release hands m's sealed buffer back to the pool; m.payload is not to be
// used after it.
func (m *outboundMessage) release() {
	if m.sealed != nil && cap(*m.sealed) <= 64<<10 {
		sealedPool.Put(m.sealed)
	}
	m.sealed, m.payload = nil, nil
}

// waitSealer waits, bounded by NoKeyWait, for a group key to seal with (a
// join or an activation in progress); the publishing application waits too.
func (sc *Sidecar) waitSealer(group string) (*envelope.Sealer, error) {
	deadline := time.Now().Add(sc.opts.NoKeyWait)
	for {
		s, err := sc.sealerFor(group)
		if err == nil || time.Now().After(deadline) {
			return s, err
		}
		select {
		case <-time.After(20 * time.Millisecond):
		case <-sc.ctx.Done():
			return nil, err
		}
	}
}

// sendOutbound queues or sends one sealed message; it blocks while the
// outbound queue is full (backpressure on the publishing application). The
// queue and the connection copy m's payload: its sealed buffer is reused
// once sendOutbound returns.
func (sc *Sidecar) sendOutbound(ctx context.Context, m outboundMessage) error {
	defer m.release()
	if m.qos == 0 {
		if !sc.bridge.publishNow(m.topic, m.retain, m.payload) {
			sc.metrics.drop("out", DropOffline)
			sc.limitedWarn("qos0-offline", "upstream down: QoS 0 message dropped", "topic", m.topic)
			return nil
		}
		sc.countOut(m.protected)
		return nil
	}
	_, err := sc.queue.Append(ctx, queue.Record{QoS: m.qos, Retain: m.retain, Topic: m.topic, Payload: m.payload})
	if err != nil {
		sc.metrics.drop("out", DropQueueFull)
		return fmt.Errorf("outbound queue: %w", err)
	}
	sc.countOut(m.protected)
	return nil
}

// holdAcks keeps the acknowledgement that the local broker writes to cl
// once OnPublish returns from reaching cl's socket before the outbound
// queue has written the record (the queue writes behind, many records with
// one system call): on a batched connection its writer flushes the queue
// before each socket write; on any other the queue is flushed now. So an
// application never holds a PUBACK or PUBREC for a record that a crash of
// this process could lose.
func (sc *Sidecar) holdAcks(cl *mqtt.Client) error {
	bc, ok := cl.Net.Conn.(*batchedConn)
	if !ok {
		return sc.queue.Flush()
	}
	if bc.barrier.Load() == nil {
		flush := sc.queue.Flush
		bc.barrier.CompareAndSwap(nil, &flush)
	}
	return nil
}

// runSender moves queued records upstream, in order, until ctx ends.
func (sc *Sidecar) runSender(ctx context.Context) {
	for {
		rec, err := sc.queue.Next(ctx)
		if err != nil {
			return
		}
		reseal := func(p []byte) []byte { return sc.resealIfRetired(rec.Topic, p) }
		if err := sc.bridge.publishQueued(ctx, rec.ID, rec.Topic, rec.QoS, rec.Retain, rec.Payload, reseal); err != nil {
			return
		}
	}
}

// sendWindow is implemented by key rings that know when senders must stop
// using an epoch (keyclient.Ring).
type sendWindow interface {
	SendUntil(group string, epoch uint32) (time.Time, bool)
}

// resealIfRetired re-seals a queued message whose epoch senders had to stop
// using while it waited (past send_grace, e.g. after a long upstream
// outage) under the group's current epoch. Everything else leaves the
// queue byte for byte as it was sealed.
func (sc *Sidecar) resealIfRetired(topic string, payload []byte) []byte {
	sw, ok := sc.keys.(sendWindow)
	if !ok {
		return payload
	}
	group, protected := sc.policy.Group(topic)
	if !protected {
		return payload
	}
	h, err := envelope.ParseHeader(payload)
	if err != nil {
		return payload
	}
	until, ok := sw.SendUntil(group, h.Epoch)
	if !ok || time.Now().Before(until) {
		return payload
	}
	sealer, err := sc.sealerFor(group)
	if err != nil || sealer.Epoch() == h.Epoch {
		return payload
	}
	_, plain, err := sc.openEnvelope(nil, group, topic, payload)
	if err != nil {
		sc.log.Warn("a queued message's epoch is retired and it no longer opens; sending it as sealed", "topic", topic, "epoch", h.Epoch, "error", err)
		return payload
	}
	resealed, err := sc.sealAlone(make([]byte, 0, len(payload)), sealer, topic, h.Flags, plain)
	if err != nil {
		return payload
	}
	sc.log.Info("re-sealed a queued message under the current epoch", "topic", topic, "from", h.Epoch, "to", sealer.Epoch())
	return resealed
}

// onUpstreamAck is called by the bridge when upstream acknowledged a record.
func (sc *Sidecar) onUpstreamAck(id uint64) {
	if err := sc.queue.Ack(id); err != nil {
		sc.log.Error("outbound queue ack", "id", id, "error", err)
	}
}

func (sc *Sidecar) countOut(protected bool) {
	if protected {
		sc.mOutProtected.Inc()
	} else {
		sc.mOutPlain.Inc()
	}
}
