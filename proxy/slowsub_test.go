package proxy_test

import (
	"bytes"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestSubscriberThatNeverReads: a local application subscribes to "#" and
// then never reads its socket. Other applications on the same sidecar keep
// getting every message, and the sidecar keeps relaying.
func TestSubscriberThatNeverReads(t *testing.T) {
	up := embeddedUpstream(t, false)
	r := newRig(t, up)
	a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")

	stuck, err := net.Dial("tcp", b.Addrs()[0].String())
	must(t, err)
	defer stuck.Close()
	var buf bytes.Buffer
	connect := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 0, ClientIdentifier: uniq("stuck")},
	}
	must(t, connect.ConnectEncode(&buf))
	sub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "#", Qos: 1}}}
	must(t, sub.SubscribeEncode(&buf))
	_, err = stuck.Write(buf.Bytes())
	must(t, err)
	// and from now on it never reads

	healthy := r.app(b, uniq("healthy"))
	must(t, healthy.Subscribe("secure/slow/#", 1))
	pub := r.app(a, uniq("pub"))
	const n = 5000
	payload := bytes.Repeat([]byte("x"), 1000) // 5 MB in all: far more than the stuck socket's buffers
	for i := 0; i < n; i++ {
		pub.Client.Publish("secure/slow/"+strconv.Itoa(i%10), 1, false, append([]byte(strconv.Itoa(i)+":"), payload...))
	}
	for i := 0; i < n; i++ {
		m, ok := healthy.Next(10 * time.Second)
		if !ok {
			t.Fatalf("the healthy subscriber got %d of %d messages while another never read", i, n)
		}
		if !bytes.HasPrefix(m.Payload, []byte(strconv.Itoa(i)+":")) {
			t.Fatalf("message %d arrived as %.10q", i, m.Payload)
		}
	}
	// the sidecar still relays new traffic
	must(t, pub.Publish("secure/slow/after", 1, false, []byte("after")))
	expect(t, healthy, "secure/slow/after", "after")
}
