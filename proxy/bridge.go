package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/smqtt/smqtt/internal/mqttconn"
)

// UpstreamOptions say how to reach the untrusted upstream broker.
type UpstreamOptions = mqttconn.Options

// maxInflight bounds the QoS 1/2 messages sent upstream and not yet
// acknowledged. Receivers' replay windows (envelope.WindowSize) are at least
// twice this, so resends and reordering within it are never mistaken for
// replays that fell out of the window.
const maxInflight = 1024

// bridge is the upstream connection. Publishes of QoS 1/2 are stored, in
// order, in paho's ordered memory store until upstream acknowledges them;
// after a reconnect paho resends them in their original order with the DUP
// flag. The store is wrapped (ackStore) because it is the one place that
// sees an acknowledgement for sure: paho completes a publish token early,
// without error, when it resends the message after a reconnect.
type bridge struct {
	log    *slog.Logger
	client paho.Client
	store  *ackStore
	slots  chan struct{} // in-flight window

	// ready is false from a connection loss until everything paho resends
	// after the reconnect is acknowledged: new publishes wait, so they
	// cannot overtake the resends (paho feeds both to the connection at
	// once).
	mu         sync.Mutex
	cond       *sync.Cond
	ready      bool
	gen        uint64 // connection generation
	publishing int    // calls into paho's Publish in progress
}

// writeTimeout bounds one packet write upstream, and so how long a Publish
// call can stay blocked on a connection that died under it.
const writeTimeout = 5 * time.Second

func newBridge(opts UpstreamOptions, log *slog.Logger, onAck func(recordID uint64), onConnect func(), onLost func(error), onMessage func(paho.Message)) *bridge {
	b := &bridge{log: log, slots: make(chan struct{}, maxInflight)}
	b.cond = sync.NewCond(&b.mu)
	b.store = newAckStore()
	b.store.onAck = func(rid uint64) {
		<-b.slots
		onAck(rid)
		b.mu.Lock()
		b.cond.Broadcast()
		b.mu.Unlock()
	}
	o := opts.Paho(opts.ClientID).
		SetCleanSession(false). // upstream keeps what it queued for us across cuts
		SetResumeSubs(false).   // the mirror re-subscribes everything on connect
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(250 * time.Millisecond).
		SetWriteTimeout(writeTimeout).
		SetOrderMatters(true).
		SetAutoAckDisabled(true). // acknowledge upstream only once the message's replay state is stored
		SetStore(b.store).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { onMessage(m) }).
		// paho calls this synchronously before every connection attempt,
		// before the connection is up and before it resends anything: the
		// one place where new publishes can be stopped in time (the
		// connection-lost and on-connect handlers run in goroutines of their
		// own, in no fixed order).
		//
		// A Publish call that was blocked handing its packet to the dead
		// connection would hand it to the new one ahead of the resends: the
		// attempt waits for such calls to give up (writeTimeout); the
		// packet is in the store and goes out again in its place.
		SetConnectionAttemptHandler(func(_ *url.URL, tc *tls.Config) *tls.Config {
			b.mu.Lock()
			b.ready = false
			b.gen++
			for b.publishing > 0 {
				b.cond.Wait()
			}
			b.mu.Unlock()
			return tc
		}).
		SetOnConnectHandler(func(paho.Client) {
			b.connectedAgain()
			onConnect()
		}).
		SetConnectionLostHandler(func(_ paho.Client, err error) { onLost(err) })
	if !proxyFromEnvironment() {
		o.SetCustomOpenConnectionFn(dialUpstream) // buffered reads, batched writes (upstreamconn.go)
	}
	b.client = paho.NewClient(o)
	return b
}

// connectedAgain waits until every publish that paho resends on this
// connection is acknowledged, then lets new publishes through.
func (b *bridge) connectedAgain() {
	b.mu.Lock()
	gen := b.gen
	b.mu.Unlock()
	go func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		for b.gen == gen && b.store.inflight() > 0 {
			b.cond.Wait()
		}
		if b.gen == gen {
			b.ready = true
			b.cond.Broadcast()
		}
	}()
}

func (b *bridge) donePublishing() {
	b.mu.Lock()
	b.publishing--
	b.cond.Broadcast()
	b.mu.Unlock()
}

// waitReady blocks until new publishes may go out, or ctx ends, and then
// counts the caller as publishing (donePublishing ends that).
func (b *bridge) waitReady(ctx context.Context) error {
	b.mu.Lock()
	if b.ready { // the common case: no wake-up on ctx to arrange
		b.publishing++
		b.mu.Unlock()
		return nil
	}
	b.mu.Unlock()
	stop := context.AfterFunc(ctx, func() {
		b.mu.Lock()
		b.cond.Broadcast()
		b.mu.Unlock()
	})
	defer stop()
	b.mu.Lock()
	defer b.mu.Unlock()
	for !b.ready {
		if err := ctx.Err(); err != nil {
			return err
		}
		b.cond.Wait()
	}
	b.publishing++
	return nil
}

func (b *bridge) connect() {
	b.client.Connect() // ConnectRetry: returns at once and keeps trying
}

func (b *bridge) connected() bool { return b.client.IsConnectionOpen() }

func (b *bridge) disconnect(quiesce time.Duration) {
	b.client.Disconnect(uint(quiesce / time.Millisecond))
}

