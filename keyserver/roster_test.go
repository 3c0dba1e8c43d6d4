package keyserver_test

import (
	"bytes"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/fleet"
)

// keyNode starts name's key client alone (no sidecar) and waits until the
// group counts as joined.
func (f *testFleet) keyNode(name string) *fleet.Node {
	f.t.Helper()
	n, err := f.KeyClient(name, nil, 15*time.Second)
	must(f.t, err)
	return n
}

// sender is the node's current sender id in the group.
func sender(n *fleet.Node) uint64 { return n.Keys.Status()[0].Sender }

// lists reports whether the node's ring certifies sender id with member's
// signing key.
func (f *testFleet) lists(n *fleet.Node, id uint64, member string) bool {
	k, ok := n.Ring.SenderKey(fleet.Group, id)
	want := f.Members[member].Public().SigningKey()
	return ok && bytes.Equal(k, want[:])
}

// rosterVersion is the version of the node's installed roster (0: none).
func rosterVersion(n *fleet.Node) uint64 {
	v, _ := n.Ring.RosterVersion(fleet.Group)
	return v
}

// settleRoster waits until every node's ring holds one roster version that
// lists every node's current sender id under its member's key, and returns
// the version.
func (f *testFleet) settleRoster(nodes ...*fleet.Node) uint64 {
	f.t.Helper()
	state := func() string {
		var s []string
		for _, n := range nodes {
			s = append(s, fmt.Sprintf("%s: version %d sender %d", n.Name, rosterVersion(n), sender(n)))
		}
		return fmt.Sprint(s)
	}
	waitFor(f.t, func() bool {
		for _, n := range nodes {
			if rosterVersion(n) == 0 || rosterVersion(n) != rosterVersion(nodes[0]) {
				return false
			}
			for _, m := range nodes {
				if !f.lists(n, sender(m), m.Name) {
					return false
				}
			}
		}
		return true
	}, "one roster listing every member: %s", lazy(state))
	return rosterVersion(nodes[0])
}

// lazy formats as what its function returns when formatted.
type lazy func() string

func (l lazy) String() string { return l() }

// sent is one key-distribution message the key server published.
type sent struct {
	topic string
	msg   *gkd.Message
}

// serverMessages returns what the key server published, in order.
func (f *testFleet) serverMessages() []sent {
	var out []sent
	for _, s := range f.up.Spy.All() {
		if s.Client != "keyserver" {
			continue
		}
		if m, err := gkd.Parse(s.Payload); err == nil {
			out = append(out, sent{s.Topic, m})
		}
	}
	return out
}

// rosters returns the Roster parts the key server published, in order.
func (f *testFleet) rosters() []gkd.Roster {
	var out []gkd.Roster
	for _, s := range f.serverMessages() {
		if s.msg.Type == gkd.TypeRoster {
			r, err := gkd.ParseRoster(s.msg.Body)
			must(f.t, err)
			out = append(out, r)
		}
	}
	return out
}

// joinResponse opens a JoinResponse the key server sent to member.
func (f *testFleet) joinResponse(m *gkd.Message, member string) gkd.JoinResponse {
	f.t.Helper()
	must(f.t, m.Verify(f.Server.Public()))
	plain, err := f.Members[member].OpenBody(m)
	must(f.t, err)
	jr, err := gkd.ParseJoinResponse(plain)
	must(f.t, err)
	return jr
}

// memberName returns the name of the member with id.
func (f *testFleet) memberName(id [8]byte) string {
	for name, ident := range f.Members {
		if ident.Public().RawID() == id {
			return name
		}
	}
	return ""
}

