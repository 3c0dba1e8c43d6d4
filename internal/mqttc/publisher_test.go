package mqttc

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/internal/faultnet"
	"github.com/smqtt/smqtt/internal/mosquitto"
)

// TestPublisherExactlyOnceThroughCuts: a QoS 2 stream whose connection is
// cut three times reaches a subscriber of Mosquitto complete and without a
// duplicate: the Publisher sends again, after each reconnect, the PUBLISH
// of what got no PUBREC and the PUBREL of what did.
func TestPublisherExactlyOnceThroughCuts(t *testing.T) {
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto is not installed")
	}
	b, err := mosquitto.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	relay, err := faultnet.New(b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	sub := connect(t, b.Addr(), Options{ClientID: uid("sub"), Clean: true})
	subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: "cut/q2", Qos: 2})
	p, err := NewPublisher(relay.Addr(), Options{ClientID: uid("pub")}, 100)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	const n = 3000
	for i := range n {
		if err := p.Publish(packets.Packet{FixedHeader: packets.FixedHeader{Qos: 2}, TopicName: "cut/q2", Payload: []byte(strconv.Itoa(i))}); err != nil {
			t.Fatal(err)
		}
		if i%1000 == 500 {
			relay.Cut()
		}
	}
	if !p.Wait(30 * time.Second) {
		t.Fatal("not every publish was acknowledged")
	}
	seen := make([]int, n)
	for {
		pk, ok := sub.Next(500 * time.Millisecond)
		if !ok {
			break
		}
		i, err := strconv.Atoi(string(pk.Payload))
		if err != nil || i < 0 || i >= n {
			t.Fatalf("garbled %q", pk.Payload)
		}
		seen[i]++
	}
	var bad []string
	for i, c := range seen {
		if c != 1 {
			bad = append(bad, strconv.Itoa(i)+"×"+strconv.Itoa(c))
		}
	}
	if len(bad) > 0 {
		t.Fatalf("not exactly once: %s", strings.Join(bad[:min(len(bad), 20)], " "))
	}
}
