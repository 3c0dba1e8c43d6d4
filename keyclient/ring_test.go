package keyclient

import (
	"errors"
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
)

func TestRingMakeBeforeBreak(t *testing.T) {
	r := NewRing()
	var k1, k2 envelope.GroupKey
	k1[0], k2[0] = 1, 2
	if _, err := r.Sealer("g"); !errors.Is(err, ErrNoKey) {
		t.Fatalf("empty ring: %v, want ErrNoKey", err)
	}
	if err := r.Install("g", 1, k1, 7, true); err != nil {
		t.Fatal(err)
	}
	// a rekey installs epoch 2 for opening only
	if err := r.Install("g", 2, k2, 7, false); err != nil {
		t.Fatal(err)
	}
	if e, _ := r.SendEpoch("g"); e != 1 {
		t.Fatalf("seals with epoch %d before activation, want 1", e)
	}
	if _, ok := r.GroupKey("g", 2); !ok {
		t.Fatal("new epoch not open for receiving on arrival")
	}
	if err := r.Activate("g", 2); err != nil {
		t.Fatal(err)
	}
	s, err := r.Sealer("g")
	if err != nil || s.Epoch() != 2 || s.Sender() != 7 {
		t.Fatalf("after activation: %v %v", s, err)
	}
	r.Retire("g", 1)
	if _, ok := r.GroupKey("g", 1); ok {
		t.Fatal("retired epoch still opens")
	}
	r.Forget("g")
	if _, err := r.Sealer("g"); !errors.Is(err, ErrNoKey) {
		t.Fatal("forgotten group still seals")
	}
}

func TestRingStopsSealingWhenStale(t *testing.T) {
	r := NewRing()
	now := time.Unix(1000, 0)
	r.now = func() time.Time { return now }
	if err := r.Install("g", 1, envelope.GroupKey{1}, 1, true); err != nil {
		t.Fatal(err)
	}
	r.FreshUntil("g", now.Add(time.Minute))
	if _, err := r.Sealer("g"); err != nil {
		t.Fatal(err)
	}
	now = now.Add(2 * time.Minute)
	if _, err := r.Sealer("g"); !errors.Is(err, ErrStale) || !errors.Is(err, ErrNoKey) {
		t.Fatalf("stale ring: %v, want ErrStale (an ErrNoKey)", err)
	}
}

func TestStaticSenderIDsAreFreshPerStart(t *testing.T) {
	seen := map[uint64]bool{}
	for i := 0; i < 1000; i++ {
		r := NewRing()
		if err := r.AddStatic("g", envelope.GroupKey{1}); err != nil {
			t.Fatal(err)
		}
		s, _ := r.Sealer("g")
		if s.Sender() == 0 || seen[s.Sender()] {
			t.Fatalf("sender id %x zero or repeated", s.Sender())
		}
		seen[s.Sender()] = true
	}
}