// checkRosterOrder checks the key server's word on rosters: every
// JoinResponse is sender_auth and names a version that was broadcast to the
// group before it and is sent to the member right after it; versions never
// go back, and a version (part) is never reused with other content.
func (f *testFleet) checkRosterOrder() {
	f.t.Helper()
	msgs := f.serverMessages()
	broadcast := map[uint64]bool{}
	content := map[[2]uint64][]gkd.RosterEntry{}
	var last uint64
	joins := 0
	for i, s := range msgs {
		switch s.msg.Type {
		case gkd.TypeRoster:
			r, err := gkd.ParseRoster(s.msg.Body)
			must(f.t, err)
			key := [2]uint64{r.Version, uint64(r.Part)}
			if prev, ok := content[key]; ok && !slices.Equal(prev, r.Senders) {
				f.t.Fatalf("roster version %d part %d sent twice with different senders", r.Version, r.Part)
			}
			content[key] = r.Senders
			if s.msg.Recipient == ([8]byte{}) {
				if r.Version < last {
					f.t.Fatalf("roster broadcast went back from version %d to %d", last, r.Version)
				}
				last = r.Version
				broadcast[r.Version] = true
			}
		case gkd.TypeJoinResponse:
			joins++
			jr := f.joinResponse(s.msg, f.memberName(s.msg.Recipient))
			if !jr.Flags.SenderAuth() || jr.Roster == 0 {
				f.t.Fatalf("join response of a sender_auth group: flags %v roster %d", jr.Flags, jr.Roster)
			}
			if !broadcast[jr.Roster] {
				f.t.Fatalf("join response names roster version %d, not broadcast before it", jr.Roster)
			}
			if i+1 >= len(msgs) || msgs[i+1].msg.Type != gkd.TypeRoster || msgs[i+1].msg.Recipient != s.msg.Recipient {
				f.t.Fatalf("join response not followed by the member's own copy of the roster")
			}
			if r, _ := gkd.ParseRoster(msgs[i+1].msg.Body); r.Version != jr.Roster {
				f.t.Fatalf("join response names roster version %d, the copy that follows is version %d", jr.Roster, r.Version)
			}
		}
	}
	if joins == 0 {
		f.t.Fatal("no join response seen")
	}
}

// In every scheme, a sender_auth group's members end up with one roster
// that certifies every member's sender id with that member's key; the key
// server announces each version before the join response naming it. A
// group without sender_auth sends no roster, and its join responses and
// heartbeats say so.
func TestRosterInEveryScheme(t *testing.T) {
	for _, scheme := range []string{"static", "update", "slotted", "lkh"} {
		t.Run(scheme, func(t *testing.T) {
			f := newFleetWith(t, fleet.Options{Scheme: scheme, Members: []string{"a", "b", "c"}, SenderAuth: true})
			a, b, c := f.keyNode("a"), f.keyNode("b"), f.keyNode("c")
			f.settleRoster(a, b, c)
			for _, n := range []*fleet.Node{a, b, c} {
				if !n.Ring.SenderAuth(fleet.Group) {
					t.Fatalf("%s's ring does not know the group is sender_auth", n.Name)
				}
				if _, err := n.Ring.ProofSigner(fleet.Group); err != nil {
					t.Fatalf("%s cannot sign: %v", n.Name, err)
				}
			}
			f.checkRosterOrder()
		})
		t.Run(scheme+"/off", func(t *testing.T) {
			f := newFleetWith(t, fleet.Options{Scheme: scheme, Members: []string{"a", "b"}})
			a, b := f.keyNode("a"), f.keyNode("b")
			settle(t, a, b)
			time.Sleep(2 * f.Opts.Heartbeat)
			joins, beats := 0, 0
			for _, s := range f.serverMessages() {
				switch s.msg.Type {
				case gkd.TypeRoster:
					t.Fatal("a group without sender_auth got a roster")
				case gkd.TypeJoinResponse:
					joins++
					if jr := f.joinResponse(s.msg, f.memberName(s.msg.Recipient)); jr.Flags != 0 || jr.Roster != 0 {
						t.Fatalf("join response: flags %v roster %d, want 0 0", jr.Flags, jr.Roster)
					}
				case gkd.TypeHeartbeat:
					beats++
					if h, err := gkd.ParseHeartbeat(s.msg.Body); err != nil || h.Roster != 0 {
						t.Fatalf("heartbeat roster %d (%v), want 0", h.Roster, err)
					}
				}
			}
			if joins < 2 || beats == 0 {
				t.Fatalf("%d join responses and %d heartbeats seen", joins, beats)
			}
			if a.Ring.SenderAuth(fleet.Group) || b.Ring.SenderAuth(fleet.Group) {
				t.Fatal("a ring takes the group for sender_auth")
			}
		})
	}
}

