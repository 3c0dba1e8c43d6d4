package keyserver_test

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/keyclient"
)

// The cryptographic side of revocation. Other tests check that a revoked
// member lacks the new epoch in its ring; these check what it could do with
// everything it was ever given: every key-distribution message sealed to
// it, opened with its identity (which a revoked member still has), every
// lkh wrap it can open with any key it learns that way, and its ring. Each
// key is tried on each envelope the others seal after the revocation,
// whatever epoch the envelope names: the sender subkey is derived from the
// held key with the envelope's own header fields. A key server that gave a
// new epoch number to the old key bytes (or kept an lkh group key, or a
// slotted K2) fails these tests.

// TestRevokedMemberOpensNothingLaterUpdate: update.
func TestRevokedMemberOpensNothingLaterUpdate(t *testing.T) { testRevokedOpensNothing(t, "update") }

// TestRevokedMemberOpensNothingLaterLKH: lkh, with a tree of height 2 so
// that the revoked member shares an interior key with another member.
func TestRevokedMemberOpensNothingLaterLKH(t *testing.T) { testRevokedOpensNothing(t, "lkh") }

// TestRevokedMemberOpensNothingLaterSlotted: slotted, with the revoked
// member's covers reaching past every slot used after the revocation, so
// that only the K2 refresh stands between it and the traffic.
func TestRevokedMemberOpensNothingLaterSlotted(t *testing.T) {
	testRevokedOpensNothing(t, "slotted")
}

// TestRevokedMemberOfStaticGroupReadsOn: the static scheme promises no
// forward secrecy, and this holds it to what docs/SECURITY.md says: a
// revocation keeps the member from joining again, yet the key it holds
// opens what the others send afterwards.
func TestRevokedMemberOfStaticGroupReadsOn(t *testing.T) { testRevokedOpensNothing(t, "static") }

func testRevokedOpensNothing(t *testing.T, scheme string) {
	forEachStore(t, func(t *testing.T, o fleet.Options) {
		o.Scheme = scheme
		o.Members = []string{"a", "b", "c", "d", "e", "revoked"}
		if scheme == "slotted" {
			o.Slot, o.MemberInterval, o.SkewSlots, o.SlotDepth = 500*time.Millisecond, 30*time.Second, 1, 2
		}
		f := newFleetWith(t, o)
		a, b := f.join("a"), f.join("b")
		r, err := f.KeyClient("revoked", nil, 10*time.Second)
		must(t, err)
		// Joins and a leave while it is a member: it is handed several
		// epochs (update), several versions of its path keys (lkh), or
		// several K2 generations (slotted).
		var others []*fleet.Node
		for _, name := range []string{"c", "d", "e"} {
			n, err := f.KeyClient(name, nil, 10*time.Second)
			must(t, err)
			others = append(others, n)
		}
		must(t, a.App.Subscribe("secure/#", 1))
		must(t, b.App.Subscribe("secure/#", 1))
		e0, _ := f.KS.GroupEpoch(fleet.Group)
		others[2].Keys.Close()
		if scheme != "static" {
			waitFor(t, func() bool { e, _ := f.KS.GroupEpoch(fleet.Group); return e > e0 }, "e's leave rekeys")
		}
		if scheme != "slotted" {
			e, _ := f.KS.GroupEpoch(fleet.Group)
			waitFor(t, func() bool { return a.Epoch() == e && b.Epoch() == e && r.Epoch() == e }, "everyone seals under epoch %d", e)
		} else {
			gen, _ := f.KS.GroupEpoch(fleet.Group)
			waitFor(t, func() bool { return r.Epoch()>>gkd.SlotEpochBits == gen }, "the member to revoke seals under generation %d", gen)
		}

		// Before: what the revoked member holds opens the traffic (else
		// the test below proves nothing).
		exchange(t, a, b, "secure/before", 5)
		ring := ringKeys(r.Ring)

		before, _ := f.KS.GroupEpoch(fleet.Group)
		f.revoke("a", "b", "c", "d")
		switch scheme {
		case "static":
			// Nothing changes on the wire: the key stays.
		case "slotted":
			waitFor(t, func() bool { e, _ := f.KS.GroupEpoch(fleet.Group); return e > before }, "K2 refreshed")
			gen, _ := f.KS.GroupEpoch(fleet.Group)
			waitFor(t, func() bool {
				return a.Epoch()>>gkd.SlotEpochBits == gen&0xff && b.Epoch()>>gkd.SlotEpochBits == gen&0xff
			}, "a and b seal under generation %d", gen)
		default:
			after, _ := f.KS.GroupEpoch(fleet.Group) // Reload rekeys before it returns
			if after <= before {
				t.Fatalf("the revocation did not rekey: epoch %d, was %d", after, before)
			}
			waitFor(t, func() bool { return a.Epoch() == after && b.Epoch() == after }, "a and b seal under epoch %d", after)
		}
		if scheme != "static" {
			waitFor(t, func() bool { return r.Keys.Status()[0].Refused != "" }, "the revoked member is refused")
		}
		exchange(t, a, b, "secure/after", 20)

		held := harvest(t, f, "revoked")
		held.add(ring...)
		envs := map[string][][]byte{"secure/before": f.capturedAll("secure/before"), "secure/after": f.capturedAll("secure/after")}
		keys := held.candidates(t, append(envs["secure/before"], envs["secure/after"]...))
		t.Logf("%s: the revoked member holds %d keys (%d K2, %d grants): %d candidates", scheme, len(held.keys), len(held.k2), len(held.grants), len(keys))
		for _, env := range envs["secure/before"] {
			if !opensWithAny(keys, "secure/before", env) {
				t.Fatalf("what the member held before its revocation does not open what was sent then: the harvest is incomplete")
			}
		}
		if scheme == "slotted" {
			held.mustCover(t, envs["secure/after"])
		}
		opened := 0
		for _, env := range envs["secure/after"] {
			if opensWithAny(keys, "secure/after", env) {
				opened++
				h, _ := envelope.ParseHeader(env)
				t.Logf("opened: epoch %d sender %d seq %d (key server before the revocation: %d)", h.Epoch, h.Sender, h.Seq, before)
			}
		}
		switch {
		case scheme == "static" && opened != len(envs["secure/after"]):
			t.Fatalf("static: the revoked member opened %d of %d later messages; the scheme keeps one key, so all should open", opened, len(envs["secure/after"]))
		case scheme != "static" && opened > 0:
			t.Fatalf("%s: keys sealed to the revoked member opened %d of %d messages sent after its revocation", scheme, opened, len(envs["secure/after"]))
		}
	})
}

