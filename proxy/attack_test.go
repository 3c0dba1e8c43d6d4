package proxy_test

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/proxy"
)

// TestHostileBrokerEnvelopesAreDroppedAndCounted plays the upstream broker:
// it captures a real envelope and sends tampered, truncated, re-topiced,
// replayed, wrongly keyed and plaintext variants to a sidecar's subscriber.
// None may be delivered; each is counted under its reason.
func TestHostileBrokerEnvelopesAreDroppedAndCounted(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		a := r.sidecar(uniq("a"), "")
		bDir := t.TempDir()
		bName := uniq("b")
		b := r.sidecar(bName, bDir)
		pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/#", 1))

		must(t, pub.Publish("secure/door", 1, false, []byte("open sesame")))
		expect(t, sub, "secure/door", "open sesame")
		var captured []byte
		for _, s := range up.Spy.All() {
			if s.Topic == "secure/door" {
				captured = s.Payload
			}
		}
		if len(captured) != len("open sesame")+envelope.Overhead {
			t.Fatalf("captured envelope has %d bytes", len(captured))
		}

		evil, err := mqtttest.Connect(up.URL(), uniq("evil"), mqtttest.AppOptions{})
		must(t, err)
		defer evil.Close()

		flip := func(i int) []byte {
			c := append([]byte(nil), captured...)
			c[i] ^= 0x01
			return c
		}
		var otherKey envelope.GroupKey
		rand.Read(otherKey[:])
		wrongKey, err := envelope.NewSealer("demo", 1, &otherKey, 77)
		must(t, err)
		wrong, _, err := wrongKey.Seal(nil, "secure/door", 0, []byte("open sesame"))
		must(t, err)
		otherEpoch := flip(2) // epoch field
		binary.BigEndian.PutUint32(otherEpoch[2:], 99)

		cases := []struct {
			name, topic string
			payload     []byte
			reason      string
		}{
			{"replayed as is", "secure/door", captured, proxy.DropReplay},
			{"tampered tag", "secure/door", flip(len(captured) - 1), proxy.DropAuth},
			{"tampered ciphertext", "secure/door", flip(envelope.HeaderLen + 1), proxy.DropAuth},
			{"tampered sequence number", "secure/door", flip(envelope.HeaderLen - 2), proxy.DropAuth},
			{"tampered retain flag", "secure/door", flip(1), proxy.DropAuth},
			{"moved to another topic", "secure/window", captured, proxy.DropAuth},
			{"truncated", "secure/door", captured[:envelope.Overhead-1], proxy.DropMalformed},
			{"empty", "secure/door", nil, proxy.DropMalformed},
			{"plaintext injected", "secure/door", []byte("open sesame, says the broker"), proxy.DropMalformed},
			{"unknown epoch", "secure/door", otherEpoch, proxy.DropUnknownKey},
			{"sealed under another key", "secure/door", wrong, proxy.DropAuth},
			{"future version", "secure/door", append([]byte{2}, captured[1:]...), proxy.DropVersion},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				before := b.DropCounts()["in/"+c.reason]
				must(t, evil.Publish(c.topic, 1, false, c.payload))
				waitFor(t, func() bool { return b.DropCounts()["in/"+c.reason] == before+1 },
					"drop counted as %s", c.reason)
				expectNone(t, sub, 50*time.Millisecond)
			})
		}

		t.Run("replay to a restarted sidecar delivers nothing", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			must(t, b.Close(ctx))
			b2 := r.sidecar(bName, bDir)
			sub2 := r.app(b2, uniq("sub2"))
			must(t, sub2.Subscribe("secure/#", 1))
			must(t, evil.Publish("secure/door", 1, false, captured))
			waitFor(t, func() bool { return b2.DropCounts()["in/"+proxy.DropReplay] == 1 }, "replay after restart counted")
			expectNone(t, sub2, 200*time.Millisecond)
			// and fresh traffic still flows
			must(t, pub.Publish("secure/door", 1, false, []byte("new")))
			expect(t, sub2, "secure/door", "new")
		})
	})
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: "+format, args...)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