// publishQueued hands one queued record to paho, waiting for a free
// in-flight slot first. It returns once paho has stored the message (and will
// send or resend it until upstream acknowledges it), or when ctx ends.
//
// reseal runs just before the message is handed to paho (after any wait for
// the connection): a message that waited past its epoch's send grace is
// re-sealed then. Once handed over, it is resent byte for byte.
func (b *bridge) publishQueued(ctx context.Context, id uint64, topic string, qos byte, retain bool, payload []byte, reseal func([]byte) []byte) error {
	select {
	case b.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	backoff := 10 * time.Millisecond
	for {
		if err := b.waitReady(ctx); err != nil {
			<-b.slots
			return err
		}
		b.store.expect(id)
		tok := b.client.Publish(topic, qos, retain, reseal(payload))
		b.donePublishing()
		if b.store.taken() {
			return nil
		}
		// paho refused before storing it (not connected yet, no packet id
		// free): try again shortly, keeping the order.
		err := tok.Error()
		b.log.Debug("upstream publish not accepted yet", "topic", topic, "error", err)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			<-b.slots
			return ctx.Err()
		}
		if backoff < 500*time.Millisecond {
			backoff *= 2
		}
	}
}

// publishNow sends a QoS 0 message if upstream is connected and reports
// whether it was handed to the connection.
func (b *bridge) publishNow(topic string, retain bool, payload []byte) bool {
	b.mu.Lock()
	if !b.ready || !b.client.IsConnectionOpen() {
		b.mu.Unlock()
		return false
	}
	b.publishing++
	b.mu.Unlock()
	tok := b.client.Publish(topic, 0, retain, payload)
	b.donePublishing()
	select {
	case <-tok.Done():
		return tok.Error() == nil
	default:
		return true
	}
}

// subscribe subscribes filter upstream and waits for the SUBACK. While
// upstream is down it does nothing: every mirrored filter is subscribed
// again on connect.
func (b *bridge) subscribe(filter string, qos byte) error {
	if !b.client.IsConnectionOpen() {
		return nil
	}
	tok := b.client.Subscribe(filter, qos, nil)
	if !tok.WaitTimeout(10 * time.Second) {
		return fmt.Errorf("subscribe %q upstream: timed out", filter)
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("subscribe %q upstream: %w", filter, err)
	}
	if st, ok := tok.(*paho.SubscribeToken); ok {
		if code, ok := st.Result()[filter]; ok && code == 0x80 {
			return fmt.Errorf("subscribe %q upstream: refused by the broker", filter)
		}
	}
	return nil
}

func (b *bridge) unsubscribe(filter string) error {
	if !b.client.IsConnectionOpen() {
		return nil
	}
	tok := b.client.Unsubscribe(filter)
	if !tok.WaitTimeout(10 * time.Second) {
		return fmt.Errorf("unsubscribe %q upstream: timed out", filter)
	}
	return tok.Error()
}

// ackStore is paho's store for the upstream session: it keeps in-flight
// packets in the order they were first stored (paho's own ordered store
// sorts by timestamp, and ties reorder), and maps each stored outbound
// publish's packet id to the outbound queue record it carries. paho deletes
// the stored publish exactly when upstream acknowledged it (PUBACK for QoS 1,
// PUBCOMP for QoS 2): that is when the queue may forget the record.
type ackStore struct {
	onAck func(recordID uint64)

	mu      sync.Mutex
	packets map[string]storedPacket
	next    uint64
	byMID   map[uint16]uint64
	pending uint64 // record being handed to paho by publishQueued
	took    bool
}

type storedPacket struct {
	order uint64
	p     packets.ControlPacket
}

func newAckStore() *ackStore {
	return &ackStore{packets: make(map[string]storedPacket), byMID: make(map[uint16]uint64)}
}

func (s *ackStore) expect(id uint64) {
	s.mu.Lock()
	s.pending, s.took = id, false
	s.mu.Unlock()
}

func (s *ackStore) taken() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.took
	s.pending, s.took = 0, false
	return t
}

func (s *ackStore) inflight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byMID)
}

func (s *ackStore) Open()  {}
func (s *ackStore) Close() {}

// Reset is only called for clean sessions, which the bridge never asks
// for; the record mapping is kept so nothing is acknowledged that upstream
// did not hold.
func (s *ackStore) Reset() {
	s.mu.Lock()
	clear(s.packets)
	s.mu.Unlock()
}

func (s *ackStore) All() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]string, 0, len(s.packets))
	for k := range s.packets {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return s.packets[keys[i]].order < s.packets[keys[j]].order })
	return keys
}

func (s *ackStore) Get(key string) packets.ControlPacket {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sp, ok := s.packets[key]; ok {
		if p, ok := sp.p.(*packets.PublishPacket); ok {
			// paho's resume sets Dup on what Get returns while its writer
			// may still be sending the same PUBLISH (put into the store just
			// before): hand out a copy so the two never share a header.
			c := *p
			return &c
		}
		return sp.p
	}
	return nil
}

func (s *ackStore) Put(key string, m packets.ControlPacket) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ok := m.(*packets.PublishPacket); ok && p.Qos > 0 && strings.HasPrefix(key, "o.") && s.pending != 0 && !s.took {
		s.byMID[p.MessageID] = s.pending
		s.took = true
	}
	if sp, ok := s.packets[key]; ok {
		s.packets[key] = storedPacket{order: sp.order, p: m} // a PUBREL replacing its PUBLISH keeps its place
		return
	}
	s.next++
	s.packets[key] = storedPacket{order: s.next, p: m}
}

func (s *ackStore) Del(key string) {
	s.mu.Lock()
	delete(s.packets, key)
	var rid uint64
	var ok bool
	if strings.HasPrefix(key, "o.") {
		if mid, err := strconv.ParseUint(key[2:], 10, 16); err == nil {
			rid, ok = s.byMID[uint16(mid)]
			delete(s.byMID, uint16(mid))
		}
	}
	s.mu.Unlock()
	if ok {
		s.onAck(rid)
	}
}
