// Package mqttc is a small, exact MQTT 3.1.1 and MQTT 5 client for tests.
//
// It exists so that a test can run the same client against a broker
// directly and through the smqtt sidecar and compare what it observes:
// deliveries and their order, v5 properties byte for byte, reason codes,
// session-present flags, subscription identifiers, DUP and retain flags. It
// therefore hides nothing: every call takes and returns the packets of
// github.com/mochi-mqtt/server/v2/packets, encoded and decoded by mochi's
// codec, and received PUBLISHes are handed over exactly as they arrived
// (only a v5 topic alias is resolved into TopicName).
//
// Acknowledgements are automatic (PUBACK; PUBREC, then PUBCOMP on PUBREL)
// unless Options.ManualAcks is set, and QoS 2 reception is exactly-once
// (MQTT 5 section 4.3.3, method B), across a reconnect too when the
// Session of the previous connection is passed on. Options.KeepLog keeps
// every packet received, decoded (Log) and as bytes (RawLog); PublishAcks
// returns the whole PUBACK or PUBREC/PUBCOMP flow of a PUBLISH.
//
// It does no reconnecting, no flow control (a server's Receive Maximum and
// Maximum Packet Size are not enforced, so a test can exceed them on
// purpose), no retransmission of its own PUBLISHes and no enhanced
// authentication.
//
// A Client has one reader goroutine and, when a keep alive is in force, one
// pinger goroutine; both end when the connection ends, before Done is
// closed. Writes are serialised. Received PUBLISHes go to an unbounded
// queue, read with Next, so the reader never stalls the connection.
package mqttc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// ErrClosed is Err after Close; ErrDisconnected is Err after Disconnect.
var (
	ErrClosed       = errors.New("mqttc: connection closed by the client")
	ErrDisconnected = errors.New("mqttc: client sent DISCONNECT")
)

// Options configure a connection.
type Options struct {
	// Version is the protocol level: 4 = MQTT 3.1.1 (the default when 0),
	// 5 = MQTT 5, 3 = MQTT 3.1 ("MQIsdp"). Any other value is sent as is
	// with the protocol name "MQTT" (to provoke a refusal); the CONNACK is
	// then decoded as 3.1.1.
	Version byte
	// ProtocolName overrides the protocol name of the CONNECT.
	ProtocolName string
	ClientID     string
	// Clean is Clean Session (3.1.1) / Clean Start (5).
	Clean bool
	// Username and Password are sent when their flag is set or they are
	// not empty.
	Username, Password         string
	UsernameFlag, PasswordFlag bool
	// Keepalive in seconds; 0 means 30 unless DisableKeepalive is set (then
	// 0 is sent and no PINGREQ either).
	Keepalive        uint16
	DisableKeepalive bool
	// Properties are the CONNECT properties (v5 only).
	Properties packets.Properties
	// Will, when set, is the Will Message of the CONNECT.
	Will *Will
	// ManualAcks: received QoS 1 and 2 PUBLISHes are acknowledged only when
	// Ack is called (the PUBCOMP answering a PUBREL is still automatic).
	ManualAcks bool
	// DialTimeout bounds the dial and the wait for the CONNACK; default 5s.
	DialTimeout time.Duration
	// AckTimeout bounds the wait for each acknowledgement (PUBACK, PUBREC,
	// PUBCOMP, SUBACK, UNSUBACK) and each write; default 10s.
	AckTimeout time.Duration
	// KeepLog records every packet received (CONNACK included), in arrival
	// order, decoded for Log and as received for RawLog.
	KeepLog bool
	// Session resumes the client side of a session (see Client.Session):
	// when the CONNACK says the session is present, the QoS 2 messages it
	// lists are known to have been received, so the server's retransmission
	// is acknowledged but not delivered again. Otherwise it is discarded.
	Session *Session
}

// Session is the client side of a session that outlives a connection: the
// packet ids of the QoS 2 messages received and acknowledged with PUBREC
// whose PUBREL has not arrived. (Outgoing messages in flight are not
// resumed: a test republishes them itself, with Dup and PacketID set.)
type Session struct {
	AwaitingPubrel []uint16
}

// Will is a Will Message.
type Will struct {
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
	// Properties are the Will properties (v5): will delay, message expiry,
	// content type, payload format, response topic, correlation data, user
	// properties.
	Properties packets.Properties
}

