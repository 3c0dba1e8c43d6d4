package proxy_test

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/proxy"
)

// TestMQTT5Publisher: an MQTT 5 application's QoS 1 publish on a protected
// topic is acknowledged with success and crosses sealed; one on a topic
// unmatched: deny refuses gets a negative PUBACK (not authorised).
func TestMQTT5Publisher(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		a := r.sidecar(uniq("a"), "", func(o *proxy.Options) { o.Deny = true })
		b := r.sidecar(uniq("b"), "")
		sub := r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/v5", 1))

		conn, err := net.Dial("tcp", a.Addrs()[0].String())
		must(t, err)
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		rd := bufio.NewReader(conn)
		send := func(pk packets.Packet) {
			t.Helper()
			pk.ProtocolVersion = 5
			var buf bytes.Buffer
			switch pk.FixedHeader.Type {
			case packets.Connect:
				must(t, pk.ConnectEncode(&buf))
			case packets.Publish:
				must(t, pk.PublishEncode(&buf))
			}
			_, err := conn.Write(buf.Bytes())
			must(t, err)
		}
		// next reads one packet: its type and body
		next := func() (byte, []byte) {
			t.Helper()
			h, err := rd.ReadByte()
			must(t, err)
			n, mul := 0, 1
			for {
				c, err := rd.ReadByte()
				must(t, err)
				n += int(c&0x7f) * mul
				if c&0x80 == 0 {
					break
				}
				mul *= 128
			}
			body := make([]byte, n)
			_, err = io.ReadFull(rd, body)
			must(t, err)
			return h >> 4, body
		}
		send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: uniq("v5")}})
		if typ, body := next(); typ != packets.Connack || body[1] != 0 {
			t.Fatalf("CONNACK: type %d body %x", typ, body)
		}
		send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "secure/v5", PacketID: 7, Payload: []byte("from MQTT 5")})
		typ, body := next()
		if typ != packets.Puback || body[0] != 0 || body[1] != 7 || len(body) > 2 && body[2] != 0 {
			t.Fatalf("PUBACK for a protected publish: type %d body %x, want success", typ, body)
		}
		expect(t, sub, "secure/v5", "from MQTT 5")

		send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "open/v5", PacketID: 8, Payload: []byte("denied")})
		typ, body = next()
		if typ != packets.Puback || body[1] != 8 || len(body) < 3 || body[2] != packets.ErrNotAuthorized.Code {
			t.Fatalf("PUBACK for a denied publish: type %d body %x, want reason %#x", typ, body, packets.ErrNotAuthorized.Code)
		}
		if up.Spy.Contains([]byte("denied")) || up.Spy.Contains([]byte("from MQTT 5")) {
			t.Fatal("plaintext upstream")
		}
	})
}
