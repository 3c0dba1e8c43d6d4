package keyserver_test

import (
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
)

// TestJoinRefusals: only members the configuration allows get a key. A known
// member outside the group gets a signed refusal; an unknown identity and a
// member using the wrong key get nothing at all.
func TestJoinRefusals(t *testing.T) {
	f := newFleet(t, "update", []string{"a"}, "outsider")

	n, err := f.KeyClient("outsider", nil, 5*time.Second)
	ring := n.Ring
	if !errors.Is(err, keyclient.ErrRefused) {
		t.Fatalf("member outside the group: got %v, want a refusal", err)
	}
	if _, err := ring.Sealer(fleet.Group); err == nil {
		t.Fatal("refused member holds a key")
	}

	n, err = f.KeyClient("stranger", newIdentity(t), 1500*time.Millisecond)
	ring = n.Ring
	if err == nil || errors.Is(err, keyclient.ErrRefused) {
		t.Fatalf("unknown identity: got %v, want no answer", err)
	}
	if !emptyRing(ring) {
		t.Fatal("unknown identity holds a key")
	}

	n, err = f.KeyClient("a", newIdentity(t), 1500*time.Millisecond) // a's name, another key
	ring = n.Ring
	if err == nil {
		t.Fatal("a member with the wrong key joined")
	}
	if !emptyRing(ring) {
		t.Fatal("wrong-key member holds a key")
	}
}

func emptyRing(r *keyclient.Ring) bool {
	for e := uint32(0); e < 8; e++ {
		if _, ok := r.GroupKey(fleet.Group, e); ok {
			return false
		}
	}
	return true
}

// TestForgedAndReplayedKeyMessages: a rekey signed by anyone but the pinned
// key server, and an old rekey replayed by the broker, change nothing; a
// replayed join request gets no answer.
func TestForgedAndReplayedKeyMessages(t *testing.T) {
	f := newFleet(t, "update", []string{"a", "b", "c"})
	a := f.join("a")
	evil, err := mqtttest.Connect(f.up.URL(), "evil", mqtttest.AppOptions{})
	must(t, err)
	defer evil.Close()
	aID := f.Members["a"].Public().RawID()
	memberTopic := gkd.MemberTopic("smqtt/v1", aID)
	epoch := a.Epoch()

	t.Run("forged rekey signed by another key", func(t *testing.T) {
		mallory := newIdentity(t)
		body := gkd.Rekey{Group: gkd.GroupID(f.Server.Public().RawID(), fleet.Group), Epoch: epoch + 50, Counter: 1 << 40, ActivateAt: time.Now()}
		forged, err := gkd.SealedMessage(mallory, f.Members["a"].Public(), gkd.TypeRekey, body)
		must(t, err)
		must(t, evil.Publish(memberTopic, 1, false, forged))
		time.Sleep(300 * time.Millisecond)
		if _, ok := a.Ring.GroupKey(fleet.Group, epoch+50); ok {
			t.Fatal("a forged rekey was installed")
		}
	})

	t.Run("replayed old rekey", func(t *testing.T) {
		b := f.join("b") // rekey 1
		e1 := settle(t, a, b)
		old := f.capturedAll(memberTopic)
		c := f.join("c") // rekey 2
		e2 := settle(t, a, b, c)
		if e2 <= e1 {
			t.Fatalf("no rekey: %d then %d", e1, e2)
		}
		a.Ring.Retire(fleet.Group, e1) // so a reinstall of the replayed epoch would show
		for _, m := range old {
			must(t, evil.Publish(memberTopic, 1, false, m))
		}
		time.Sleep(500 * time.Millisecond)
		if _, ok := a.Ring.GroupKey(fleet.Group, e1); ok {
			t.Fatal("a replayed old rekey was installed")
		}
		if a.Epoch() != e2 {
			t.Fatalf("a seals with epoch %d after the replay, want %d", a.Epoch(), e2)
		}
	})

	t.Run("replayed join request", func(t *testing.T) {
		reqs := f.capturedAll(gkd.RequestTopic("smqtt/v1", f.Server.Public().RawID(), aID))
		before := len(f.capturedAll(memberTopic))
		for _, r := range reqs {
			must(t, evil.Publish(gkd.RequestTopic("smqtt/v1", f.Server.Public().RawID(), aID), 1, false, r))
		}
		time.Sleep(500 * time.Millisecond)
		for _, m := range f.capturedAll(memberTopic)[before:] {
			if msg, err := gkd.Parse(m); err == nil && msg.Type == gkd.TypeJoinResponse {
				t.Fatal("the key server answered a replayed join request")
			}
		}
	})
}

func newIdentity(t *testing.T) *gkd.Identity {
	t.Helper()
	id, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	must(t, err)
	return id
}