// Acks is the acknowledgement flow of one PUBLISH.
type Acks struct {
	Puback  packets.Packet // QoS 1
	Pubrec  packets.Packet // QoS 2
	Pubcomp packets.Packet // QoS 2, unless the PUBREC's reason code is >= 0x80
	// Err is set (on the PublishAsync channel only) when the flow did not
	// complete: timeout or connection lost.
	Err error
}

// Final is the last acknowledgement of the flow: PUBACK, PUBCOMP, or a
// refusing PUBREC.
func (a Acks) Final() packets.Packet {
	switch {
	case a.Pubcomp.FixedHeader.Type == packets.Pubcomp:
		return a.Pubcomp
	case a.Pubrec.FixedHeader.Type == packets.Pubrec:
		return a.Pubrec
	}
	return a.Puback
}

// Client is one MQTT connection.
type Client struct {
	opts    Options
	version byte // protocol level used for encoding and decoding
	conn    net.Conn
	br      *bufio.Reader
	connack packets.Packet
	ka      time.Duration // effective keep alive; 0 = none

	wmu       sync.Mutex // serialises writes
	lastWrite atomic.Int64
	pingSent  atomic.Int64 // unix nanos of an unanswered PINGREQ, 0 if none
	closing   atomic.Pointer[error]

	mu       sync.Mutex
	nextID   uint16
	inflight map[uint16]*flight // outgoing PUBLISH/SUBSCRIBE/UNSUBSCRIBE by packet id
	inbound  map[uint16]bool    // QoS 2 ids awaiting PUBREL; value: PUBREC sent
	aliases  map[uint16]string  // server-to-client topic aliases
	queue    []packets.Packet
	log      []packets.Packet
	raw      [][]byte
	srvDisc  *packets.Packet
	err      error

	notify    chan struct{} // one-slot wake-up for Next
	dead      chan struct{} // closed when the connection is closed
	done      chan struct{} // closed when the goroutines have ended too
	pingDone  chan struct{}
	closeOnce sync.Once
}

type flight struct {
	id   uint16
	kind byte // packets.Publish, Subscribe or Unsubscribe
	qos  byte
	acks Acks
	ack  packets.Packet // SUBACK / UNSUBACK
	done chan struct{}  // closed by the reader once acks/ack are final
}

// Connect dials addr ("host:port" or "tcp://host:port"), sends CONNECT and
// reads CONNACK. A refused connection (CONNACK reason >= 0x80 in v5, return
// code != 0 otherwise) returns a nil *Client, the CONNACK and a nil error;
// only network and protocol failures are errors.
func Connect(addr string, o Options) (*Client, packets.Packet, error) {
	if o.Version == 0 {
		o.Version = 4
	}
	if o.Keepalive == 0 && !o.DisableKeepalive {
		o.Keepalive = 30
	}
	if o.DisableKeepalive {
		o.Keepalive = 0
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 5 * time.Second
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = 10 * time.Second
	}
	for _, scheme := range []string{"tcp://", "mqtt://"} {
		addr = strings.TrimPrefix(addr, scheme)
	}
	version := byte(4)
	if o.Version == 5 {
		version = 5
	}

	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: o.Version,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			ClientIdentifier: o.ClientID,
			Clean:            o.Clean,
			Keepalive:        o.Keepalive,
			UsernameFlag:     o.UsernameFlag || o.Username != "",
			PasswordFlag:     o.PasswordFlag || o.Password != "",
			Username:         []byte(o.Username),
			Password:         []byte(o.Password),
		},
	}
	if o.Version == 3 {
		pk.Connect.ProtocolName = []byte("MQIsdp")
	}
	if o.ProtocolName != "" {
		pk.Connect.ProtocolName = []byte(o.ProtocolName)
	}
	if o.Version == 5 {
		pk.Properties = o.Properties
	}
	if w := o.Will; w != nil {
		pk.Connect.WillFlag = true
		pk.Connect.WillTopic = w.Topic
		pk.Connect.WillPayload = w.Payload
		pk.Connect.WillQos = w.QoS
		pk.Connect.WillRetain = w.Retain
		if o.Version == 5 {
			pk.Connect.WillProperties = w.Properties
		}
	}
	raw, err := encode(pk, o.Version)
	if err != nil {
		return nil, packets.Packet{}, fmt.Errorf("mqttc: encode CONNECT: %w", err)
	}

	deadline := time.Now().Add(o.DialTimeout)
	conn, err := net.DialTimeout("tcp", addr, o.DialTimeout)
	if err != nil {
		return nil, packets.Packet{}, fmt.Errorf("mqttc: dial %s: %w", addr, err)
	}
	_ = conn.SetDeadline(deadline)
	if _, err := conn.Write(raw); err != nil {
		conn.Close()
		return nil, packets.Packet{}, fmt.Errorf("mqttc: send CONNECT to %s: %w", addr, err)
	}
	br := bufio.NewReader(conn)
	ack, ackRaw, err := readPacket(br, version)
	if err != nil {
		conn.Close()
		return nil, packets.Packet{}, fmt.Errorf("mqttc: read CONNACK from %s: %w", addr, err)
	}
	if ack.FixedHeader.Type != packets.Connack {
		conn.Close()
		return nil, ack, fmt.Errorf("mqttc: expected CONNACK from %s, got %s", addr, packets.PacketNames[ack.FixedHeader.Type])
	}
	if (version == 5 && ack.ReasonCode >= 0x80) || (version != 5 && ack.ReasonCode != 0) {
		conn.Close()
		return nil, ack, nil
	}
	_ = conn.SetDeadline(time.Time{})

	c := &Client{
		opts:     o,
		version:  o.Version,
		conn:     conn,
		br:       br,
		connack:  ack,
		ka:       time.Duration(o.Keepalive) * time.Second,
		inflight: map[uint16]*flight{},
		inbound:  map[uint16]bool{},
		aliases:  map[uint16]string{},
		notify:   make(chan struct{}, 1),
		dead:     make(chan struct{}),
		done:     make(chan struct{}),
		pingDone: make(chan struct{}),
	}
	if version != 5 && o.Version != 3 {
		c.version = 4
	}
	if version == 5 && ack.Properties.ServerKeepAliveFlag {
		c.ka = time.Duration(ack.Properties.ServerKeepAlive) * time.Second
	}
	if o.KeepLog {
		c.log = append(c.log, ack)
		c.raw = append(c.raw, ackRaw)
	}
	if o.Session != nil && ack.SessionPresent {
		for _, id := range o.Session.AwaitingPubrel {
			c.inbound[id] = true
		}
	}
	c.lastWrite.Store(time.Now().UnixNano())
	go c.readLoop()
	if c.ka > 0 {
		go c.pingLoop()
	} else {
		close(c.pingDone)
	}
	return c, ack, nil
}

