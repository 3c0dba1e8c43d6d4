package keyserver_test

import (
	"errors"
	"testing"
	"time"

	"github.com/smqtt/smqtt/gkd"
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