// A member that restarts joins under a new sender id: the others' rosters
// list the new one at once and keep the old one (messages it sealed may
// still be delivered) for receive_retention, then drop it.
func TestRosterKeepsALeaversSenderForReceiveRetention(t *testing.T) {
	const retention = 3 * time.Second
	f := newFleetWith(t, fleet.Options{Scheme: "update", Members: []string{"a", "b"}, SenderAuth: true,
		SendGrace: 500 * time.Millisecond, ReceiveRetention: retention})
	a, b := f.keyNode("a"), f.keyNode("b")
	f.settleRoster(a, b)
	old := sender(a)
	a.Keys.Close() // a clean leave
	left := time.Now()
	a2 := f.keyNode("a")
	if sender(a2) == old {
		t.Fatal("a restarted member got its old sender id again")
	}
	f.settleRoster(a2, b)
	if !f.lists(b, old, "a") || !f.lists(a2, old, "a") {
		t.Fatal("the restarted member's old sender id was dropped at once")
	}
	waitFor(t, func() bool { return !f.lists(b, old, "a") }, "the old sender id leaves b's roster")
	if gone := time.Since(left); gone < retention-500*time.Millisecond {
		t.Fatalf("the old sender id left the roster after %v, before receive_retention %v", gone, retention)
	}
	if !f.lists(b, sender(a2), "a") || !f.lists(b, sender(b), "b") {
		t.Fatal("the current sender ids left the roster with the old one")
	}
	f.checkRosterOrder()
}

// A member removed from the group by a reload loses every sender id, the
// one it holds and the one it left behind, in the next roster version, sent
// no later than the rekey that its revocation causes; the others install
// that version, and the revoked member gets no new key.
func TestRosterDropsARevokedMemberAtOnce(t *testing.T) {
	f := newFleetWith(t, fleet.Options{Scheme: "update", Members: []string{"a", "b", "c"}, SenderAuth: true,
		ReceiveRetention: time.Minute})
	a, b, c := f.keyNode("a"), f.keyNode("b"), f.keyNode("c")
	f.settleRoster(a, b, c)
	cOld := sender(c)
	c.Keys.Close()
	c2 := f.keyNode("c") // c now has a retired id and a current one
	before := f.settleRoster(a, b, c2)
	if !f.lists(a, cOld, "c") {
		t.Fatal("c's retired sender id is not listed")
	}
	epoch := settle(t, a, b, c2)
	f.up.Spy.Reset()
	f.revoke("a", "b")
	waitFor(t, func() bool {
		return rosterVersion(a) > before && rosterVersion(b) == rosterVersion(a) && a.Epoch() > epoch && b.Epoch() > epoch
	}, "a and b install the roster and the key without c")
	for _, n := range []*fleet.Node{a, b} {
		for _, id := range []uint64{cOld, sender(c2)} {
			if _, ok := n.Ring.SenderKey(fleet.Group, id); ok {
				t.Fatalf("%s's roster still lists c's sender id %d", n.Name, id)
			}
		}
		if !f.lists(n, sender(a), "a") || !f.lists(n, sender(b), "b") {
			t.Fatalf("%s's roster lost a remaining member", n.Name)
		}
	}
	if _, ok := c2.Ring.GroupKey(fleet.Group, a.Epoch()); ok {
		t.Fatal("the revoked member holds the key of the epoch that removed it")
	}
	// the roster without c went out before the first rekey
	var rosterAt, rekeyAt = -1, -1
	for i, s := range f.serverMessages() {
		if s.msg.Type == gkd.TypeRoster && rosterAt < 0 {
			rosterAt = i
		}
		if s.msg.Type == gkd.TypeRekey && rekeyAt < 0 {
			rekeyAt = i
		}
	}
	if rosterAt < 0 || rekeyAt < 0 || rosterAt > rekeyAt {
		t.Fatalf("roster at message %d, first rekey at %d: the roster must come first", rosterAt, rekeyAt)
	}
	cID := f.Members["c"].Public().RawID()
	for _, r := range f.rosters() {
		for _, e := range r.Senders {
			if e.Member == cID {
				t.Fatalf("roster version %d after the revocation lists c (sender %d)", r.Version, e.Sender)
			}
		}
	}
}