// Connack is the CONNACK the connection was accepted with.
func (c *Client) Connack() packets.Packet { return c.connack }

// Version is the protocol level in use (3, 4 or 5).
func (c *Client) Version() byte { return c.version }

// Done is closed when the connection has ended and the client's goroutines
// have returned.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err says why the connection ended (nil while it is up).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// ServerDisconnect is the DISCONNECT the server sent (v5), if any.
func (c *Client) ServerDisconnect() (packets.Packet, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.srvDisc == nil {
		return packets.Packet{}, false
	}
	return *c.srvDisc, true
}

// Log is every packet received so far, in arrival order, when
// Options.KeepLog is set.
func (c *Client) Log() []packets.Packet {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]packets.Packet(nil), c.log...)
}

// RawLog is every packet received so far as it came off the wire (fixed
// header included), in the order of Log, when Options.KeepLog is set. The
// byte slices are shared: do not modify them.
func (c *Client) RawLog() [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([][]byte(nil), c.raw...)
}

// Session is the client side of this connection's session, to resume it
// on a new connection with Options.Session.
func (c *Client) Session() *Session {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &Session{}
	for id, recSent := range c.inbound {
		if recSent {
			s.AwaitingPubrel = append(s.AwaitingPubrel, id)
		}
	}
	slices.Sort(s.AwaitingPubrel)
	return s
}

// Queued is the number of received PUBLISHes not yet taken by Next.
func (c *Client) Queued() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.queue)
}

// Next returns the next received PUBLISH, in arrival order, waiting up to
// timeout. It returns false on timeout, or at once when the connection has
// ended and nothing is left in the queue.
func (c *Client) Next(timeout time.Duration) (packets.Packet, bool) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		c.mu.Lock()
		if len(c.queue) > 0 {
			pk := c.queue[0]
			c.queue[0] = packets.Packet{}
			c.queue = c.queue[1:]
			more := len(c.queue) > 0
			c.mu.Unlock()
			if more {
				c.wake()
			}
			return pk, true
		}
		c.mu.Unlock()
		select {
		case <-c.notify:
		case <-c.dead:
			c.mu.Lock()
			n := len(c.queue)
			c.mu.Unlock()
			if n == 0 {
				return packets.Packet{}, false
			}
		case <-t.C:
			return packets.Packet{}, false
		}
	}
}

