package proxy_test

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/proxy"
)

// duplicator is a hostile upstream: it delivers every message on a
// protected topic twice, the second copy after the next message (so it also
// reorders).
type duplicator struct {
	mqtt.HookBase
	server  func() *mqtt.Server
	mu      sync.Mutex
	pending []packets.Packet
}

func (d *duplicator) ID() string           { return "duplicator" }
func (d *duplicator) Provides(b byte) bool { return b == mqtt.OnPublished }
func (d *duplicator) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline || !bytes.HasPrefix([]byte(pk.TopicName), []byte("secure/")) {
		return
	}
	d.mu.Lock()
	d.pending = append(d.pending, pk)
	var old *packets.Packet
	if len(d.pending) > 1 {
		old = &d.pending[0]
		d.pending = d.pending[1:]
	}
	d.mu.Unlock()
	if old != nil {
		d.server().Publish(old.TopicName, old.Payload, false, old.FixedHeader.Qos)
	}
}

// TestDuplicatingReorderingBroker: every protected message delivered twice,
// out of order; the app behind the sidecar gets each exactly once, and the
// copies are counted as replays.
func TestDuplicatingReorderingBroker(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		var up *embedded.Broker
		dup := &duplicator{server: func() *mqtt.Server { return up.Server() }}
		up, err := embedded.Start(embedded.Options{Hooks: []mqtt.Hook{dup}})
		must(t, err)
		t.Cleanup(func() { up.Close() })
		r := newModeRig(t, mode, up)
		a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
		pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/dup", 1))
		const n = 200
		for i := 0; i < n; i++ {
			must(t, pub.Publish("secure/dup", 1, false, []byte(fmt.Sprint(i))))
		}
		for i := 0; i < n; i++ {
			expect(t, sub, "secure/dup", fmt.Sprint(i))
		}
		expectNone(t, sub, 300*time.Millisecond)
		waitFor(t, func() bool { return b.DropCounts()["in/"+proxy.DropReplay] >= n-1 }, "copies counted as replays (%d)", b.DropCounts()["in/"+proxy.DropReplay])
	})
}

// TestFloodOfInvalidEnvelopes: 5,000 garbage messages on a protected topic
// are all dropped and counted, and the sidecar still relays real traffic.
func TestFloodOfInvalidEnvelopes(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
		sub := r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/#", 0))
		evil, err := mqtttest.Connect(up.URL(), uniq("evil"), mqtttest.AppOptions{})
		must(t, err)
		defer evil.Close()
		const n = 5000
		junk := bytes.Repeat([]byte{0x01}, 100)
		for i := 0; i < n; i++ {
			evil.Client.Publish("secure/flood", 0, false, junk)
		}
		must(t, evil.Publish("secure/flood", 1, false, junk)) // a QoS 1 barrier behind the flood
		pub := r.app(a, uniq("pub"))
		must(t, pub.Publish("secure/real", 1, false, []byte("still here")))
		expect(t, sub, "secure/real", "still here")
		waitFor(t, func() bool {
			d := b.DropCounts()
			return d["in/"+proxy.DropAuth]+d["in/"+proxy.DropMalformed]+d["in/"+proxy.DropUnknownKey] >= n+1
		}, "every junk message counted (%v)", b.DropCounts())
	})
}

// TestLargePayloads: a 1 MiB message crosses protected, byte for byte.
func TestLargePayloads(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
		pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/big", 1))
		big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
		must(t, pub.Publish("secure/big", 1, false, big))
		m, ok := sub.Next(10 * time.Second)
		if !ok || !bytes.Equal(m.Payload, big) {
			t.Fatalf("1 MiB payload: arrived %v, %d bytes", ok, len(m.Payload))
		}
		if up.Spy.Contains(big[:64]) {
			t.Fatal("plaintext on the wire")
		}
	})
}
