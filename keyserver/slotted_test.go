package keyserver_test

import (
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/keyserver"
)

// newSlottedFleet is a fleet of a slotted group with short slots and trees
// of four slots, so that tests cross slot and tree boundaries in seconds.
func newSlottedFleet(t *testing.T, slot, interval time.Duration, members ...string) *testFleet {
	t.Helper()
	return newFleetWith(t, fleet.Options{Scheme: "slotted", Members: members, Slot: slot, MemberInterval: interval, SkewSlots: 1, SlotDepth: 2})
}

// slotOf returns the absolute slot (mod 2^24) and K2 generation (mod 256)
// of an envelope.
func slotOf(t *testing.T, env []byte) (slot, gen uint32) {
	t.Helper()
	h, err := envelope.ParseHeader(env)
	must(t, err)
	return h.Epoch & (1<<gkd.SlotEpochBits - 1), h.Epoch >> gkd.SlotEpochBits
}

// TestSlottedStreamCrossesSlotsAndTrees: members of a slotted group exchange
// a QoS 1 stream across many slots and several trees (four slots each)
// without loss, with no rekey at all, and each holds only the keys of the
// slots within the skew window.
func TestSlottedStreamCrossesSlotsAndTrees(t *testing.T) {
	f := newSlottedFleet(t, 250*time.Millisecond, 10*time.Second, "a", "b")
	a, b := f.join("a"), f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))
	const n = 120
	stream(t, a.App, "secure/s", n, 25*time.Millisecond)()
	expectStream(t, b.App, "secure/s", n)
	slots := map[uint32]bool{}
	for _, env := range f.capturedAll("secure/s") {
		s, gen := slotOf(t, env)
		slots[s] = true
		if gen != 1 {
			t.Fatalf("generation %d on the wire, want 1: nothing was revoked", gen)
		}
	}
	trees := map[uint32]bool{}
	for s := range slots {
		trees[s>>2] = true
	}
	if len(slots) < 8 || len(trees) < 3 {
		t.Fatalf("the stream used %d slots in %d trees, want at least 8 in 3", len(slots), len(trees))
	}
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != 1 {
		t.Fatalf("K2 generation %d after joins only, want 1 (joins rekey nothing)", e)
	}
	// only the current slot and its neighbours are held
	held := 0
	for e := uint32(0); e < 1<<12; e++ {
		if _, ok := a.Ring.GroupKey(fleet.Group, 1<<gkd.SlotEpochBits|e); ok {
			held++
		}
	}
	if held > 3 {
		t.Fatalf("a holds %d slot keys, want at most 3 (skew 1)", held)
	}
}

// TestSlottedLeaveRefreshesK2: a member that leaves before its grant ends —
// by shutdown, by crashing (its Will) or revoked by a reload — holds covers
// for later slots, yet opens nothing sent after the K2 refresh; a QoS 1
// stream between the others crosses each refresh without loss.
func TestSlottedLeaveRefreshesK2(t *testing.T) {
	f := newSlottedFleet(t, 500*time.Millisecond, 30*time.Second, "a", "b", "shutdown", "crash", "revoked")
	a, b := f.join("a"), f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))
	leaves := []struct {
		name  string
		leave func(n *fleet.Node)
	}{
		{"shutdown", func(n *fleet.Node) { n.Keys.Close() }},
		{"crash", func(n *fleet.Node) { n.Crash() }},
		{"revoked", func(*fleet.Node) { f.revoke("a", "b", "shutdown", "crash") }},
	}
	for _, l := range leaves {
		t.Run(l.name, func(t *testing.T) {
			leaver := f.join(l.name)
			before, _ := f.KS.GroupEpoch(fleet.Group)
			const n = 200
			wait := stream(t, a.App, "secure/stream/"+l.name, n, 3*time.Millisecond)
			l.leave(leaver)
			waitFor(t, func() bool { e, _ := f.KS.GroupEpoch(fleet.Group); return e > before }, "K2 refreshed after %s", l.name)
			gen, _ := f.KS.GroupEpoch(fleet.Group)
			waitFor(t, func() bool {
				return a.Epoch()>>gkd.SlotEpochBits == gen&0xff && b.Epoch()>>gkd.SlotEpochBits == gen&0xff
			}, "a and b seal under generation %d", gen)
			wait()
			expectStream(t, b.App, "secure/stream/"+l.name, n)
			secret := "after-" + l.name
			must(t, a.App.Publish("secure/after", 1, false, []byte(secret)))
			expect(t, b.App, "secure/after", secret)
			env := f.captured("secure/after")
			if _, g := slotOf(t, env); g != gen&0xff {
				t.Fatalf("sealed under generation %d, want %d", g, gen)
			}
			if canOpen(leaver.Ring, "secure/after", env) {
				t.Fatalf("the member that left by %s opened a message sent after the K2 refresh", l.name)
			}
		})
	}
}