// TestWillOfLiveMemberAndReplayedWill: a member whose connection drops but
// who is still alive answers the key server's challenge and is not removed;
// the broker replaying that Will later changes nothing either.
func TestWillOfLiveMemberAndReplayedWill(t *testing.T) {
	f := newFleet(t, "update", []string{"a", "b"})
	a, b := f.join("a"), f.join("b")
	epoch := settle(t, a, b)
	reqTopic := gkd.RequestTopic("smqtt/v1", f.Server.Public().RawID(), f.Members["a"].Public().RawID())

	a.Relay.Cut() // the broker publishes a's Will; a reconnects and answers the challenge
	waitFor(t, func() bool { return len(willsOn(f, reqTopic)) == 1 }, "the broker published a's Will")
	time.Sleep(3 * f.Opts.LeaveDelay)
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != epoch {
		t.Fatalf("a live member was removed after its Will: epoch %d -> %d", epoch, e)
	}

	evil, err := mqtttest.Connect(f.up.URL(), "evil", mqtttest.AppOptions{})
	must(t, err)
	defer evil.Close()
	must(t, evil.Publish(reqTopic, 1, false, willsOn(f, reqTopic)[0]))
	time.Sleep(3 * f.Opts.LeaveDelay)
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != epoch {
		t.Fatalf("a replayed Will removed a member: epoch %d -> %d", epoch, e)
	}
	must(t, b.App.Subscribe("secure/#", 1))
	must(t, a.App.Publish("secure/still", 1, false, []byte("here")))
	expect(t, b.App, "secure/still", "here")
}

// willsOn returns the Will messages the broker published on topic.
func willsOn(f *testFleet, topic string) [][]byte {
	var out [][]byte
	for _, m := range f.capturedAll(topic) {
		if msg, err := gkd.Parse(m); err == nil && msg.Type == gkd.TypeLeave {
			if lv, err := gkd.ParseLeave(msg.Body); err == nil && lv.Reason == gkd.LeaveWill {
				out = append(out, m)
			}
		}
	}
	return out
}

// TestStaleKeysStopSealing: when the key server's signed heartbeats stop
// (the server is gone, or a broker withholds them to hide a rekey), a
// sidecar stops sealing after max_staleness and starts again once fresh
// heartbeats return.
func TestStaleKeysStopSealing(t *testing.T) {
	f := newFleet(t, "update", []string{"a"})
	a := f.join("a")
	settle(t, a)
	must(t, f.KS.Close()) // heartbeats stop
	waitFor(t, func() bool {
		_, err := a.Ring.Sealer(fleet.Group)
		return errors.Is(err, keyclient.ErrStale)
	}, "sealing stops for lack of heartbeats")
	must(t, a.App.Publish("secure/stale", 0, false, []byte("STALE-SECRET")))
	time.Sleep(100 * time.Millisecond)
	if f.up.Spy.Contains([]byte("STALE-SECRET")) {
		t.Fatal("plaintext on the wire")
	}
	for _, s := range f.up.Spy.All() {
		if s.Topic == "secure/stale" {
			t.Fatal("a message was sealed with a stale key")
		}
	}
	must(t, f.StartServer())
	waitFor(t, func() bool { _, err := a.Ring.Sealer(fleet.Group); return err == nil }, "sealing resumes with fresh heartbeats")
}

// TestRequestsAreRateLimitedPerIdentity: a member flooding the key server
// with (validly signed, fresh) requests gets the excess dropped and counted;
// another member is still served.
func TestRequestsAreRateLimitedPerIdentity(t *testing.T) {
	reg := prometheus.NewRegistry()
	up, err := embedded.Start(embedded.Options{})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	fl, err := fleet.New(fleet.Options{UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: t.TempDir(), Members: []string{"flooder", "b"}, Registry: reg})
	must(t, err)
	t.Cleanup(fl.Close)
	f := &testFleet{Fleet: fl, t: t, up: up}
	flood, err := mqtttest.Connect(up.URL(), "flooder-raw", mqtttest.AppOptions{})
	must(t, err)
	defer flood.Close()
	server := f.Server.Public().RawID()
	topic := gkd.RequestTopic("smqtt/v1", server, f.Members["flooder"].Public().RawID())
	for i := 0; i < 200; i++ {
		msg, err := gkd.PlainMessage(f.Members["flooder"], server, gkd.TypeRegister, gkd.Register{})
		must(t, err)
		flood.Client.Publish(topic, 1, false, msg)
	}
	waitFor(t, func() bool { return dropped(t, reg, "rate") >= 100 }, "flood rate-limited (dropped %v)", dropped(t, reg, "rate"))
	b := f.join("b") // others are still served
	settle(t, b)
}

func dropped(t *testing.T, reg *prometheus.Registry, reason string) float64 {
	mfs, err := reg.Gather()
	must(t, err)
	for _, mf := range mfs {
		if mf.GetName() != "smqtt_keyserver_dropped_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
