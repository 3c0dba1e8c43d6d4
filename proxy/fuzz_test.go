package proxy_test

import (
	"bytes"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// FuzzLocalPackets feeds a running sidecar arbitrary bytes from a local
// application, after a valid CONNECT: it must neither crash nor hang, never
// put a plaintext payload on a protected topic upstream, and keep serving.
func FuzzLocalPackets(f *testing.F) {
	up := embeddedUpstream(f, false)
	r := newBridgeRig(f, up)
	sc := r.sidecar(uniq("fuzzed"), "")
	addr := sc.Addrs()[0].String()

	connect := encode(f, packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect:         packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "fuzz"},
	})
	f.Add(encode(f, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "secure/x", PacketID: 1, Payload: []byte("FUZZ-PLAINTEXT")}))
	f.Add(encode(f, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: "secure/r", Payload: []byte("FUZZ-PLAINTEXT")}))
	f.Add(encode(f, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 2, Filters: packets.Subscriptions{{Filter: "secure/#", Qos: 1}}}))
	f.Add([]byte{0x30, 0xff, 0xff, 0xff, 0x7f})
	f.Add([]byte{0xe0, 0x00})

	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			t.Fatalf("the sidecar stopped accepting connections: %v", err)
		}
		c.SetDeadline(time.Now().Add(time.Second))
		c.Write(append(append([]byte(nil), connect...), data...))
		buf := make([]byte, 4096)
		c.Read(buf) // whatever it answers, or it closes
		c.Close()
		for _, s := range up.Spy.All() {
			if bytes.HasPrefix([]byte(s.Topic), []byte("secure/")) && bytes.Contains(s.Payload, []byte("FUZZ-PLAINTEXT")) {
				t.Fatalf("plaintext upstream on %s", s.Topic)
			}
		}
	})
}

func encode(f *testing.F, pk packets.Packet) []byte {
	var b bytes.Buffer
	var err error
	if pk.ProtocolVersion == 0 {
		pk.ProtocolVersion = 4
	}
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&b)
	case packets.Publish:
		err = pk.PublishEncode(&b)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&b)
	}
	if err != nil {
		f.Fatal(err)
	}
	return b.Bytes()
}

// FuzzSessionPackets does the same to a sidecar in session mode, whose
// relay decodes the CONNECT itself: arbitrary bytes as a whole connection
// (a CONNECT or garbage), or after a valid MQTT 3.1.1 or 5 CONNECT. It must
// neither crash nor hang, nor put a plaintext payload (or Will) on a
// protected topic upstream, and keep serving.
func FuzzSessionPackets(f *testing.F) {
	up := embeddedUpstream(f, false)
	r := newRig(f, up)
	sc := r.sidecar(uniq("fuzzed"), "")
	addr := sc.Addrs()[0].String()
	connects := [][]byte{
		encode(f, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "fuzz3"}}),
		encode(f, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "fuzz5"}}),
	}
	willed := encode(f, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "fuzzw",
			WillFlag: true, WillTopic: "secure/w", WillPayload: []byte("FUZZ-PLAINTEXT"), WillQos: 1,
			WillProperties: packets.Properties{User: []packets.UserProperty{{Key: "FUZZ-PLAINTEXT", Val: "v"}}}}})
	v5pub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "secure/x", PacketID: 1,
		Payload: []byte("FUZZ-PLAINTEXT"), ProtocolVersion: 5, Mods: packets.Mods{AllowResponseInfo: true},
		Properties: packets.Properties{User: []packets.UserProperty{{Key: "k", Val: "FUZZ-PLAINTEXT"}}, TopicAlias: 1, TopicAliasFlag: true}}
	f.Add(byte(0), encode(f, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: "secure/x", PacketID: 1, Payload: []byte("FUZZ-PLAINTEXT")}))
	f.Add(byte(1), encode(f, v5pub))
	f.Add(byte(2), willed)
	f.Add(byte(2), []byte{0x10, 0xff, 0xff, 0xff, 0x7f})
	f.Add(byte(1), []byte{0x30, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00})

	f.Fuzz(func(t *testing.T, how byte, data []byte) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			t.Fatalf("the sidecar stopped accepting connections: %v", err)
		}
		c.SetDeadline(time.Now().Add(time.Second))
		var in []byte
		if i := int(how) % 3; i < 2 {
			in = append(in, connects[i]...)
		}
		c.Write(append(in, data...))
		buf := make([]byte, 4096)
		c.Read(buf)
		c.Close()
		for _, s := range up.Spy.All() {
			if bytes.HasPrefix([]byte(s.Topic), []byte("secure/")) && bytes.Contains(s.Payload, []byte("FUZZ-PLAINTEXT")) {
				t.Fatalf("plaintext upstream on %s", s.Topic)
			}
		}
	})
}