// TestSlottedGrantExpiresWithoutAMessage: a member whose grant runs out
// (its key client gone without a leave, so it never renews) loses access at
// the grant's end, with no message from the key server; the others renew
// their grants and go on past member_interval.
func TestSlottedGrantExpiresWithoutAMessage(t *testing.T) {
	const slot, interval = 250 * time.Millisecond, 1500 * time.Millisecond
	f := newSlottedFleet(t, slot, interval, "a", "b", "gone")
	a, b := f.join("a"), f.join("b")
	gone, err := f.KeyClient("gone", nil, 5*time.Second)
	must(t, err)
	must(t, b.App.Subscribe("secure/#", 1))
	gone.Keys.Abandon() // no leave, no renewal: its grant simply runs out
	joinedUntil := time.Now().Add(interval + 2*slot)

	time.Sleep(time.Until(joinedUntil) + 2*slot) // a and b renew meanwhile
	must(t, a.App.Publish("secure/late", 1, false, []byte("after gone's grant")))
	expect(t, b.App, "secure/late", "after gone's grant")
	if canOpen(gone.Ring, "secure/late", f.captured("secure/late")) {
		t.Fatal("a member whose grant ran out opened a later message")
	}
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != 1 {
		t.Fatalf("K2 generation %d: a scheduled expiry (no revoked member) must cost no rekey", e)
	}
	if st := a.Keys.Status()[0]; !st.Joined {
		t.Fatalf("a is no longer joined after its first grant: %+v", st)
	}
}

// TestSlottedExpiryWhileRevokedCoversLastRefreshesK2: a revoked member keeps
// tree covers for later slots, an expiring member keeps K2; together they
// would read on. So while the revoked member's covers reach past now, an
// expiry refreshes K2, and what the two hold together opens nothing sent
// after it.
func TestSlottedExpiryWhileRevokedCoversLastRefreshesK2(t *testing.T) {
	const slot = 250 * time.Millisecond
	f := newSlottedFleet(t, slot, 20*time.Second, "a", "b", "revoked", "expiring")
	a, b := f.join("a"), f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))
	revoked, err := f.KeyClient("revoked", nil, 5*time.Second)
	must(t, err)
	revoked.Keys.Abandon() // keeps what it holds; the reload revokes it
	f.revoke("a", "b", "expiring")
	waitFor(t, func() bool { e, _ := f.KS.GroupEpoch(fleet.Group); return e == 2 }, "K2 refreshed for the revocation")

	// A member with a short grant joins under generation 2, then vanishes.
	opts := f.KSOpts
	g := opts.Groups[0]
	g.Members, g.MemberInterval = []string{"a", "b", "expiring"}, 500*time.Millisecond
	opts.Groups = []keyserver.GroupConfig{g}
	must(t, f.KS.Reload(opts))
	expiring, err := f.KeyClient("expiring", nil, 5*time.Second)
	must(t, err)
	expiring.Keys.Abandon()
	waitFor(t, func() bool { e, _ := f.KS.GroupEpoch(fleet.Group); return e == 3 }, "K2 refreshed when the K2 holder's grant ran out")
	gen := uint32(3)
	waitFor(t, func() bool { return a.Epoch()>>gkd.SlotEpochBits == gen && b.Epoch()>>gkd.SlotEpochBits == gen }, "a and b seal under generation 3")
	must(t, a.App.Publish("secure/x", 1, false, []byte("after the expiry")))
	expect(t, b.App, "secure/x", "after the expiry")
	env := f.captured("secure/x")
	for _, n := range []*fleet.Node{revoked, expiring} {
		if canOpen(n.Ring, "secure/x", env) {
			h, _ := envelope.ParseHeader(env)
			t.Fatalf("%s opened a message after the refresh: epoch %x, status %+v", n.Name, h.Epoch, n.Keys.Status())
		}
	}
}

// TestSlottedJoinShorterThanASlot: a member_interval shorter than one slot
// still grants the current slot (the original sent nothing and threw).
func TestSlottedJoinShorterThanASlot(t *testing.T) {
	f := newSlottedFleet(t, 3*time.Second, 100*time.Millisecond, "a", "b")
	a, b := f.join("a"), f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))
	must(t, a.App.Publish("secure/short", 1, false, []byte("within the slot")))
	expect(t, b.App, "secure/short", "within the slot")
}

// TestSlottedKeyServerRestartKeepsTheClock: a restarted key server keeps
// the group's origin and trees: a member joining afterwards derives the
// same slot keys as one that joined before.
func TestSlottedKeyServerRestartKeepsTheClock(t *testing.T) {
	f := newSlottedFleet(t, 500*time.Millisecond, 30*time.Second, "a", "b")
	a := f.join("a")
	f.restartServer()
	b := f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))
	must(t, a.App.Publish("secure/r", 1, false, []byte("same clock")))
	expect(t, b.App, "secure/r", "same clock")
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != 1 {
		t.Fatalf("generation %d after a restart, want 1", e)
	}
}

// TestSlottedJoinerCannotReadEarlierSlots: backward secrecy at slot
// granularity: a member joining in a later slot opens nothing sent in an
// earlier one, and what is sent after it joined.
func TestSlottedJoinerCannotReadEarlierSlots(t *testing.T) {
	f := newSlottedFleet(t, 300*time.Millisecond, 30*time.Second, "a", "b", "late")
	a, b := f.join("a"), f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))
	must(t, a.App.Publish("secure/old", 1, false, []byte("before you came")))
	expect(t, b.App, "secure/old", "before you came")
	old := f.captured("secure/old")
	oldSlot, _ := slotOf(t, old)
	// The grant starts at the key server's slot, not at a's estimate of it
	// (which may run ahead by half a's join round trip).
	waitFor(t, func() bool {
		s, ok := f.KS.CurrentSlot(fleet.Group)
		return ok && uint32(s)&(1<<gkd.SlotEpochBits-1) > oldSlot
	}, "the key server's next slot")
	late := f.join("late")
	must(t, late.App.Subscribe("secure/#", 1))
	if canOpen(late.Ring, "secure/old", old) {
		t.Fatal("a member that joined in a later slot opened a message from an earlier one")
	}
	must(t, a.App.Publish("secure/new", 1, false, []byte("welcome")))
	expect(t, late.App, "secure/new", "welcome")
}