func (c *Client) wake() {
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

// Publish sends pk as a PUBLISH: TopicName, Payload, FixedHeader.Qos, Retain
// and Dup, PacketID and Properties are sent as given (a topic alias is used
// by setting Properties.TopicAlias, with TopicName "" once the alias is
// known to the server; TopicAliasFlag is set for it). A zero PacketID of a
// QoS 1 or 2 PUBLISH is replaced by a free one.
//
// QoS 0 returns a zero Packet once written. QoS 1 returns the PUBACK. QoS 2
// returns the PUBREC: when its reason code is >= 0x80 the flow ends there;
// otherwise the PUBREL is sent and Publish returns only after the PUBCOMP
// (use PublishAcks to see it). It fails on AckTimeout or when the connection
// ends first.
func (c *Client) Publish(pk packets.Packet) (packets.Packet, error) {
	a, err := c.PublishAcks(pk)
	if err != nil {
		return packets.Packet{}, err
	}
	if pk.FixedHeader.Qos == 2 {
		return a.Pubrec, nil
	}
	return a.Puback, nil
}

// PublishAcks is Publish returning the whole acknowledgement flow.
func (c *Client) PublishAcks(pk packets.Packet) (Acks, error) {
	f, err := c.sendPublish(pk)
	if err != nil || f == nil {
		return Acks{}, err
	}
	return c.awaitPublish(f)
}

// PublishAsync sends pk like Publish and returns at once; the channel yields
// the acknowledgement flow (Acks.Err set on failure) and is then closed. For
// QoS 0 it yields an empty Acks once written.
func (c *Client) PublishAsync(pk packets.Packet) (<-chan Acks, error) {
	f, err := c.sendPublish(pk)
	if err != nil {
		return nil, err
	}
	ch := make(chan Acks, 1)
	if f == nil {
		ch <- Acks{}
		close(ch)
		return ch, nil
	}
	go func() {
		a, err := c.awaitPublish(f)
		a.Err = err
		ch <- a
		close(ch)
	}()
	return ch, nil
}

// Release sends the PUBREL of a QoS 2 PUBLISH whose PUBREC arrived on an
// earlier connection of the session (MQTT's resend after a reconnect) and
// waits for its PUBCOMP.
func (c *Client) Release(id uint16) (packets.Packet, error) {
	f, err := c.register(id, packets.Publish)
	if err != nil {
		return packets.Packet{}, fmt.Errorf("mqttc: release %d: %w", id, err)
	}
	f.qos = 2
	f.acks.Pubrec = packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: id}
	if err := c.writePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: id}); err != nil {
		c.forget(f)
		return packets.Packet{}, err
	}
	if err := c.await(f, "PUBCOMP"); err != nil {
		return packets.Packet{}, err
	}
	return f.acks.Pubcomp, nil
}

func (c *Client) sendPublish(pk packets.Packet) (*flight, error) {
	pk.FixedHeader.Type = packets.Publish
	if pk.Properties.TopicAlias > 0 {
		pk.Properties.TopicAliasFlag = true
	}
	if pk.FixedHeader.Qos > 2 {
		return nil, fmt.Errorf("mqttc: publish to %q: QoS %d", pk.TopicName, pk.FixedHeader.Qos)
	}
	if pk.FixedHeader.Qos == 0 {
		return nil, c.writePacket(pk)
	}
	f, err := c.register(pk.PacketID, packets.Publish)
	if err != nil {
		return nil, fmt.Errorf("mqttc: publish to %q: %w", pk.TopicName, err)
	}
	f.qos = pk.FixedHeader.Qos
	pk.PacketID = f.id
	if err := c.writePacket(pk); err != nil {
		c.forget(f)
		return nil, err
	}
	return f, nil
}

func (c *Client) awaitPublish(f *flight) (Acks, error) {
	want := "PUBACK"
	if f.qos == 2 {
		want = "PUBREC/PUBCOMP"
	}
	err := c.await(f, want)
	c.mu.Lock()
	a := f.acks // on an error, what arrived before it (a PUBREC, say)
	c.mu.Unlock()
	return a, err
}

