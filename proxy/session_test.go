package proxy_test

import (
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/internal/embedded"
)

// The local broker looks for expired sessions once a second, and expires a
// session once whole seconds past its expiry interval have gone by: a
// session of 1 s goes 1 to 3 s after its connection ended, well within
// waitFor's 10 s.

// subscribedUpstream reports whether the sidecar whose upstream client id
// is name holds filter on the embedded upstream broker.
func subscribedUpstream(up *embedded.Broker, name, filter string) bool {
	cl, ok := up.Server().Clients.Get(name)
	if !ok {
		return false
	}
	_, ok = cl.State.Subscriptions.Get(filter)
	return ok
}

// TestExpiredLocalSessionUnsubscribesUpstream: a persistent MQTT 5 session
// keeps its filter subscribed upstream after its connection ends; when the
// session expires, the sidecar drops the filter upstream.
func TestExpiredLocalSessionUnsubscribesUpstream(t *testing.T) {
	t.Parallel()
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	name := uniq("a")
	a := r.sidecar(name, "")
	filter := "secure/session/" + uniq("f") + "/#"

	c := dialRaw(t, a)
	c.connect(packets.ConnectParams{ClientIdentifier: uniq("persistent")}, sessionExpiry(1))
	c.subscribe(filter, 1)
	if !slices.Contains(a.MirroredFilters(), filter) || !subscribedUpstream(up, name, filter) {
		t.Fatalf("after SUBACK: mirrored %v, upstream holds it: %v", a.MirroredFilters(), subscribedUpstream(up, name, filter))
	}
	c.disconnect()
	// The session outlives its connection for a while ...
	time.Sleep(300 * time.Millisecond)
	if !slices.Contains(a.MirroredFilters(), filter) {
		t.Fatalf("the filter was dropped as the connection ended, before the session expired: mirrored %v", a.MirroredFilters())
	}
	// ... and then expires, and the filter goes upstream too.
	waitFor(t, func() bool { return !slices.Contains(a.MirroredFilters(), filter) }, "the sidecar lets go of the expired session's filter")
	waitFor(t, func() bool { return !subscribedUpstream(up, name, filter) }, "upstream drops the expired session's filter")
}

// TestPersistentSessionResumesBeforeExpiry: a persistent MQTT 5 session
// that reconnects before it expires still has its subscription, and gets
// the QoS 1 messages published while it was away, in order.
func TestPersistentSessionResumesBeforeExpiry(t *testing.T) {
	t.Parallel()
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	name := uniq("b")
	a, b := r.sidecar(uniq("a"), ""), r.sidecar(name, "")
	filter := "secure/resume/" + uniq("f") + "/#"
	topic := filter[:len(filter)-1] + "x"
	id := uniq("persistent")

	c := dialRaw(t, b)
	if c.connect(packets.ConnectParams{ClientIdentifier: id, Clean: true}, sessionExpiry(60)) {
		t.Fatal("a new session reported as present")
	}
	c.subscribe(filter, 1)
	c.disconnect()

	received := func() int { return b.MessageCounts()["in/protected"] }
	before := received()
	pub := r.app(a, uniq("pub"))
	const n = 3
	for i := range n {
		must(t, pub.Publish(topic, 1, false, []byte("away-"+strconv.Itoa(i))))
	}
	// Wait until b has them, so they are delivered while the session has
	// no connection.
	waitFor(t, func() bool { return received() >= before+n }, "sidecar b receives the messages")

	c = dialRaw(t, b)
	if !c.connect(packets.ConnectParams{ClientIdentifier: id}, sessionExpiry(60)) {
		t.Fatal("the persistent session was not kept")
	}
	// Each exactly once. Not necessarily in order: mochi 2.7.9 resends a
	// resumed session's messages sorted by the second they were created
	// in, and in any order within one second.
	var got []string
	for range n {
		pk := c.next(5 * time.Second)
		if pk.FixedHeader.Type != packets.Publish || pk.TopicName != topic || pk.FixedHeader.Qos != 1 {
			t.Fatalf("after the reconnect: type %d %s %q QoS %d, want a QoS 1 message on %s", pk.FixedHeader.Type, pk.TopicName, pk.Payload, pk.FixedHeader.Qos, topic)
		}
		got = append(got, string(pk.Payload))
		c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
	}
	slices.Sort(got)
	if want := []string{"away-0", "away-1", "away-2"}; !slices.Equal(got, want) {
		t.Fatalf("the session got %q while it was away, want %q", got, want)
	}
	// The subscription is live again, upstream too.
	if !slices.Contains(b.MirroredFilters(), filter) || !subscribedUpstream(up, name, filter) {
		t.Fatalf("after the reconnect: mirrored %v, upstream holds it: %v", b.MirroredFilters(), subscribedUpstream(up, name, filter))
	}
	must(t, pub.Publish(topic, 1, false, []byte("live")))
	if pk := c.next(5 * time.Second); pk.FixedHeader.Type != packets.Publish || string(pk.Payload) != "live" {
		t.Fatalf("after the reconnect: type %d %q, want the live message", pk.FixedHeader.Type, pk.Payload)
	}
}