// exchange sends n messages each way between a and b on topic and expects
// them delivered.
func exchange(t *testing.T, a, b *fleet.Node, topic string, n int) {
	t.Helper()
	for i := range n {
		p := fmt.Sprintf("%s-a-%d", topic, i)
		must(t, a.App.Publish(topic, 1, false, []byte(p)))
		expect(t, b.App, topic, p)
		expect(t, a.App, topic, p) // a subscribes to its own topic too
		p = fmt.Sprintf("%s-b-%d", topic, i)
		must(t, b.App.Publish(topic, 1, false, []byte(p)))
		expect(t, a.App, topic, p)
		expect(t, b.App, topic, p)
	}
}

// ringKeys returns every key a ring holds now.
func ringKeys(r *keyclient.Ring) [][32]byte {
	var out [][32]byte
	for _, e := range r.Epochs(fleet.Group) {
		if k, ok := r.GroupKey(fleet.Group, e); ok {
			out = append(out, *k)
		}
	}
	return out
}

// heldKeys is the key material a member was handed.
type heldKeys struct {
	keys   map[[32]byte]bool            // group keys of every epoch, lkh node keys, K2s
	k2     map[[32]byte]map[uint32]bool // slotted: each K2 and the generations it came with
	grants []gkd.SlotGrant              // slotted: every grant (tree covers)
}

func (h *heldKeys) add(keys ...[32]byte) {
	for _, k := range keys {
		h.keys[k] = true
	}
}