// await waits for f to complete, for AckTimeout, or for the connection to end.
func (c *Client) await(f *flight, want string) error {
	t := time.NewTimer(c.opts.AckTimeout)
	defer t.Stop()
	select {
	case <-f.done:
		return nil
	case <-t.C:
		c.forget(f)
		return fmt.Errorf("mqttc: no %s for packet id %d within %v", want, f.id, c.opts.AckTimeout)
	case <-c.dead:
		select {
		case <-f.done:
			return nil
		default:
		}
		return fmt.Errorf("mqttc: connection ended before %s for packet id %d: %w", want, f.id, c.Err())
	}
}

// register reserves packet id (a free one when id is 0).
func (c *Client) register(id uint16, kind byte) (*flight, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if id == 0 {
		for range 65535 {
			c.nextID++
			if c.nextID == 0 {
				c.nextID = 1
			}
			if c.inflight[c.nextID] == nil {
				id = c.nextID
				break
			}
		}
		if id == 0 {
			return nil, errors.New("no free packet id")
		}
	} else if c.inflight[id] != nil {
		return nil, fmt.Errorf("packet id %d is in use", id)
	}
	f := &flight{id: id, kind: kind, done: make(chan struct{})}
	c.inflight[id] = f
	return f, nil
}

func (c *Client) forget(f *flight) {
	c.mu.Lock()
	if c.inflight[f.id] == f {
		delete(c.inflight, f.id)
	}
	c.mu.Unlock()
}

// Subscribe sends a SUBSCRIBE with props and subs and returns the SUBACK
// (its ReasonCodes, one per filter). When props carries no subscription
// identifier, the first non-zero subs[i].Identifier is used as it.
func (c *Client) Subscribe(props packets.Properties, subs ...packets.Subscription) (packets.Packet, error) {
	if len(subs) == 0 {
		return packets.Packet{}, errors.New("mqttc: subscribe: no filters")
	}
	if len(props.SubscriptionIdentifier) == 0 {
		for _, s := range subs {
			if s.Identifier > 0 {
				props.SubscriptionIdentifier = []int{s.Identifier}
				break
			}
		}
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		Properties:  props,
		Filters:     subs,
	}
	return c.request(pk, "SUBACK")
}

// Unsubscribe sends an UNSUBSCRIBE and returns the UNSUBACK (v5: one reason
// code per filter; 3.1.1: none).
func (c *Client) Unsubscribe(props packets.Properties, filters ...string) (packets.Packet, error) {
	if len(filters) == 0 {
		return packets.Packet{}, errors.New("mqttc: unsubscribe: no filters")
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Unsubscribe, Qos: 1},
		Properties:  props,
	}
	for _, f := range filters {
		pk.Filters = append(pk.Filters, packets.Subscription{Filter: f})
	}
	return c.request(pk, "UNSUBACK")
}

func (c *Client) request(pk packets.Packet, want string) (packets.Packet, error) {
	f, err := c.register(0, pk.FixedHeader.Type)
	if err != nil {
		return packets.Packet{}, fmt.Errorf("mqttc: %s: %w", packets.PacketNames[pk.FixedHeader.Type], err)
	}
	pk.PacketID = f.id
	if err := c.writePacket(pk); err != nil {
		c.forget(f)
		return packets.Packet{}, err
	}
	if err := c.await(f, want); err != nil {
		return packets.Packet{}, err
	}
	return f.ack, nil
}

// Ack acknowledges a PUBLISH received with ManualAcks: PUBACK for QoS 1,
// PUBREC for QoS 2 (the PUBREL that follows is answered with PUBCOMP
// automatically). Reason code 0, no properties.
func (c *Client) Ack(pk packets.Packet) error {
	return c.AckWith(pk, 0, packets.Properties{})
}

// AckWith is Ack with a v5 reason code and properties. A PUBREC with a
// reason code >= 0x80 ends the QoS 2 flow.
func (c *Client) AckWith(pk packets.Packet, reason byte, props packets.Properties) error {
	if !c.opts.ManualAcks {
		return errors.New("mqttc: Ack without ManualAcks: acknowledgements are automatic")
	}
	ack := packets.Packet{PacketID: pk.PacketID, ReasonCode: reason, Properties: props}
	switch pk.FixedHeader.Qos {
	case 1:
		ack.FixedHeader.Type = packets.Puback
	case 2:
		ack.FixedHeader.Type = packets.Pubrec
		c.mu.Lock()
		if reason >= 0x80 {
			delete(c.inbound, pk.PacketID)
		} else {
			c.inbound[pk.PacketID] = true
		}
		c.mu.Unlock()
	default:
		return fmt.Errorf("mqttc: Ack: a QoS %d PUBLISH has no acknowledgement", pk.FixedHeader.Qos)
	}
	return c.writePacket(ack)
}

