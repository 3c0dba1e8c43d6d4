package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"golang.org/x/net/proxy"

	"github.com/smqtt/smqtt/internal/mqttconn"
)

// UpstreamOptions say how to reach the untrusted upstream broker.
type UpstreamOptions = mqttconn.Options

// maxInflight bounds the QoS 1/2 messages sent upstream and not yet
// acknowledged. Receivers' replay windows (envelope.WindowSize) are at least
// twice this, so resends and reordering within it are never mistaken for
// replays that fell out of the window.
const maxInflight = 1024

// writeTimeout bounds one socket write upstream: a connection that takes no
// byte for this long is cut (and its publishes resent on the next one).
const writeTimeout = 5 * time.Second

// connectRetryInterval is the wait after a failed connection attempt; it
// doubles after each failure up to UpstreamOptions.Backoff().
const connectRetryInterval = 250 * time.Millisecond

// subscribeTimeout bounds the wait for a SUBACK or UNSUBACK.
const subscribeTimeout = 10 * time.Second

// bridge is the sidecar's MQTT 3.1.1 client on the upstream broker: one
// connection with a persistent session (clean session 0), so upstream keeps
// what it queued for the sidecar across cuts. It is written for the relay's
// guarantees, with no goroutine between the socket and its callers:
//
//   - A QoS 1/2 publish is kept, encoded, from the moment publishQueued
//     writes it until upstream acknowledges it (PUBACK; PUBCOMP for QoS 2);
//     onAck then releases its queue record. After a reconnect every kept
//     publish (or its PUBREL) is written again, in the order the publishes
//     were first written, before any new publish: byte for byte the first
//     packet but for the DUP flag.
//   - At most maxInflight publishes are unacknowledged (publishQueued waits
//     for room).
//   - Upstream's publishes reach onMessage in the order they arrive, from
//     the connection's reader; each one's PUBACK (PUBREC for QoS 2) is
//     written only when the inbound worker calls Ack, once the message's
//     replay state is stored. An Ack for a connection that is gone is
//     dropped: upstream delivers the message again.
type bridge struct {
	opts      UpstreamOptions
	url       *url.URL
	urlErr    error
	log       *slog.Logger
	onAck     func(recordID uint64)
	onConnect func()
	onLost    func(error)
	onMessage func(paho.Message)
	slots     chan struct{} // in-flight window

	// sendMu orders the writes of QoS 1/2 publishes: a connection's
	// resends, then new publishes.
	sendMu sync.Mutex

	mu       sync.Mutex
	cond     *sync.Cond    // conn or closing changed
	conn     *session      // nil while disconnected, and while resending
	inflight []*outPublish // unacknowledged, in the order first written
	byID     map[uint16]*outPublish
	waiting  map[uint16]chan byte // SUBACK/UNSUBACK return code by packet id
	lastID   uint16
	started  bool
	closing  bool
	stop     chan struct{}
	done     chan struct{}
}

// outPublish is one unacknowledged QoS 1/2 publish.
type outPublish struct {
	id     uint16
	record uint64 // the outbound queue record it carries
	qos    byte
	rel    bool // QoS 2: PUBREC received, PUBREL is what to resend
	dup    bool // written once: the DUP flag is set from now on
	retain bool
	topic  string
	// payload is the queue record's (which stays unmodified until its Ack)
	// or its re-sealed replacement: the PUBLISH is encoded again, the same
	// bytes but for DUP, for every write.
	payload []byte
}

// write encodes p's PUBLISH, or its PUBREL once upstream sent PUBREC, and
// writes it to s.
func (p *outPublish) write(s *session) error {
	if p.rel {
		return s.write(ackPacket(0x62, p.id))
	}
	buf := publishPool.Get().(*[]byte)
	*buf = appendPublish((*buf)[:0], p.topic, p.qos, p.retain, p.id, p.payload)
	if p.dup {
		(*buf)[0] |= 0x08
	}
	err := s.write(*buf)
	if cap(*buf) <= 64<<10 {
		publishPool.Put(buf)
	}
	return err
}

