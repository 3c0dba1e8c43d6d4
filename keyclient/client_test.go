package keyclient

import (
	"crypto/rand"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/syncbuf"
)

// testClient is a key client with no connection, a key server identity
// to answer it, and its log.
type testClient struct {
	c      *Client
	server *gkd.Identity
	me     *gkd.Identity
	log    *syncbuf.Buffer
}

func newTestClient(t *testing.T) *testClient {
	t.Helper()
	server, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	if err != nil {
		t.Fatal(err)
	}
	me, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	if err != nil {
		t.Fatal(err)
	}
	log := &syncbuf.Buffer{}
	c, err := NewClient(ClientOptions{
		Identity: me, Server: server.Public(), Groups: []string{"g"}, Ring: NewRing(),
		Logger: slog.New(slog.NewTextHandler(log, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Abandon)
	close(c.done) // never started: Abandon must not wait for a run loop
	return &testClient{c: c, server: server, me: me, log: log}
}

// answer sends the client a join response for its outstanding request,
// stamped with the key server's clock serverNow and granting slots first to
// last of 1 s slots from origin.
func (s *testClient) answer(t *testing.T, serverNow, origin time.Time, first, last uint64, k2 [32]byte) {
	t.Helper()
	covers, err := gkd.SlotCovers(16, first, last, func(uint32) ([32]byte, error) { return [32]byte{7}, nil })
	if err != nil {
		t.Fatal(err)
	}
	ext, err := gkd.SlotGrant{Origin: origin, Slot: time.Second, Depth: 16, Skew: 1, First: first, Last: last, Covers: covers}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	s.respond(t, serverNow, gkd.JoinResponse{Scheme: gkd.SchemeSlotted, Epoch: 1, Sender: 9, Key: k2, Counter: 1, Ext: ext})
}

// respond sends the client r, sealed and signed by the key server, as the
// answer to its outstanding join request, with the header time serverNow.
func (s *testClient) respond(t *testing.T, serverNow time.Time, r gkd.JoinResponse) {
	t.Helper()
	s.c.mu.Lock()
	for n := range s.c.joins {
		r.RequestNonce = n
	}
	s.c.mu.Unlock()
	r.Group = gkd.GroupID(s.server.Public().RawID(), "g")
	body, err := r.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	h := gkd.Header{Type: gkd.TypeJoinResponse, Sender: s.server.Public().RawID(), Recipient: s.me.Public().RawID(), Time: serverNow.Truncate(time.Millisecond)}
	rand.Read(h.Nonce[:])
	ct, err := gkd.Seal(s.me.Public(), h, body)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := gkd.Build(s.server, h, ct)
	if err != nil {
		t.Fatal(err)
	}
	s.c.onMessage(msg)
}

// answerUpdate answers the outstanding join of an update group with epoch
// and key.
func (s *testClient) answerUpdate(t *testing.T, epoch uint32, key [32]byte) {
	t.Helper()
	s.respond(t, time.Now(), gkd.JoinResponse{Scheme: gkd.SchemeUpdate, Epoch: epoch, Sender: uint64(epoch), Key: key, Counter: uint64(epoch)})
}

// A member whose clock is an hour behind the key server's seals under the
// server's current slot: it takes the server's time from the join response
// (corrected by half the round trip), not its own.
func TestSlottedClientFollowsTheKeyServersClock(t *testing.T) {
	s := newTestClient(t)
	s.c.join("g")
	serverNow := time.Now().Add(time.Hour)
	origin := serverNow.Add(-10*time.Second - 500*time.Millisecond).Truncate(time.Millisecond) // server is in slot 10
	s.answer(t, serverNow, origin, 10, 20, [32]byte{1})
	e, ok := s.c.opts.Ring.SendEpoch("g")
	if !ok {
		t.Fatalf("nothing to seal with; log:\n%s", s.log)
	}
	if want := gkd.SlotEpoch(1, 10); e != want {
		t.Fatalf("seals under epoch %#x, want %#x (generation 1, slot 10)", e, want)
	}
	for _, slot := range []uint64{9, 10, 11} {
		_, held := s.c.opts.Ring.GroupKey("g", gkd.SlotEpoch(1, slot))
		if want := slot >= 10; held != want { // slot 9 is not granted
			t.Errorf("slot %d held: %t, want %t", slot, held, want)
		}
	}
	if _, held := s.c.opts.Ring.GroupKey("g", gkd.SlotEpoch(1, 12)); held {
		t.Error("slot 12 is held: only the skew window (one slot either side) should be")
	}
}

// A time sample whose round trip exceeds half the skew window is refused:
// nothing is installed (fail closed), the request stays outstanding for a
// retry, and the log says why.
func TestSlottedClientRefusesAnUncertainTimeSample(t *testing.T) {
	s := newTestClient(t)
	s.c.join("g")
	s.c.mu.Lock()
	for n := range s.c.sentAt {
		s.c.sentAt[n] = time.Now().Add(-2 * time.Second) // limit: max(1, skew 1) × 1 s / 2
	}
	s.c.mu.Unlock()
	now := time.Now()
	s.answer(t, now, now.Add(-5*time.Second).Truncate(time.Millisecond), 5, 20, [32]byte{1})
	if _, ok := s.c.opts.Ring.SendEpoch("g"); ok {
		t.Fatal("a key was installed from an uncertain time sample")
	}
	if st := s.c.Status()[0]; st.Joined {
		t.Fatal("joined on an uncertain time sample")
	}
	if !strings.Contains(s.log.String(), "time sample refused") {
		t.Fatalf("log does not say why:\n%s", s.log)
	}
}

// A message for a slot outside the window is explained in the log: its
// slot, the current slot and what is accepted.
func TestSlottedClientLogsMessagesOutsideItsWindow(t *testing.T) {
	s := newTestClient(t)
	s.c.join("g")
	now := time.Now()
	s.answer(t, now, now.Add(-5*time.Second-500*time.Millisecond).Truncate(time.Millisecond), 5, 200, [32]byte{1})
	if _, ok := s.c.opts.Ring.GroupKey("g", gkd.SlotEpoch(1, 100)); ok {
		t.Fatal("slot 100 is held, 95 slots ahead of now")
	}
	log := s.log.String()
	for _, want := range []string{"outside this sidecar's slot window", "slot=100", "current_slot=5", "accepted=4-6"} {
		if !strings.Contains(log, want) {
			t.Fatalf("log lacks %q:\n%s", want, log)
		}
	}
}

// A member that rejoins to catch up on a rekey it missed (which may have
// been a revocation) keeps the superseded epoch only for max_staleness, not
// until it restarts: a revoked member cannot inject under it for long.
func TestCatchUpJoinRetiresTheSupersededEpoch(t *testing.T) {
	s := newTestClient(t)
	s.c.opts.MaxStaleness = 300 * time.Millisecond
	s.c.join("g")
	s.answerUpdate(t, 1, [32]byte{1})
	s.c.join("g") // a heartbeat named epoch 2: catch up
	s.answerUpdate(t, 2, [32]byte{2})
	if e, _ := s.c.opts.Ring.SendEpoch("g"); e != 2 {
		t.Fatalf("seals under epoch %d after the catch-up join, want 2", e)
	}
	if _, ok := s.c.opts.Ring.GroupKey("g", 1); !ok {
		t.Fatal("epoch 1 retired at once: what the broker queued under it could not be read")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := s.c.opts.Ring.GroupKey("g", 1); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the superseded epoch 1 is still open long after max_staleness")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, ok := s.c.opts.Ring.GroupKey("g", 2); !ok {
		t.Fatal("the current epoch was retired")
	}
}