// Ping sends a PINGREQ (the PINGRESP is consumed by the reader).
func (c *Client) Ping() error {
	return c.writePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
}

// Disconnect sends DISCONNECT (v5: with reason and props; 3.1.1: plain),
// waits briefly for the server to close its side, and closes. Err is then
// ErrDisconnected.
func (c *Client) Disconnect(reason byte, props packets.Properties) error {
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Disconnect},
		ReasonCode:  reason,
		Properties:  props,
	}
	// The server may close as soon as it reads the DISCONNECT, before the
	// write returns: the end is ours from before the write.
	e := ErrDisconnected
	c.closing.Store(&e)
	err := c.write(pk, false)
	if err != nil {
		c.closing.Store(nil)
		c.shutdown(err)
		<-c.done
		return err
	}
	// Half-close, so that the server reads the DISCONNECT before the end of
	// the stream (a full close with unread input would reset the
	// connection), and let the reader drain until the server closes.
	if tc, ok := c.conn.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	t := time.NewTimer(c.opts.AckTimeout)
	select {
	case <-c.dead:
	case <-t.C:
	}
	t.Stop()
	c.shutdown(ErrDisconnected)
	<-c.done
	return nil
}

// Close closes the connection without DISCONNECT (so the server publishes
// the Will) and waits for the client's goroutines to end.
func (c *Client) Close() {
	c.shutdown(ErrClosed)
	<-c.done
}

// shutdown ends the connection; the first reason wins.
func (c *Client) shutdown(reason error) {
	c.closeOnce.Do(func() {
		if p := c.closing.Load(); p != nil {
			reason = *p
		}
		c.mu.Lock()
		c.err = reason
		c.mu.Unlock()
		c.conn.Close()
		close(c.dead)
	})
}

// writePacket encodes pk for this connection and writes it; a failed write
// ends the connection.
func (c *Client) writePacket(pk packets.Packet) error { return c.write(pk, true) }

func (c *Client) write(pk packets.Packet, endOnError bool) error {
	raw, err := encode(pk, c.version)
	if err != nil {
		return fmt.Errorf("mqttc: encode %s: %w", packets.PacketNames[pk.FixedHeader.Type], err)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	select {
	case <-c.dead:
		return fmt.Errorf("mqttc: send %s: connection ended: %w", packets.PacketNames[pk.FixedHeader.Type], c.Err())
	default:
	}
	_ = c.conn.SetWriteDeadline(time.Now().Add(c.opts.AckTimeout))
	if _, err := c.conn.Write(raw); err != nil {
		err = fmt.Errorf("mqttc: send %s: %w", packets.PacketNames[pk.FixedHeader.Type], err)
		if endOnError {
			c.shutdown(err)
		}
		return err
	}
	c.lastWrite.Store(time.Now().UnixNano())
	return nil
}

// encode encodes pk at protocol level version with Mods that drop nothing.
func encode(pk packets.Packet, version byte) ([]byte, error) {
	if pk.FixedHeader.Type != packets.Connect {
		pk.ProtocolVersion = version
	}
	pk.Mods = packets.Mods{AllowResponseInfo: true}
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Pubrec:
		err = pk.PubrecEncode(&buf)
	case packets.Pubrel:
		pk.FixedHeader.Qos = 1
		err = pk.PubrelEncode(&buf)
	case packets.Pubcomp:
		err = pk.PubcompEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Unsubscribe:
		err = pk.UnsubscribeEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	case packets.Auth:
		err = pk.AuthEncode(&buf)
	default:
		err = fmt.Errorf("packet type %d is not sent by clients", pk.FixedHeader.Type)
	}
	if err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// headerReader reads through to r, keeping the bytes it read.
type headerReader struct {
	r    *bufio.Reader
	read []byte
}

func (h *headerReader) ReadByte() (byte, error) {
	b, err := h.r.ReadByte()
	if err == nil {
		h.read = append(h.read, b)
	}
	return b, err
}

// readPacket reads and decodes one packet, decoding at protocol level
// version (4 or 5), and returns its bytes as received too. Every packet
// gets its own buffer, which mochi's decoded strings and payloads point
// into (raw is a separate copy).
func readPacket(r *bufio.Reader, version byte) (pk packets.Packet, raw []byte, err error) {
	h := &headerReader{r: r}
	hb, err := h.ReadByte()
	if err != nil {
		return pk, nil, err
	}
	pk.ProtocolVersion = version
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return pk, nil, fmt.Errorf("fixed header 0x%02x: %w", hb, err)
	}
	n, _, err := packets.DecodeLength(h)
	if err != nil {
		return pk, nil, fmt.Errorf("remaining length of %s: %w", packets.PacketNames[pk.FixedHeader.Type], err)
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return pk, nil, fmt.Errorf("body of %s (%d bytes): %w", packets.PacketNames[pk.FixedHeader.Type], n, err)
	}
	raw = append(h.read, body...)
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Pubrel:
		err = pk.PubrelDecode(body)
	case packets.Pubcomp:
		err = pk.PubcompDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Unsuback:
		err = pk.UnsubackDecode(body)
	case packets.Pingresp:
	case packets.Disconnect:
		// mochi reads the reason code only when properties follow it.
		if version == 5 && n == 1 {
			pk.ReasonCode = body[0]
		} else {
			err = pk.DisconnectDecode(body)
		}
	case packets.Auth:
		if n > 0 {
			err = pk.AuthDecode(body)
		}
	default:
		err = fmt.Errorf("packet type %d is not sent by servers", pk.FixedHeader.Type)
	}
	if err != nil {
		return pk, raw, fmt.Errorf("decode %s: %w", packets.PacketNames[pk.FixedHeader.Type], err)
	}
	return pk, raw, nil
}

