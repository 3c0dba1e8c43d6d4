package proxy_test

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/internal/mqtttest"
)

// TestPersistentSessionsOutliveSidecarRestart: an MQTT 3.1.1 application
// with clean session 0 and an MQTT 5 one with a session expiry go away;
// QoS 1 messages reach their sidecar, which is stopped and started again on
// its data directory. Both applications come back to their session
// (subscriptions and the messages they missed), and later messages reach
// them too.
func TestPersistentSessionsOutliveSidecarRestart(t *testing.T) {
	up := embeddedUpstream(t, false)
	r := newRig(t, up)
	a := r.sidecar(uniq("a"), "", bridgeMode)
	nameB, dirB := uniq("b"), t.TempDir()
	b := r.sidecar(nameB, dirB, bridgeMode)
	root := "secure/kept/" + uniq("r")
	id3, id5 := uniq("app311"), uniq("app5")

	app, err := mqtttest.Connect(localURL(b), id3, mqtttest.AppOptions{KeepSession: true})
	must(t, err)
	must(t, app.Subscribe(root+"/3/#", 1))
	app.Close()
	raw := dialRaw(t, b)
	raw.connect(packets.ConnectParams{ClientIdentifier: id5, Clean: true}, sessionExpiry(3600))
	raw.subscribe(root+"/5/#", 1)
	raw.disconnect()

	pub := r.app(a, uniq("pub"))
	before := b.MessageCounts()["in/protected"]
	for i := range 3 {
		must(t, pub.Publish(root+"/3/x", 1, false, []byte("away-"+strconv.Itoa(i))))
		must(t, pub.Publish(root+"/5/x", 1, false, []byte("away-"+strconv.Itoa(i))))
	}
	waitFor(t, func() bool { return b.MessageCounts()["in/protected"] >= before+6 }, "sidecar b receives the messages")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	must(t, b.Close(ctx))
	b = r.sidecar(nameB, dirB, bridgeMode)
	waitFor(t, func() bool {
		return slices.Contains(b.MirroredFilters(), root+"/3/#") && slices.Contains(b.MirroredFilters(), root+"/5/#")
	}, "the restarted sidecar mirrors the kept sessions' filters: %v", b.MirroredFilters())

	app, err = mqtttest.Connect(localURL(b), id3, mqtttest.AppOptions{KeepSession: true})
	must(t, err)
	defer app.Close()
	raw = dialRaw(t, b)
	if !raw.connect(packets.ConnectParams{ClientIdentifier: id5}, sessionExpiry(3600)) {
		t.Fatal("MQTT 5: the session was not kept across the restart")
	}
	want := []string{"away-0", "away-1", "away-2"}
	var got3, got5 []string
	for range 3 {
		m := expectOn(t, app, root+"/3/x")
		got3 = append(got3, string(m.Payload))
		pk := raw.next(5 * time.Second)
		if pk.FixedHeader.Type != packets.Publish || pk.TopicName != root+"/5/x" {
			t.Fatalf("MQTT 5 after the restart: packet type %d on %q, want a message on %s", pk.FixedHeader.Type, pk.TopicName, root+"/5/x")
		}
		got5 = append(got5, string(pk.Payload))
		raw.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
	}
	// Not necessarily in order: mochi resends a resumed session's messages
	// sorted by the second they were created in only.
	slices.Sort(got3)
	slices.Sort(got5)
	if !slices.Equal(got3, want) || !slices.Equal(got5, want) {
		t.Fatalf("after the restart: MQTT 3.1.1 got %q, MQTT 5 got %q; want %q each", got3, got5, want)
	}
	must(t, pub.Publish(root+"/3/x", 1, false, []byte("live")))
	must(t, pub.Publish(root+"/5/x", 1, false, []byte("live")))
	expect(t, app, root+"/3/x", "live")
	if pk := raw.next(5 * time.Second); pk.FixedHeader.Type != packets.Publish || string(pk.Payload) != "live" {
		t.Fatalf("MQTT 5 after the restart: packet type %d %q, want the live message", pk.FixedHeader.Type, pk.Payload)
	}
}

// expectOn waits for the next message and checks its topic.
func expectOn(t *testing.T, a *mqtttest.App, topic string) mqtttest.Msg {
	t.Helper()
	m, ok := a.Next(5 * time.Second)
	if !ok {
		t.Fatalf("no message on %s", topic)
	}
	if m.Topic != topic {
		t.Fatalf("a message on %s, want one on %s", m.Topic, topic)
	}
	return m
}