func newBridge(opts UpstreamOptions, log *slog.Logger, onAck func(recordID uint64), onConnect func(), onLost func(error), onMessage func(paho.Message)) *bridge {
	b := &bridge{
		opts: opts, log: log,
		onAck: onAck, onConnect: onConnect, onLost: onLost, onMessage: onMessage,
		slots:   make(chan struct{}, maxInflight),
		byID:    make(map[uint16]*outPublish),
		waiting: make(map[uint16]chan byte),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	b.cond = sync.NewCond(&b.mu)
	b.url, b.urlErr = url.Parse(opts.URL)
	return b
}

// connect starts connecting in the background; the bridge keeps
// reconnecting until disconnect.
func (b *bridge) connect() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.started && !b.closing {
		b.started = true
		go b.run()
	}
}

func (b *bridge) connected() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conn != nil
}

// disconnect sends DISCONNECT, closes the connection (handing what is
// written to the socket, bounded), and stops reconnecting. Unacknowledged
// publishes stay in the outbound queue for the next start.
func (b *bridge) disconnect(quiesce time.Duration) {
	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		return
	}
	b.closing = true
	started, s := b.started, b.conn
	b.conn = nil
	b.cond.Broadcast()
	b.mu.Unlock()
	close(b.stop)
	if s != nil {
		_ = s.write(packetDisconnect)
		s.conn.Close()
	}
	if started {
		select {
		case <-b.done:
		case <-time.After(quiesce + closeFlushWait):
		}
	}
}

// run connects, serves the connection until it fails, and reconnects.
func (b *bridge) run() {
	defer close(b.done)
	wait := connectRetryInterval
	for {
		s, err := b.dial()
		if err != nil {
			b.log.Debug("upstream connection attempt failed", "url", b.redactedURL(), "error", err)
			select {
			case <-time.After(wait):
			case <-b.stop:
				return
			}
			wait = min(2*wait, b.opts.Backoff())
			continue
		}
		wait = connectRetryInterval
		if !b.resume(s) {
			s.conn.Close()
			return
		}
		b.onConnect()
		go b.keepalive(s)
		err = b.serve(s)
		b.lost(s)
		select {
		case <-b.stop:
			return
		default:
		}
		b.onLost(err)
	}
}

func (b *bridge) redactedURL() string {
	if b.url == nil {
		return ""
	}
	return b.url.Redacted()
}