func (c *Client) readLoop() {
	defer func() {
		<-c.pingDone
		close(c.done)
	}()
	decodeAt := byte(4)
	if c.version == 5 {
		decodeAt = 5
	}
	for {
		pk, raw, err := readPacket(c.br, decodeAt)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("mqttc: connection closed by the server: %w", err)
			} else {
				err = fmt.Errorf("mqttc: read: %w", err)
			}
			c.shutdown(err)
			return
		}
		if c.opts.KeepLog {
			c.mu.Lock()
			c.log = append(c.log, pk)
			c.raw = append(c.raw, raw)
			c.mu.Unlock()
		}
		if err := c.handle(pk); err != nil {
			c.shutdown(err)
			return
		}
	}
}

// handle processes one received packet on the reader goroutine.
func (c *Client) handle(pk packets.Packet) error {
	switch pk.FixedHeader.Type {
	case packets.Publish:
		return c.handlePublish(pk)
	case packets.Pubrel:
		c.mu.Lock()
		_, known := c.inbound[pk.PacketID]
		delete(c.inbound, pk.PacketID)
		c.mu.Unlock()
		comp := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubcomp}, PacketID: pk.PacketID}
		if !known && c.version == 5 {
			comp.ReasonCode = packets.ErrPacketIdentifierNotFound.Code
		}
		return c.ignoreClosed(c.writePacket(comp))
	case packets.Puback, packets.Pubrec, packets.Pubcomp:
		return c.handlePubAck(pk)
	case packets.Suback, packets.Unsuback:
		c.mu.Lock()
		f := c.inflight[pk.PacketID]
		want := byte(packets.Subscribe)
		if pk.FixedHeader.Type == packets.Unsuback {
			want = packets.Unsubscribe
		}
		if f == nil || f.kind != want {
			c.mu.Unlock()
			return nil // a late answer to a request that timed out
		}
		delete(c.inflight, pk.PacketID)
		f.ack = pk
		c.mu.Unlock()
		close(f.done)
		return nil
	case packets.Pingresp:
		c.pingSent.Store(0)
		return nil
	case packets.Disconnect:
		c.mu.Lock()
		c.srvDisc = &pk
		c.mu.Unlock()
		return fmt.Errorf("mqttc: server sent DISCONNECT, reason 0x%02x %s", pk.ReasonCode, pk.Properties.ReasonString)
	case packets.Connack:
		return errors.New("mqttc: protocol error: a second CONNACK")
	case packets.Auth:
		return errors.New("mqttc: AUTH received: enhanced authentication is not supported")
	}
	return nil
}

