package keyserver_test

import (
	"errors"
	"testing"
	"time"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
)

// TestJoinRefusals: only members the configuration allows get a key. A known
// member outside the group gets a signed refusal; an unknown identity and a
// member using the wrong key get nothing at all.
func TestJoinRefusals(t *testing.T) {
	f := newFleet(t, "update", []string{"a"}, "outsider")

	_, ring, _, err := f.keyClient("outsider", nil, 5*time.Second)
	if !errors.Is(err, keyclient.ErrRefused) {
		t.Fatalf("member outside the group: got %v, want a refusal", err)
	}
	if _, err := ring.Sealer("demo"); err == nil {
		t.Fatal("refused member holds a key")
	}

	_, ring, _, err = f.keyClient("stranger", newIdentity(t), 1500*time.Millisecond)
	if err == nil || errors.Is(err, keyclient.ErrRefused) {
		t.Fatalf("unknown identity: got %v, want no answer", err)
	}
	if !emptyRing(ring) {
		t.Fatal("unknown identity holds a key")
	}

	_, ring, _, err = f.keyClient("a", newIdentity(t), 1500*time.Millisecond) // a's name, another key
	if err == nil {
		t.Fatal("a member with the wrong key joined")
	}
	if !emptyRing(ring) {
		t.Fatal("wrong-key member holds a key")
	}
}

func emptyRing(r *keyclient.Ring) bool {
	for e := uint32(0); e < 8; e++ {
		if _, ok := r.GroupKey("demo", e); ok {
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
	aID := f.members["a"].Public().RawID()
	memberTopic := gkd.MemberTopic("smqtt/v1", aID)
	epoch := a.epoch()

	t.Run("forged rekey signed by another key", func(t *testing.T) {
		mallory := newIdentity(t)
		body := gkd.Rekey{Group: gkd.GroupID(f.server.Public().RawID(), "demo"), Epoch: epoch + 50, Counter: 1 << 40, ActivateAt: time.Now()}
		forged, err := gkd.SealedMessage(mallory, f.members["a"].Public(), gkd.TypeRekey, body)
		must(t, err)
		must(t, evil.Publish(memberTopic, 1, false, forged))
		time.Sleep(300 * time.Millisecond)
		if _, ok := a.ring.GroupKey("demo", epoch+50); ok {
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
		a.ring.Retire("demo", e1) // so a reinstall of the replayed epoch would show
		for _, m := range old {
			must(t, evil.Publish(memberTopic, 1, false, m))
		}
		time.Sleep(500 * time.Millisecond)
		if _, ok := a.ring.GroupKey("demo", e1); ok {
			t.Fatal("a replayed old rekey was installed")
		}
		if a.epoch() != e2 {
			t.Fatalf("a seals with epoch %d after the replay, want %d", a.epoch(), e2)
		}
	})

	t.Run("replayed join request", func(t *testing.T) {
		reqs := f.capturedAll(gkd.RequestTopic("smqtt/v1", f.server.Public().RawID(), aID))
		before := len(f.capturedAll(memberTopic))
		for _, r := range reqs {
			must(t, evil.Publish(gkd.RequestTopic("smqtt/v1", f.server.Public().RawID(), aID), 1, false, r))
		}
		time.Sleep(500 * time.Millisecond)
		for _, m := range f.capturedAll(memberTopic)[before:] {
			if msg, err := gkd.Parse(m); err == nil && msg.Type == gkd.TypeJoinResponse {
				t.Fatal("the key server answered a replayed join request")
			}
		}
	})
}

// capturedAll returns every payload the broker saw on topic, oldest first.
func (f *fleet) capturedAll(topic string) [][]byte {
	var out [][]byte
	for _, s := range f.up.Spy.All() {
		if s.Topic == topic {
			out = append(out, s.Payload)
		}
	}
	return out
}
