package keyserver_test

import (
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/internal/mosquitto"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/proxy"
)

// TestSenderAuthThroughMosquitto runs a sender_auth group of every scheme
// end to end on Mosquitto, with the key server's rosters: while one member
// streams to another, a third member (it holds the group key) forges the
// first's messages; none is delivered, each is counted under sender_auth,
// and the stream arrives whole and in order. Revoked by the key server,
// the forger keeps its keys and signs as itself: refused too.
func TestSenderAuthThroughMosquitto(t *testing.T) {
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed (.ci/run installs it)")
	}
	for _, scheme := range []string{"update", "lkh", "slotted", "static"} {
		t.Run(scheme, func(t *testing.T) {
			up, err := mosquitto.Start(t.TempDir())
			must(t, err)
			t.Cleanup(func() { up.Close() })
			f, err := fleet.New(fleet.Options{
				UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: t.TempDir(), Scheme: scheme, SenderAuth: true,
				Members: []string{"a", "b", "rogue"},
				Slot:    2 * time.Second, MemberInterval: time.Minute, SkewSlots: 1,
			})
			must(t, err)
			t.Cleanup(f.Close)
			a, err := f.Join("a")
			must(t, err)
			b, err := f.Join("b")
			must(t, err)
			rogue, err := f.KeyClient("rogue", nil, 15*time.Second)
			must(t, err)
			if _, err := fleet.Settle(15*time.Second, a, b, rogue); err != nil {
				t.Fatal(err)
			}
			must(t, b.App.Subscribe("secure/#", 1))
			wire, err := mqtttest.Connect(up.URL(), "rogue-raw", mqtttest.AppOptions{})
			must(t, err)
			defer wire.Close()

			const n = 200
			done := stream(t, a.App, "secure/stream", n, 2*time.Millisecond)

			forge := func(sender uint64, topic, plain string) []byte {
				t.Helper()
				own, err := rogue.Ring.Sealer(fleet.Group)
				must(t, err)
				key, ok := rogue.Ring.GroupKey(fleet.Group, own.Epoch())
				if !ok {
					t.Fatal("the rogue holds no key")
				}
				s, err := envelope.NewSealer(fleet.Group, own.Epoch(), key, sender)
				must(t, err)
				env, err := s.SealSeq(nil, topic, envelope.FlagProof, 1<<40+uint64(time.Now().UnixNano()%(1<<30)), []byte(plain))
				must(t, err)
				items := []envelope.BatchItem{{Topic: topic, Env: env}}
				must(t, envelope.ProveBatch(fleet.Group, f.Members["rogue"], items))
				return items[0].Env
			}
			victim, err := a.Ring.Sealer(fleet.Group)
			must(t, err)
			drops := func() int { return b.Side.DropCounts()["in/"+proxy.DropSenderAuth] }
			for i := range 5 {
				must(t, wire.Publish("secure/stream", 1, false, forge(victim.Sender(), "secure/stream", "forged")))
				waitFor(t, func() bool { return drops() == i+1 }, "forgery %d counted", i+1)
			}
			done()
			expectStream(t, b.App, "secure/stream", n)

			own, err := rogue.Ring.Sealer(fleet.Group)
			must(t, err)
			(&testFleet{Fleet: f, t: t}).revoke("a", "b")
			waitFor(t, func() bool {
				_, listed := b.Ring.SenderKey(fleet.Group, own.Sender())
				return !listed
			}, "the roster without the rogue installed")
			must(t, wire.Publish("secure/stream", 1, false, forge(own.Sender(), "secure/stream", "as myself")))
			waitFor(t, func() bool { return drops() == 6 }, "the revoked member's message counted")
			if m, ok := b.App.Next(200 * time.Millisecond); ok {
				t.Fatalf("delivered %s %q", m.Topic, m.Payload)
			}
		})
	}
}