func (c *Client) handlePublish(pk packets.Packet) error {
	if c.version == 5 && pk.Properties.TopicAlias > 0 {
		c.mu.Lock()
		if pk.TopicName != "" {
			c.aliases[pk.Properties.TopicAlias] = pk.TopicName
		} else if t, ok := c.aliases[pk.Properties.TopicAlias]; ok {
			pk.TopicName = t
		} else {
			c.mu.Unlock()
			return fmt.Errorf("mqttc: PUBLISH with unknown topic alias %d", pk.Properties.TopicAlias)
		}
		c.mu.Unlock()
	}
	// An automatic acknowledgement is written before the message is
	// queued, so that whatever the application does after Next reaches the
	// server after the acknowledgement.
	deliver := true
	var ack packets.Packet
	switch pk.FixedHeader.Qos {
	case 1:
		if !c.opts.ManualAcks {
			ack = packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID}
		}
	case 2:
		c.mu.Lock()
		recSent, dup := c.inbound[pk.PacketID]
		if !dup {
			// Not seen, or its flow has completed: a new message.
			c.inbound[pk.PacketID] = !c.opts.ManualAcks
		}
		c.mu.Unlock()
		// Method B: a PUBLISH awaiting PUBREL is acknowledged again, never
		// delivered again; one not yet acknowledged by the application waits
		// for its Ack.
		deliver = !dup
		if (!dup && !c.opts.ManualAcks) || (dup && recSent) {
			ack = packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: pk.PacketID}
		}
	}
	if ack.FixedHeader.Type != 0 {
		if err := c.ignoreClosed(c.writePacket(ack)); err != nil {
			return err
		}
	}
	if deliver {
		c.enqueue(pk)
	}
	return nil
}

func (c *Client) enqueue(pk packets.Packet) {
	c.mu.Lock()
	c.queue = append(c.queue, pk)
	c.mu.Unlock()
	c.wake()
}

func (c *Client) handlePubAck(pk packets.Packet) error {
	c.mu.Lock()
	f := c.inflight[pk.PacketID]
	if f == nil || f.kind != packets.Publish {
		c.mu.Unlock()
		if pk.FixedHeader.Type == packets.Pubrec {
			// A PUBREC for an unknown id is answered (MQTT 5 4.3.3).
			rel := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: pk.PacketID}
			if c.version == 5 {
				rel.ReasonCode = packets.ErrPacketIdentifierNotFound.Code
			}
			return c.ignoreClosed(c.writePacket(rel))
		}
		return nil // a late ack of a flow that timed out
	}
	finished := false
	var rel *packets.Packet
	switch {
	case pk.FixedHeader.Type == packets.Puback && f.qos == 1:
		f.acks.Puback, finished = pk, true
	case pk.FixedHeader.Type == packets.Pubrec && f.qos == 2:
		f.acks.Pubrec = pk
		if pk.ReasonCode >= 0x80 {
			finished = true
		} else {
			rel = &packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel, Qos: 1}, PacketID: pk.PacketID}
		}
	case pk.FixedHeader.Type == packets.Pubcomp && f.qos == 2 && f.acks.Pubrec.FixedHeader.Type == packets.Pubrec:
		f.acks.Pubcomp, finished = pk, true
	default:
		c.mu.Unlock()
		return fmt.Errorf("mqttc: protocol error: %s for packet id %d, a QoS %d PUBLISH", packets.PacketNames[pk.FixedHeader.Type], pk.PacketID, f.qos)
	}
	if finished {
		delete(c.inflight, pk.PacketID)
	}
	c.mu.Unlock()
	if finished {
		close(f.done)
	}
	if rel != nil {
		return c.ignoreClosed(c.writePacket(*rel))
	}
	return nil
}

// ignoreClosed drops a write error caused by the connection ending: the
// reader will report the cause itself.
func (c *Client) ignoreClosed(err error) error {
	if err == nil {
		return nil
	}
	select {
	case <-c.dead:
		return nil
	default:
		return err
	}
}

// pingLoop sends a PINGREQ once nothing has been written for half the keep
// alive (mochi's grace is 1.5 x the keep alive rounded down to whole
// seconds: 1 s for a 1 s keep alive, so a client pinging at the keep alive
// is dropped), and ends the connection when a PINGRESP is a whole keep
// alive late.
func (c *Client) pingLoop() {
	defer close(c.pingDone)
	every := c.ka / 2
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-c.dead:
			return
		case <-t.C:
		}
		now := time.Now()
		next := every
		if ps := c.pingSent.Load(); ps != 0 {
			waited := now.Sub(time.Unix(0, ps))
			if waited >= c.ka {
				c.shutdown(fmt.Errorf("mqttc: no PINGRESP within %v", c.ka))
				return
			}
			next = c.ka - waited
		} else if idle := now.Sub(time.Unix(0, c.lastWrite.Load())); idle >= every {
			c.pingSent.Store(now.UnixNano())
			if err := c.Ping(); err != nil {
				return
			}
		} else {
			next = every - idle
		}
		t.Reset(next)
	}
}
