package keyclient

import (
	"bytes"
	"crypto/rand"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smqtt/smqtt/gkd"
)

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// slottedClient is a key client with no connection, a key server identity
// to answer it, and its log.
type slottedClient struct {
	c      *Client
	server *gkd.Identity
	me     *gkd.Identity
	log    *syncBuffer
}

func newSlottedClient(t *testing.T) *slottedClient {
	t.Helper()
	server, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	if err != nil {
		t.Fatal(err)
	}
	me, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	if err != nil {
		t.Fatal(err)
	}
	log := &syncBuffer{}
	c, err := NewClient(ClientOptions{
		Identity: me, Server: server.Public(), Groups: []string{"g"}, Ring: NewRing(),
		Logger: slog.New(slog.NewTextHandler(log, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Abandon)
	close(c.done) // never started: Abandon must not wait for a run loop
	return &slottedClient{c: c, server: server, me: me, log: log}
}

// answer sends the client a join response for its outstanding request,
// stamped with the key server's clock serverNow and granting slots first to
// last of 1 s slots from origin.
func (s *slottedClient) answer(t *testing.T, serverNow, origin time.Time, first, last uint64, k2 [32]byte) {
	t.Helper()
	var nonce [16]byte
	s.c.mu.Lock()
	for n := range s.c.joins {
		nonce = n
	}
	s.c.mu.Unlock()
	covers, err := gkd.SlotCovers(16, first, last, func(uint32) ([32]byte, error) { return [32]byte{7}, nil })
	if err != nil {
		t.Fatal(err)
	}
	ext, err := gkd.SlotGrant{Origin: origin, Slot: time.Second, Depth: 16, Skew: 1, First: first, Last: last, Covers: covers}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	body, err := gkd.JoinResponse{
		Group: gkd.GroupID(s.server.Public().RawID(), "g"), RequestNonce: nonce, Scheme: gkd.SchemeSlotted,
		Epoch: 1, Sender: 9, Key: k2, Counter: 1, Ext: ext,
	}.MarshalBinary()
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

// A member whose clock is an hour behind the key server's seals under the
// server's current slot: it takes the server's time from the join response
// (corrected by half the round trip), not its own.
func TestSlottedClientFollowsTheKeyServersClock(t *testing.T) {
	s := newSlottedClient(t)
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
	s := newSlottedClient(t)
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
	s := newSlottedClient(t)
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
