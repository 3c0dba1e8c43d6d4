package keyclient

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/smqtt/smqtt/gkd"
)

// rawBody is a body sent as it is, well formed or not.
type rawBody []byte

func (b rawBody) MarshalBinary() ([]byte, error) { return b, nil }

// ownSender is the sender id the test join responses hand out.
const ownSender = 9

// entry certifies sender for identity id.
func entry(sender uint64, id *gkd.Identity) gkd.RosterEntry {
	return gkd.RosterEntry{Sender: sender, Member: id.Public().RawID(), Key: id.Public().SigningKey()}
}

// joinSenderAuth answers the client's join of an update group with
// sender_auth on and roster version v.
func (s *testClient) joinSenderAuth(t *testing.T, v uint64) {
	t.Helper()
	s.c.join("g")
	s.respond(t, time.Now(), gkd.JoinResponse{Scheme: gkd.SchemeUpdate, Epoch: 1, Sender: ownSender, Key: [32]byte{1}, Counter: 10,
		Flags: gkd.FlagSenderAuth, Roster: v})
}

// roster sends the client one roster part signed by by, addressed to to
// (zero: broadcast).
func (s *testClient) roster(t *testing.T, by *gkd.Identity, to [8]byte, r gkd.Roster) {
	t.Helper()
	r.Group = gkd.GroupID(s.server.Public().RawID(), "g")
	if r.Parts == 0 {
		r.Parts = 1
	}
	msg, err := gkd.PlainMessage(by, to, gkd.TypeRoster, r)
	if err != nil {
		t.Fatal(err)
	}
	s.c.onMessage(msg)
}

// heartbeat sends the client a heartbeat of epoch 1 naming roster v.
func (s *testClient) heartbeat(t *testing.T, counter, v uint64) {
	t.Helper()
	msg, err := gkd.PlainMessage(s.server, [8]byte{}, gkd.TypeHeartbeat,
		gkd.Heartbeat{Group: gkd.GroupID(s.server.Public().RawID(), "g"), Epoch: 1, Counter: counter, Roster: v})
	if err != nil {
		t.Fatal(err)
	}
	s.c.onMessage(msg)
}

func (s *testClient) rosterVersion() uint64 {
	v, _ := s.c.opts.Ring.RosterVersion("g")
	return v
}

func (s *testClient) outstandingJoins() int {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return len(s.c.joins)
}

func newIdentity(t *testing.T) *gkd.Identity {
	t.Helper()
	id, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// The ring learns that a group is sender_auth from its join response,
// before any key; the group counts as joined, and the ring signs for it,
// only once the whole roster version the response named is installed and
// lists this member's sender id under its own key. A roster that arrives
// before the join response is not taken.
func TestRosterMakesASenderAuthGroupJoined(t *testing.T) {
	s := newTestClient(t)
	other := newIdentity(t)
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 5, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})
	if _, ok := s.c.opts.Ring.RosterVersion("g"); ok {
		t.Fatal("a roster was installed before any join response made the group sender_auth")
	}
	s.joinSenderAuth(t, 5)
	if !s.c.opts.Ring.SenderAuth("g") {
		t.Fatal("the ring holds the group's key without knowing it is sender_auth")
	}
	if s.c.Status()[0].Joined {
		t.Fatal("joined without a roster")
	}
	if _, err := s.c.opts.Ring.ProofSigner("g"); err == nil {
		t.Fatal("the ring signs before the roster lists its sender id")
	}
	me := s.me.Public().RawID()
	s.roster(t, s.server, me, gkd.Roster{Version: 5, Part: 1, Parts: 2, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})
	if _, ok := s.c.opts.Ring.RosterVersion("g"); ok || s.c.Status()[0].Joined {
		t.Fatal("half a roster was installed")
	}
	s.roster(t, s.server, me, gkd.Roster{Version: 5, Part: 0, Parts: 2, Senders: []gkd.RosterEntry{entry(3, other)}})
	if s.rosterVersion() != 5 {
		t.Fatalf("roster version %d installed, want 5", s.rosterVersion())
	}
	want := other.Public().SigningKey()
	if k, ok := s.c.opts.Ring.SenderKey("g", 3); !ok || !bytes.Equal(k, want[:]) {
		t.Fatal("the other part's sender is not listed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := s.c.WaitJoined(ctx); err != nil {
		t.Fatalf("not joined with the whole roster: %v", err)
	}
	if _, err := s.c.opts.Ring.ProofSigner("g"); err != nil {
		t.Fatalf("the ring does not sign with the roster installed: %v", err)
	}
}

// A roster that lists this member's sender id under another key does not
// make the group joined.
func TestRosterWithAnotherKeyForOwnSenderIsNotEnough(t *testing.T) {
	s := newTestClient(t)
	s.joinSenderAuth(t, 5)
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 5, Senders: []gkd.RosterEntry{entry(ownSender, newIdentity(t))}})
	if s.rosterVersion() != 5 {
		t.Fatalf("roster version %d installed, want 5", s.rosterVersion())
	}
	if s.c.Status()[0].Joined {
		t.Fatal("joined on a roster that certifies another key for this member's sender id")
	}
}

