package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/proxy"
)

// rawClient speaks MQTT by hand over a socket, for what the applications
// of package mqtttest (paho, MQTT 3.1.1) cannot say: MQTT 5 Will and
// session properties. Packets are encoded and decoded with mochi's packets
// package.
type rawClient struct {
	t       testing.TB
	conn    net.Conn
	rd      *bufio.Reader
	version byte
}

// dialRaw opens a connection to the sidecar's first local listener; the
// client speaks MQTT 5.
func dialRaw(t testing.TB, sc *proxy.Sidecar) *rawClient {
	t.Helper()
	conn, err := net.Dial("tcp", sc.Addrs()[0].String())
	must(t, err)
	t.Cleanup(func() { conn.Close() })
	return &rawClient{t: t, conn: conn, rd: bufio.NewReader(conn), version: 5}
}

// send encodes and writes one packet.
func (c *rawClient) send(pk packets.Packet) {
	c.t.Helper()
	pk.ProtocolVersion = c.version
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	default:
		err = fmt.Errorf("rawClient cannot send packet type %d", pk.FixedHeader.Type)
	}
	must(c.t, err)
	c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err = c.conn.Write(buf.Bytes())
	must(c.t, err)
}

// next reads and decodes the next packet, waiting at most d.
func (c *rawClient) next(d time.Duration) packets.Packet {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(d))
	h, err := c.rd.ReadByte()
	must(c.t, err)
	pk := packets.Packet{ProtocolVersion: c.version}
	must(c.t, pk.FixedHeader.Decode(h))
	n, mul := 0, 1
	for {
		b, err := c.rd.ReadByte()
		must(c.t, err)
		n += int(b&0x7f) * mul
		if b&0x80 == 0 {
			break
		}
		mul *= 128
	}
	body := make([]byte, n)
	_, err = io.ReadFull(c.rd, body)
	must(c.t, err)
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	}
	must(c.t, err)
	return pk
}

// connect sends CONNECT and checks that the CONNACK accepts it; it
// reports whether the broker had a session for the client.
func (c *rawClient) connect(cp packets.ConnectParams, props packets.Properties) (sessionPresent bool) {
	c.t.Helper()
	cp.ProtocolName = []byte("MQTT")
	if cp.Keepalive == 0 {
		cp.Keepalive = 30
	}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: cp, Properties: props})
	ack := c.next(5 * time.Second)
	if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		c.t.Fatalf("CONNACK for %s: type %d reason %#x", cp.ClientIdentifier, ack.FixedHeader.Type, ack.ReasonCode)
	}
	return ack.SessionPresent
}

// subscribe subscribes to one filter and waits for a granting SUBACK.
func (c *rawClient) subscribe(filter string, qos byte) {
	c.t.Helper()
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: filter, Qos: qos}}})
	ack := c.next(5 * time.Second)
	if ack.FixedHeader.Type != packets.Suback || len(ack.ReasonCodes) != 1 || ack.ReasonCodes[0] >= 0x80 {
		c.t.Fatalf("SUBACK for %s: type %d codes %x", filter, ack.FixedHeader.Type, ack.ReasonCodes)
	}
}

// disconnect ends the connection normally (no Will).
func (c *rawClient) disconnect() {
	c.t.Helper()
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	c.conn.Close()
}

// sessionExpiry is the CONNECT property asking the broker to keep the
// session for s seconds after the connection ends.
func sessionExpiry(s uint32) packets.Properties {
	return packets.Properties{SessionExpiryInterval: s, SessionExpiryIntervalFlag: s > 0}
}

// TestWillDelayInterval: an MQTT 5 application's Will on a protected topic
// is relayed (sealed) by its sidecar after the Will Delay Interval, capped
// at the session expiry, unless the session goes on in a new connection
// first (MQTT 5 §3.1.3.2.2).
func TestWillDelayInterval(t *testing.T) {
	t.Parallel()
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")

	// Each case ends the Will's connection (or takes it over) and says
	// when the Will must arrive at a subscriber on the other sidecar.
	const (
		atOnce     = "at once"
		afterDelay = "after the delay"
		never      = "never"
	)
	reconnect := func(clean bool) func(*testing.T, *rawClient, string) {
		return func(t *testing.T, old *rawClient, id string) {
			old.conn.Close()
			dialRaw(t, a).connect(packets.ConnectParams{ClientIdentifier: id, Clean: clean}, sessionExpiry(60))
		}
	}
	tests := []struct {
		name          string
		delay, expiry uint32 // seconds
		end           func(t *testing.T, old *rawClient, id string)
		want          string
	}{
		{"a delayed Will arrives after its delay, not before", 2, 60,
			func(t *testing.T, old *rawClient, id string) { old.conn.Close() }, afterDelay},
		{"a reconnect that continues the session within the delay cancels the Will", 2, 60,
			reconnect(false), never},
		{"a reconnect with Clean Start ends the session: the Will goes at once", 30, 60,
			reconnect(true), atOnce},
		{"a takeover that continues the session while the old connection is open: no Will", 2, 60,
			func(t *testing.T, _ *rawClient, id string) {
				dialRaw(t, a).connect(packets.ConnectParams{ClientIdentifier: id}, sessionExpiry(60))
			}, never},
		{"no delay: the Will goes at once", 0, 60,
			func(t *testing.T, old *rawClient, id string) { old.conn.Close() }, atOnce},
		{"a delay beyond a session that ends with the connection: the Will goes at once", 30, 0,
			func(t *testing.T, old *rawClient, id string) { old.conn.Close() }, atOnce},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			topic := fmt.Sprintf("secure/will/%d", i)
			secret := "WILL-" + uniq("w")
			sub := r.app(b, uniq("sub"))
			must(t, sub.Subscribe(topic, 1))

			id := uniq("willing")
			c := dialRaw(t, a)
			c.connect(packets.ConnectParams{ClientIdentifier: id, Clean: true,
				WillFlag: true, WillTopic: topic, WillPayload: []byte(secret), WillQos: 1,
				WillProperties: packets.Properties{WillDelayInterval: tc.delay}}, sessionExpiry(tc.expiry))
			ended := time.Now()
			tc.end(t, c, id)
			delay := time.Duration(tc.delay) * time.Second

			switch tc.want {
			case atOnce:
				expect(t, sub, topic, secret)
			case afterDelay:
				expectNone(t, sub, delay/2)
				expect(t, sub, topic, secret)
				if waited := time.Since(ended); waited < delay {
					t.Fatalf("the Will arrived %v after the connection ended, before its delay of %v", waited, delay)
				}
			case never:
				expectNone(t, sub, delay+1500*time.Millisecond)
			}
			if up.Spy.Contains([]byte(secret)) {
				t.Fatal("upstream saw the Will's plaintext")
			}
		})
	}
}

// TestDelayedWillSentWhenSidecarStops: stopping the sidecar ends its local
// sessions, so a Will still waiting for its delay is relayed then.
func TestDelayedWillSentWhenSidecarStops(t *testing.T) {
	t.Parallel()
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
	sub := r.app(b, uniq("sub"))
	must(t, sub.Subscribe("secure/will/stop", 1))

	c := dialRaw(t, a)
	c.connect(packets.ConnectParams{ClientIdentifier: uniq("willing"), Clean: true,
		WillFlag: true, WillTopic: "secure/will/stop", WillPayload: []byte("stopped"), WillQos: 1,
		WillProperties: packets.Properties{WillDelayInterval: 3600}}, sessionExpiry(3600))
	c.conn.Close()
	expectNone(t, sub, 300*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	must(t, a.Close(ctx))
	expect(t, sub, "secure/will/stop", "stopped")
}