// A restarted key server goes on with higher roster versions and keeps the
// sender ids retired before the restart.
func TestRosterSurvivesAKeyServerRestart(t *testing.T) {
	f := newFleetWith(t, fleet.Options{Scheme: "update", Members: []string{"a", "b"}, SenderAuth: true,
		ReceiveRetention: time.Minute})
	a, b := f.keyNode("a"), f.keyNode("b")
	f.settleRoster(a, b)
	old := sender(a)
	a.Keys.Close()
	a2 := f.keyNode("a")
	before := f.settleRoster(a2, b)
	f.restartServer()
	waitFor(t, func() bool { return rosterVersion(b) > before }, "b installs a version after the restart (has %d)", rosterVersion(b))
	f.settleRoster(a2, b)
	if !f.lists(b, old, "a") {
		t.Fatal("a sender id retired before the restart was forgotten")
	}
	a3Old := sender(a2)
	a2.Keys.Close()
	a3 := f.keyNode("a")
	after := f.settleRoster(a3, b)
	if after <= before || !f.lists(b, old, "a") || !f.lists(b, a3Old, "a") {
		t.Fatalf("after the restart: version %d (before %d), retired ids listed: %t %t", after, before, f.lists(b, old, "a"), f.lists(b, a3Old, "a"))
	}
	f.checkRosterOrder() // versions never reused with other content, across the restart
}

// rosterDropper is a broker that drops the rosters broadcast to groups
// while on.
type rosterDropper struct {
	mqtt.HookBase
	on      atomic.Bool
	dropped atomic.Int32
}

func (h *rosterDropper) ID() string           { return "roster-dropper" }
func (h *rosterDropper) Provides(b byte) bool { return b == mqtt.OnPublish }
func (h *rosterDropper) OnPublish(_ *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if m, err := gkd.Parse(pk.Payload); h.on.Load() && err == nil && m.Type == gkd.TypeRoster && m.Recipient == ([8]byte{}) {
		h.dropped.Add(1)
		return pk, packets.CodeSuccessIgnore
	}
	return pk, nil
}

// A member that misses a roster broadcast learns of it from the next
// heartbeat and joins again, which brings it the current roster.
func TestHeartbeatNamingANewerRosterMakesAMemberRejoin(t *testing.T) {
	drop := &rosterDropper{}
	f := newFleetWith(t, fleet.Options{Scheme: "update", Members: []string{"a", "b"}, SenderAuth: true}, drop)
	a := f.keyNode("a")
	f.settleRoster(a)
	aSender := sender(a)
	drop.on.Store(true)
	b := f.keyNode("b") // its own copy of the roster is not a broadcast: it arrives
	waitFor(t, func() bool { return f.lists(a, sender(b), "b") }, "a learns b's sender id without the broadcast")
	if drop.dropped.Load() == 0 {
		t.Fatal("no broadcast was dropped")
	}
	if sender(a) == aSender {
		t.Fatal("a has b's sender id without having joined again")
	}
	drop.on.Store(false)
	f.settleRoster(a, b)
}

// A roster too large for one message travels in parts; members install it
// whole.
func TestRosterInParts(t *testing.T) {
	f := newFleetWith(t, fleet.Options{Scheme: "static", Members: []string{"a", "b", "c", "d"}, SenderAuth: true,
		MaxMessageSize: 300}) // 3 entries a part
	var nodes []*fleet.Node
	for _, name := range []string{"a", "b", "c", "d"} {
		nodes = append(nodes, f.keyNode(name))
	}
	v := f.settleRoster(nodes...)
	parts := 0
	for _, r := range f.rosters() {
		if r.Version == v && r.Part == 0 {
			parts = int(r.Parts)
		}
		if len(r.Senders) > 3 {
			t.Fatalf("a roster part of %d entries: more than max_message_size holds", len(r.Senders))
		}
	}
	if parts != 2 {
		t.Fatalf("version %d of 4 senders came in %d parts, want 2", v, parts)
	}
	f.checkRosterOrder()
}