// dial opens a connection and completes the CONNECT handshake.
func (b *bridge) dial() (*session, error) {
	if b.urlErr != nil {
		return nil, fmt.Errorf("upstream URL %q: %w", b.opts.URL, b.urlErr)
	}
	po := b.opts.Paho(b.opts.ClientID) // the defaults the key client uses too
	conn, err := dialBridge(b.url, po, upstreamReadBuffer)
	if err != nil {
		return nil, err
	}
	_ = conn.SetReadDeadline(time.Now().Add(po.ConnectTimeout))
	if _, err := conn.Write(connectPacket(b.opts.ClientID, b.opts.Username, b.opts.Password, po.KeepAlive)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("upstream %s: sending CONNECT: %w", b.redactedURL(), err)
	}
	var scratch []byte
	hdr, body, err := readPacket(conn, &scratch, false)
	if err == nil && (hdr != 0x20 || len(body) != 2) {
		err = fmt.Errorf("%w: expected CONNACK, got packet type %#x of %d bytes", errProtocol, hdr, len(body))
	}
	if err == nil && body[1] != 0 {
		err = fmt.Errorf("connection refused: %s", connackReason(body[1]))
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("upstream %s: %w", b.redactedURL(), err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	s := &session{conn: conn, done: make(chan struct{}), keepAlive: time.Duration(po.KeepAlive) * time.Second, pingTimeout: po.PingTimeout, topics: make(topicCache)}
	s.lastSent.Store(time.Now().UnixNano())
	return s, nil
}

// dialBridge dials u as paho would, through a proxy named by the
// environment if there is one, and batches the connection.
func dialBridge(u *url.URL, po *paho.ClientOptions, readBuffer int) (net.Conn, error) {
	if !proxyFromEnvironment() {
		return dialUpstream(u, *po, readBuffer)
	}
	d := proxy.FromEnvironmentUsing(&net.Dialer{Timeout: 30 * time.Second})
	switch u.Scheme {
	case "mqtt", "tcp", "ssl", "tls", "mqtts", "mqtt+ssl", "tcps":
	default:
		return nil, fmt.Errorf("upstream %s: scheme %q cannot go through a proxy", u.Redacted(), u.Scheme)
	}
	conn, err := d.Dial("tcp", u.Host)
	if err != nil {
		return nil, err
	}
	if u.Scheme != "mqtt" && u.Scheme != "tcp" {
		cfg := &tls.Config{}
		if po.TLSConfig != nil {
			cfg = po.TLSConfig.Clone()
		}
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		tc := tls.Client(conn, cfg)
		if err := tc.Handshake(); err != nil {
			conn.Close()
			return nil, err
		}
		conn = tc
	}
	return newBatchedConn(conn, readBuffer, writeTimeout), nil
}

// resume writes every unacknowledged publish again, in order, on a new
// connection and then makes it the bridge's. It reports false when the
// bridge is closing.
func (b *bridge) resume(s *session) bool {
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.mu.Lock()
	if b.closing {
		b.mu.Unlock()
		return false
	}
	resend := slices.Clone(b.inflight)
	for _, p := range resend {
		p.dup = true
	}
	b.mu.Unlock()
	for _, p := range resend {
		b.mu.Lock() // a late PUBREC of the old connection may still land
		q := *p
		b.mu.Unlock()
		if q.write(s) != nil {
			break // the reader finds the connection broken
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing {
		return false
	}
	b.conn = s
	b.cond.Broadcast()
	return true
}

// lost retires a connection that failed.
func (b *bridge) lost(s *session) {
	b.mu.Lock()
	if b.conn == s {
		b.conn = nil
	}
	for id, ch := range b.waiting {
		close(ch)
		delete(b.waiting, id)
	}
	b.cond.Broadcast()
	b.mu.Unlock()
	s.conn.Close()
	close(s.done)
}

// serve reads the connection's packets until it fails.
func (b *bridge) serve(s *session) error {
	var scratch []byte
	for {
		hdr, body, err := readPacket(s.conn, &scratch, true)
		if err != nil {
			return err
		}
		s.pingSent.Store(0) // anything upstream sends shows it alive
		if hdr>>4 == 3 {
			m, err := parsePublish(hdr, body, s)
			if err != nil {
				return err
			}
			if m.qos == 0 {
				m.s = nil // nothing to acknowledge
			}
			b.onMessage(m)
			continue
		}
		if len(body) < 2 && hdr != 0xd0 {
			return fmt.Errorf("%w: packet type %#x of %d bytes", errProtocol, hdr, len(body))
		}
		switch hdr {
		case 0x40: // PUBACK
			b.acked(packetID(body), 1)
		case 0x50: // PUBREC
			b.received(packetID(body))
			if err := s.write(ackPacket(0x62, packetID(body))); err != nil {
				return err
			}
		case 0x62: // PUBREL of an inbound QoS 2 message
			if err := s.write(ackPacket(0x70, packetID(body))); err != nil {
				return err
			}
		case 0x70: // PUBCOMP
			b.acked(packetID(body), 2)
		case 0x90: // SUBACK
			rc := byte(0x80)
			if len(body) > 2 {
				rc = body[2]
			}
			b.answer(packetID(body), rc)
		case 0xb0: // UNSUBACK
			b.answer(packetID(body), 0)
		case 0xd0: // PINGRESP
		default:
			return fmt.Errorf("%w: unexpected packet type %#x", errProtocol, hdr)
		}
	}
}

// acked releases the publish that upstream acknowledged.
func (b *bridge) acked(id uint16, qos byte) {
	b.mu.Lock()
	p := b.byID[id]
	if p == nil || p.qos != qos || qos == 2 && !p.rel {
		b.mu.Unlock()
		return
	}
	delete(b.byID, id)
	if len(b.inflight) > 0 && b.inflight[0] == p { // acks mostly come in order
		b.inflight[0] = nil
		b.inflight = b.inflight[1:]
	} else if i := slices.Index(b.inflight, p); i >= 0 {
		b.inflight = slices.Delete(b.inflight, i, i+1)
	}
	b.mu.Unlock()
	<-b.slots
	b.onAck(p.record)
}

// received records a PUBREC: from now on the publish is resent as a PUBREL.
func (b *bridge) received(id uint16) {
	b.mu.Lock()
	if p := b.byID[id]; p != nil && p.qos == 2 {
		p.rel = true
		p.topic, p.payload = "", nil
	}
	b.mu.Unlock()
}

func (b *bridge) answer(id uint16, rc byte) {
	b.mu.Lock()
	ch := b.waiting[id]
	delete(b.waiting, id)
	b.mu.Unlock()
	if ch != nil {
		ch <- rc
	}
}

// nextIDLocked returns a packet id in use by nothing.
func (b *bridge) nextIDLocked() uint16 {
	for {
		b.lastID++
		if b.lastID == 0 {
			continue
		}
		if _, used := b.byID[b.lastID]; used {
			continue
		}
		if _, used := b.waiting[b.lastID]; used {
			continue
		}
		return b.lastID
	}
}

// keepalive sends a PINGREQ when nothing was written for the keep-alive
// interval, and cuts a connection whose broker answers nothing within the
// ping timeout.
func (b *bridge) keepalive(s *session) {
	if s.keepAlive <= 0 {
		return
	}
	t := time.NewTicker(max(s.keepAlive/8, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case now := <-t.C:
			n := now.UnixNano()
			if sent := s.pingSent.Load(); sent != 0 {
				if time.Duration(n-sent) > s.pingTimeout {
					b.log.Warn("upstream did not answer a ping; reconnecting", "url", b.redactedURL(), "timeout", s.pingTimeout)
					s.conn.Close()
					return
				}
				continue
			}
			if time.Duration(n-s.lastSent.Load()) >= s.keepAlive {
				s.pingSent.Store(n)
				_ = s.write(packetPingreq)
			}
		}
	}
}

// lockSend waits until a connection is up and every resend on it is
// written, and returns it with sendMu held.
func (b *bridge) lockSend(ctx context.Context) (*session, error) {
	b.sendMu.Lock()
	b.mu.Lock()
	s := b.conn
	b.mu.Unlock()
	if s != nil { // the common case: connected, no wait to arrange
		return s, nil
	}
	b.sendMu.Unlock()
	stop := context.AfterFunc(ctx, func() {
		b.mu.Lock()
		b.cond.Broadcast()
		b.mu.Unlock()
	})
	defer stop()
	for {
		b.mu.Lock()
		for b.conn == nil && !b.closing && ctx.Err() == nil {
			b.cond.Wait()
		}
		s := b.conn
		b.mu.Unlock()
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if s == nil {
			return nil, errConnClosed
		}
		b.sendMu.Lock()
		b.mu.Lock()
		same := b.conn == s
		b.mu.Unlock()
		if same {
			return s, nil
		}
		b.sendMu.Unlock() // lost or replaced meanwhile: wait again
	}
}

// publishQueued hands one queued record upstream, waiting for a free
// in-flight slot and for a connection first. It returns once the publish is
// written and kept for resending until upstream acknowledges it, or when
// ctx ends.
//
// reseal runs just before the message is first written (after any wait for
// the connection): a message that waited past its epoch's send grace is
// re-sealed then. From then on it is resent byte for byte.
func (b *bridge) publishQueued(ctx context.Context, id uint64, topic string, qos byte, retain bool, payload []byte, reseal func([]byte) []byte) error {
	select {
	case b.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	s, err := b.lockSend(ctx)
	if err != nil {
		<-b.slots
		return err
	}
	defer b.sendMu.Unlock()
	if qos == 0 { // not a queue's record, but keep the contract
		qos = 1
	}
	p := &outPublish{record: id, qos: qos, retain: retain, topic: topic, payload: reseal(payload)}
	b.mu.Lock()
	p.id = b.nextIDLocked()
	b.byID[p.id] = p
	b.inflight = append(b.inflight, p)
	q := *p // a PUBREC may change p once it is written
	b.mu.Unlock()
	// A failed write leaves the publish kept: it goes out again on the
	// next connection.
	_ = q.write(s)
	return nil
}

// publishPool recycles the buffers QoS 0 publishes are encoded in: the
// connection copies what it is given.
var publishPool = sync.Pool{New: func() any { return new([]byte) }}

// publishNow sends a QoS 0 message if upstream is connected and reports
// whether it was handed to the connection. While a new connection's
// resends are written it is not connected yet.
func (b *bridge) publishNow(topic string, retain bool, payload []byte) bool {
	b.mu.Lock()
	s := b.conn
	b.mu.Unlock()
	if s == nil {
		return false
	}
	buf := publishPool.Get().(*[]byte)
	*buf = appendPublish((*buf)[:0], topic, 0, retain, 0, payload)
	err := s.write(*buf)
	if cap(*buf) <= 64<<10 {
		publishPool.Put(buf)
	}
	return err == nil
}

// subscribe subscribes filter upstream and waits for the SUBACK. While
// upstream is down it does nothing: every mirrored filter is subscribed
// again on connect.
func (b *bridge) subscribe(filter string, qos byte) error {
	rc, err := b.request(subscribePacket, filter, qos)
	switch {
	case err != nil:
		return fmt.Errorf("subscribe %q upstream: %w", filter, err)
	case rc == 0x80:
		return fmt.Errorf("subscribe %q upstream: refused by the broker", filter)
	}
	return nil
}

func (b *bridge) unsubscribe(filter string) error {
	if _, err := b.request(unsubscribePacket, filter, 0); err != nil {
		return fmt.Errorf("unsubscribe %q upstream: %w", filter, err)
	}
	return nil
}

// request writes a SUBSCRIBE or UNSUBSCRIBE and waits for its answer.
func (b *bridge) request(encode func(id uint16, filter string, qos byte) []byte, filter string, qos byte) (byte, error) {
	b.mu.Lock()
	s := b.conn
	if s == nil {
		b.mu.Unlock()
		return 0, nil
	}
	id := b.nextIDLocked()
	ch := make(chan byte, 1)
	b.waiting[id] = ch
	b.mu.Unlock()
	forget := func() {
		b.mu.Lock()
		if b.waiting[id] == ch {
			delete(b.waiting, id)
		}
		b.mu.Unlock()
	}
	if err := s.write(encode(id, filter, qos)); err != nil {
		forget()
		return 0, err
	}
	t := time.NewTimer(subscribeTimeout)
	defer t.Stop()
	select {
	case rc, ok := <-ch:
		if !ok {
			return 0, errors.New("connection lost before the broker answered")
		}
		return rc, nil
	case <-t.C:
		forget()
		return 0, errors.New("timed out")
	}
}

// session is one upstream connection.
type session struct {
	conn        net.Conn
	done        chan struct{} // closed once the connection is retired
	keepAlive   time.Duration
	pingTimeout time.Duration
	lastSent    atomic.Int64 // UnixNano of the last write
	pingSent    atomic.Int64 // UnixNano of an unanswered PINGREQ, or 0
	topics      topicCache   // the reader's
}

// write hands one whole packet to the connection (which copies it).
func (s *session) write(pkt []byte) error {
	_, err := s.conn.Write(pkt)
	s.lastSent.Store(time.Now().UnixNano())
	return err
}

// upstreamMessage is a PUBLISH from upstream. It implements paho.Message.
type upstreamMessage struct {
	topic   string
	payload []byte
	qos     byte
	retain  bool
	dup     bool
	id      uint16
	s       *session // where its acknowledgement goes; nil once sent
	ackOnce atomic.Bool
}

func (m *upstreamMessage) Duplicate() bool   { return m.dup }
func (m *upstreamMessage) Qos() byte         { return m.qos }
func (m *upstreamMessage) Retained() bool    { return m.retain }
func (m *upstreamMessage) Topic() string     { return m.topic }
func (m *upstreamMessage) MessageID() uint16 { return m.id }
func (m *upstreamMessage) Payload() []byte   { return m.payload }

// Ack writes the message's PUBACK (QoS 1) or PUBREC (QoS 2) to the
// connection it came on, once.
func (m *upstreamMessage) Ack() {
	if m.s == nil || m.ackOnce.Swap(true) {
		return
	}
	typ := byte(0x40)
	if m.qos == 2 {
		typ = 0x50
	}
	select {
	case <-m.s.done: // upstream delivers it again on the next connection
	default:
		_ = m.s.write(ackPacket(typ, m.id))
	}
}