// Only the pinned key server's rosters count; a replayed older version, or
// one older than the join response named, never rolls the ring back, and a
// malformed roster is dropped.
func TestRosterRefusesForgedOldAndMalformedRosters(t *testing.T) {
	s := newTestClient(t)
	forger := newIdentity(t)
	s.joinSenderAuth(t, 5)
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 4, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})
	if _, ok := s.c.opts.Ring.RosterVersion("g"); ok {
		t.Fatal("a version older than the join response named was installed")
	}
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 5, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})

	// signed by another identity, under its own id or the key server's
	s.roster(t, forger, [8]byte{}, gkd.Roster{Version: 6, Senders: []gkd.RosterEntry{entry(ownSender, s.me), entry(7, forger)}})
	// the key server's roster with a sender's key swapped for the forger's
	forged, err := gkd.PlainMessage(s.server, [8]byte{}, gkd.TypeRoster, gkd.Roster{
		Group: gkd.GroupID(s.server.Public().RawID(), "g"), Version: 6, Parts: 1,
		Senders: []gkd.RosterEntry{entry(ownSender, s.me), entry(7, s.me)}})
	if err != nil {
		t.Fatal(err)
	}
	mine, theirs := s.me.Public().SigningKey(), forger.Public().SigningKey()
	at := bytes.LastIndex(forged, mine[:])
	copy(forged[at:], theirs[:])
	s.c.onMessage(forged)
	if s.rosterVersion() != 5 {
		t.Fatalf("a forged roster was installed: version %d", s.rosterVersion())
	}
	if _, ok := s.c.opts.Ring.SenderKey("g", 7); ok {
		t.Fatal("the forger's sender id is listed")
	}

	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 7, Senders: []gkd.RosterEntry{entry(ownSender, s.me), entry(8, forger)}})
	for _, v := range []uint64{5, 6} { // replays
		s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: v, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})
	}
	if s.rosterVersion() != 7 {
		t.Fatalf("a replayed roster rolled the ring back to version %d", s.rosterVersion())
	}
	if _, ok := s.c.opts.Ring.SenderKey("g", 8); !ok {
		t.Fatal("version 7's sender was dropped by a replay")
	}
	if n := s.c.state["g"].rostersIgnored; n != 3 { // version 4 before version 5, then 5 and 6
		t.Fatalf("%d old rosters counted, want 3", n)
	}

	gid := gkd.GroupID(s.server.Public().RawID(), "g")
	for _, bad := range []rawBody{
		nil,
		append(gid[:], make([]byte, 14)...), // part 0 of 0
		append(append(gid[:], 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 2), 1), // count 2, truncated
		append(append(gid[:], 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0), 1), // trailing byte
	} {
		msg, err := gkd.PlainMessage(s.server, [8]byte{}, gkd.TypeRoster, bad)
		if err != nil {
			t.Fatal(err)
		}
		s.c.onMessage(msg)
	}
	// parts that disagree on how many there are, and too many parts
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 9, Part: 0, Parts: 2, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 9, Part: 1, Parts: 3})
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 10, Part: 0, Parts: maxRosterParts + 1})
	if s.rosterVersion() != 7 {
		t.Fatalf("a malformed roster was installed: version %d", s.rosterVersion())
	}
}

// A partial version is dropped once a newer version starts arriving.
func TestRosterDropsAnOlderPartialVersion(t *testing.T) {
	s := newTestClient(t)
	s.joinSenderAuth(t, 5)
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 5, Part: 0, Parts: 2, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 6, Part: 0, Parts: 2, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 5, Part: 1, Parts: 2})
	if _, ok := s.c.opts.Ring.RosterVersion("g"); ok {
		t.Fatal("a version was installed from parts of two versions")
	}
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 6, Part: 1, Parts: 2})
	if s.rosterVersion() != 6 {
		t.Fatalf("roster version %d installed, want 6", s.rosterVersion())
	}
}

// A heartbeat that names a roster version newer than the member knows, or
// that says the group switched sender_auth, makes it join again, once until
// the join is answered; one naming the version it has, or the one its join
// response named and still on its way, does not.
func TestHeartbeatWithANewerRosterRejoins(t *testing.T) {
	s := newTestClient(t)
	s.joinSenderAuth(t, 5)
	s.heartbeat(t, 11, 5) // the unicast copy of version 5 is still on its way
	if n := s.outstandingJoins(); n != 0 {
		t.Fatalf("%d joins after a heartbeat naming the version being delivered", n)
	}
	s.roster(t, s.server, [8]byte{}, gkd.Roster{Version: 5, Senders: []gkd.RosterEntry{entry(ownSender, s.me)}})
	s.heartbeat(t, 12, 5)
	if n := s.outstandingJoins(); n != 0 {
		t.Fatalf("%d joins after a heartbeat naming the installed version", n)
	}
	s.heartbeat(t, 13, 6)
	waitJoins(t, s, 1)
	s.heartbeat(t, 14, 7)
	time.Sleep(50 * time.Millisecond)
	if n := s.outstandingJoins(); n != 1 {
		t.Fatalf("%d joins outstanding after two heartbeats, want 1 (a rejoin is not repeated before its answer)", n)
	}

	// a member that joined without sender_auth learns that it was switched on
	s2 := newTestClient(t)
	s2.answerUpdateJoin(t)
	s2.heartbeat(t, 2, 0)
	if n := s2.outstandingJoins(); n != 0 {
		t.Fatalf("%d joins after a heartbeat of a group without sender_auth", n)
	}
	s2.heartbeat(t, 3, 4)
	waitJoins(t, s2, 1)
}

// answerUpdateJoin joins an update group without sender_auth.
func (s *testClient) answerUpdateJoin(t *testing.T) {
	t.Helper()
	s.c.join("g")
	s.answerUpdate(t, 1, [32]byte{1})
	if s.c.opts.Ring.SenderAuth("g") || !s.c.Status()[0].Joined {
		t.Fatal("a group without sender_auth is not simply joined")
	}
}

func waitJoins(t *testing.T, s *testClient, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for s.outstandingJoins() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%d joins outstanding, want %d; log:\n%s", s.outstandingJoins(), want, s.log)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