// harvest collects what the broker carried for member: every sealed
// message on its unicast topic, opened with its identity, and every lkh
// wrap on the group topic that some key so learned opens (by trial, not by
// the node ids and versions the wrap claims), until nothing new opens.
func harvest(t *testing.T, f *testFleet, member string) *heldKeys {
	t.Helper()
	id := f.Members[member]
	me := id.Public().RawID()
	memberTopic := gkd.MemberTopic("smqtt/v1", me)
	groupTopic := gkd.GroupTopic("smqtt/v1", gkd.GroupID(f.Server.Public().RawID(), fleet.Group))
	h := &heldKeys{keys: map[[32]byte]bool{}, k2: map[[32]byte]map[uint32]bool{}}
	addK2 := func(k [32]byte, gen uint32) {
		if h.k2[k] == nil {
			h.k2[k] = map[uint32]bool{}
		}
		h.k2[k][gen] = true
	}
	var wraps [][]byte
	for _, s := range f.up.Spy.All() {
		msg, err := gkd.Parse(s.Payload)
		if err != nil || msg.Verify(f.Server.Public()) != nil {
			continue
		}
		switch {
		case s.Topic == memberTopic && msg.Type.Sealed() && msg.Recipient == me:
			plain, err := id.OpenBody(msg)
			must(t, err)
			switch msg.Type {
			case gkd.TypeJoinResponse:
				r, err := gkd.ParseJoinResponse(plain)
				must(t, err)
				h.add(r.Key)
				switch r.Scheme {
				case gkd.SchemeSlotted:
					g, err := gkd.ParseSlotGrant(r.Ext)
					must(t, err)
					h.grants = append(h.grants, g)
					addK2(r.Key, r.Epoch)
				case gkd.SchemeLKH:
					p, err := gkd.ParseLKHPath(r.Ext)
					must(t, err)
					for _, k := range p.Keys {
						h.add(k.Key)
					}
				}
			case gkd.TypeRekey:
				r, err := gkd.ParseRekey(plain)
				must(t, err)
				h.add(r.Key)
				addK2(r.Key, r.Epoch) // used only if a grant was seen
			}
		case s.Topic == groupTopic && msg.Type == gkd.TypeGroupRekey:
			gr, err := gkd.ParseGroupRekey(msg.Body)
			must(t, err)
			for w := gr.Chunk[gkd.LKHChunkHeaderSize:]; len(w) >= gkd.LKHWrapSize; w = w[gkd.LKHWrapSize:] {
				wraps = append(wraps, w[:gkd.LKHWrapSize])
			}
		}
	}
	for opened := true; opened; {
		opened = false
		for i := 0; i < len(wraps); i++ {
			if k, ok := unwrapWithAny(h.keys, wraps[i]); ok {
				h.add(k)
				wraps = append(wraps[:i], wraps[i+1:]...)
				i--
				opened = true
			}
		}
	}
	return h
}

// unwrapWithAny opens one lkh wrapped key (docs/PROTOCOL.md: an 18-byte
// head naming the nodes, a 12-byte nonce, AES-256-GCM of the key under the
// label and the head) with any of keys.
func unwrapWithAny(keys map[[32]byte]bool, w []byte) ([32]byte, bool) {
	head, nonce, sealed := w[:18], w[18:30], w[30:]
	ad := append([]byte("smqtt/v1 lkh wrap"), head...)
	for k := range keys {
		block, _ := aes.NewCipher(k[:])
		gcm, _ := cipher.NewGCM(block)
		if plain, err := gcm.Open(nil, nonce, sealed, ad); err == nil {
			return [32]byte(plain), true
		}
	}
	return [32]byte{}, false
}

// candidates returns every group key the held material yields for the
// given envelopes: the keys themselves and, in a slotted group, the key of
// every slot of every grant under every K2, for every generation that a K2
// came with or an envelope names.
func (h *heldKeys) candidates(t *testing.T, envs [][]byte) [][32]byte {
	var out [][32]byte
	for k := range h.keys {
		out = append(out, k)
	}
	if len(h.grants) == 0 {
		return out
	}
	gens := map[uint32]bool{}
	for _, g := range h.k2 {
		for gen := range g {
			gens[gen] = true
		}
	}
	for _, env := range envs {
		_, gen := slotOf(t, env)
		gens[gen] = true
	}
	for _, g := range h.grants {
		for s := g.First; s <= g.Last; s++ {
			for k2 := range h.k2 {
				for gen := range gens {
					if k, ok := g.Key(k2, fleet.Group, gen, s); ok {
						out = append(out, k)
					}
				}
			}
		}
	}
	return out
}

// mustCover fails unless the member's grants cover the slot of every
// envelope: then its tree covers derive those slots' leaves, and only K2
// keeps it out.
func (h *heldKeys) mustCover(t *testing.T, envs [][]byte) {
	t.Helper()
	for _, env := range envs {
		slot, _ := slotOf(t, env)
		covered := false
		for _, g := range h.grants {
			for s := g.First; s <= g.Last && !covered; s++ {
				_, has := g.Leaf(s)
				covered = has && uint32(s)&(1<<gkd.SlotEpochBits-1) == slot
			}
		}
		if !covered {
			t.Fatalf("slot %d lies outside the revoked member's grants: the test would not show that the K2 refresh cut it off", slot)
		}
	}
}

// anyEpoch hands one key out for every epoch: an opener over it derives
// the sender subkey from that key and the envelope's own header.
type anyEpoch struct{ key envelope.GroupKey }

func (a anyEpoch) GroupKey(string, uint32) (*envelope.GroupKey, bool) { return &a.key, true }

// opensWithAny reports whether any of keys opens env on topic.
func opensWithAny(keys [][32]byte, topic string, env []byte) bool {
	for _, k := range keys {
		if _, _, err := envelope.NewOpener(anyEpoch{envelope.GroupKey(k)}, 1).Open(nil, fleet.Group, topic, env); err == nil {
			return true
		}
	}
	return false
}
