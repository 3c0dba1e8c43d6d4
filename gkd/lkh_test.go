package gkd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// lkhRand returns a deterministic random source, so that runs repeat.
func lkhRand(seed byte) io.Reader { return rand.NewChaCha8([32]byte{seed}) }

func memberNames(prefix string, n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s%05d", prefix, i)
	}
	return names
}

// lkhGroup is a key tree and the members' side of it, as a test drives them.
type lkhGroup struct {
	t       testing.TB
	tree    *LKHTree
	members map[string]*LKHMember
}

func newLKHGroup(t testing.TB, degree, n int) *lkhGroup {
	t.Helper()
	g := &lkhGroup{t: t, tree: NewLKHTree(degree, lkhRand(byte(degree))), members: map[string]*LKHMember{}}
	g.rekey(memberNames("m", n), nil, 1<<18)
	return g
}

// rekey runs a batch, starts the joiners from their paths, delivers every
// chunk to every current member and checks that all of them hold the new
// group key. It returns the rekey and its chunks.
func (g *lkhGroup) rekey(joins, leaves []string, maxBytes int) (*LKHRekey, [][]byte) {
	g.t.Helper()
	r, err := g.tree.Rekey(joins, leaves)
	if err != nil {
		g.t.Fatalf("Rekey(%d joins, %d leaves): %v", len(joins), len(leaves), err)
	}
	for _, m := range leaves {
		delete(g.members, m)
	}
	for k, m := range joins {
		if g.members[m], err = NewLKHMember(r.Joined[k]); err != nil {
			g.t.Fatalf("NewLKHMember(%s): %v", m, err)
		}
	}
	chunks, err := r.Chunks(maxBytes)
	if err != nil {
		g.t.Fatalf("Chunks(%d): %v", maxBytes, err)
	}
	for _, c := range chunks {
		if len(c) > maxBytes {
			g.t.Fatalf("chunk of %d bytes, more than %d", len(c), maxBytes)
		}
		for name, m := range g.members {
			if _, err := m.Apply(c); err != nil {
				g.t.Fatalf("%s: Apply: %v", name, err)
			}
		}
	}
	g.checkInStep()
	return r, chunks
}

// checkInStep checks that every member holds the tree's group key.
func (g *lkhGroup) checkInStep() {
	g.t.Helper()
	wantV, wantK := g.tree.GroupKey()
	for name, m := range g.members {
		if v, k := m.GroupKey(); v != wantV || k != wantK {
			g.t.Fatalf("%s holds group key version %d, want %d (same key: %t)", name, v, wantV, k == wantK)
		}
	}
}

// ceilLog returns ⌈log_d n⌉ for n ≥ 1.
func ceilLog(d, n int) int {
	h := 0
	for c := 1; c < n; c *= d {
		h++
	}
	return h
}

// heldKeys returns every key a set of paths holds.
func heldKeys(paths ...LKHPath) map[[GroupKeySize]byte]bool {
	keys := map[[GroupKeySize]byte]bool{}
	for _, p := range paths {
		for _, k := range p.Keys {
			keys[k.Key] = true
		}
	}
	return keys
}

func TestLKHLeaveRekeysTheOthersAndNotTheLeaver(t *testing.T) {
	for _, d := range []int{2, 3, 4} {
		t.Run(fmt.Sprintf("d=%d", d), func(t *testing.T) {
			g := newLKHGroup(t, d, 20)
			leaver := g.members["m00007"]
			before := leaver.Path()
			_, oldKey := g.tree.GroupKey()

			_, chunks := g.rekey(nil, []string{"m00007"}, 1<<18)
			for _, c := range chunks {
				if n, err := leaver.Apply(c); n != 0 || err != nil {
					t.Errorf("leaver Apply = %d, %v; want 0, nil", n, err)
				}
			}
			if after := leaver.Path(); !reflect.DeepEqual(after, before) {
				t.Error("the leaver's keys changed")
			}
			_, newKey := g.tree.GroupKey()
			if newKey == oldKey {
				t.Error("the group key did not change")
			}
			if heldKeys(before)[newKey] {
				t.Error("the leaver holds the new group key")
			}
			if len(g.members) != 19 || g.tree.Members() != 19 {
				t.Errorf("%d members, tree has %d; want 19", len(g.members), g.tree.Members())
			}
		})
	}
}

func TestLKHJoinGivesTheNewRootAndNoOldKey(t *testing.T) {
	for _, tc := range []struct {
		name      string
		degree, n int
		height    int // after the join
	}{
		{"room in the tree", 3, 5, 2},
		{"full tree grows a level", 3, 9, 3},
		{"binary tree grows a level", 2, 8, 4},
		{"first member", 4, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newLKHGroup(t, tc.degree, tc.n)
			var old []LKHPath
			for _, m := range g.members {
				old = append(old, m.Path())
			}
			// A rekey before the join, which the joiner must not be able to use.
			_, earlier := g.rekey(nil, nil, 1<<18)
			for _, m := range g.members {
				old = append(old, m.Path())
			}
			_, oldKey := g.tree.GroupKey()

			path, r, err := g.tree.Join("newcomer")
			if err != nil {
				t.Fatal(err)
			}
			if len(r.Joined) != 1 || !reflect.DeepEqual(r.Joined[0], path) {
				t.Fatal("Join's path differs from the rekey's")
			}
			nm, err := NewLKHMember(path)
			if err != nil {
				t.Fatal(err)
			}
			v, k := nm.GroupKey()
			if wv, wk := g.tree.GroupKey(); v != wv || k != wk || k == oldKey {
				t.Errorf("newcomer's group key: version %d (tree %d), same as tree %t, same as old %t", v, wv, k == wk, k == oldKey)
			}
			if g.tree.Height() != tc.height || len(path.Keys) != tc.height+1 {
				t.Errorf("height %d, path of %d keys; want height %d", g.tree.Height(), len(path.Keys), tc.height)
			}
			oldKeys := heldKeys(old...)
			for l, pk := range path.Keys {
				if pk.Version != r.Counter || oldKeys[pk.Key] {
					t.Errorf("newcomer's key at level %d: version %d (rekey %d), held before: %t", l, pk.Version, r.Counter, oldKeys[pk.Key])
				}
			}
			for _, c := range earlier {
				if n, err := nm.Apply(c); n != 0 || err != nil {
					t.Errorf("newcomer applying an earlier rekey = %d, %v; want 0, nil", n, err)
				}
			}

			// The others follow.
			chunks, err := r.Chunks(1 << 18)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range chunks {
				for _, m := range g.members {
					if _, err := m.Apply(c); err != nil {
						t.Fatal(err)
					}
				}
			}
			g.members["newcomer"] = nm
			g.checkInStep()
		})
	}
}

func TestLKHBatchChangesEachNodeOfTheUnionOfPathsOnce(t *testing.T) {
	const d, n = 3, 200
	g := newLKHGroup(t, d, n)
	twin := cloneLKHTree(t, g.tree)
	leaves := []string{"m00000", "m00001", "m00002", "m00050", "m00051", "m00120", "m00199"}

	var leaverPaths []LKHPath
	for _, m := range leaves {
		leaverPaths = append(leaverPaths, g.members[m].Path())
	}
	r, _ := g.rekey(nil, leaves, 1<<18)

	union := map[LKHNodeID]bool{}
	for _, p := range leaverPaths {
		for l := 1; l < len(p.Keys); l++ {
			union[p.Node(l)] = true
		}
	}
	got := map[LKHNodeID]bool{}
	for _, id := range r.Changed {
		if got[id] {
			t.Errorf("node %v listed twice", id)
		}
		got[id] = true
	}
	if !reflect.DeepEqual(got, union) {
		t.Errorf("changed %d nodes %v, want the %d of the union of paths %v", len(got), r.Changed, len(union), union)
	}

	// The wraps: each changed node with members, once under each child with
	// members, and nothing else.
	remaining := map[LKHNodeID]bool{}
	for _, m := range g.members {
		p := m.Path()
		for l := range p.Keys {
			remaining[p.Node(l)] = true
		}
	}
	want := 0
	for id := range union {
		if !remaining[id] {
			continue
		}
		for c := uint32(0); c < d; c++ {
			if remaining[LKHNodeID{Level: id.Level - 1, Index: id.Index*d + c}] {
				want++
			}
		}
	}
	seen := map[LKHNodeID]bool{}
	for _, w := range r.Wraps {
		if w.Version != r.Counter || !union[w.Node] || !remaining[w.Under] || w.Node != w.Under.Parent(d) || seen[w.Under] {
			t.Errorf("unexpected wrap of %v v%d under %v v%d", w.Node, w.Version, w.Under, w.UnderVersion)
		}
		seen[w.Under] = true
	}
	if len(r.Wraps) != want {
		t.Errorf("%d wrapped keys, want %d", len(r.Wraps), want)
	}

	// The same leaves one by one cost more.
	separate := 0
	for _, m := range leaves {
		r, err := twin.Leave(m)
		if err != nil {
			t.Fatal(err)
		}
		separate += len(r.Wraps)
	}
	if len(r.Wraps) >= separate {
		t.Errorf("batch of %d leaves: %d wrapped keys, one by one %d", len(leaves), len(r.Wraps), separate)
	}
	t.Logf("%d leaves among %d members, degree %d: %d nodes changed, %d wrapped keys (one by one: %d)", len(leaves), n, d, len(r.Changed), len(r.Wraps), separate)
}

func TestLKHLeaveCostsAtMostDegreeTimesHeightWrappedKeys(t *testing.T) {
	for _, d := range []int{2, 3, 4, 8} {
		for _, n := range []int{10, 100, 1000} {
			t.Run(fmt.Sprintf("d=%d/n=%d", d, n), func(t *testing.T) {
				tree := NewLKHTree(d, lkhRand(1))
				if _, err := tree.Rekey(memberNames("m", n), nil); err != nil {
					t.Fatal(err)
				}
				h := ceilLog(d, n)
				if tree.Height() != h {
					t.Errorf("height %d, want ⌈log_%d %d⌉ = %d", tree.Height(), d, n, h)
				}
				for _, i := range []int{0, 1, n / 2, n - 2, n - 1} {
					name := memberNames("m", n)[i]
					r, err := tree.Leave(name)
					if err != nil {
						t.Fatal(err)
					}
					if len(r.Wraps) > d*h {
						t.Errorf("leave of member %d: %d wrapped keys, more than %d·%d", i, len(r.Wraps), d, h)
					}
					if _, _, err := tree.Join(name); err != nil { // back to n members
						t.Fatal(err)
					}
				}
			})
		}
	}
}

func TestLKHSmallChunksEachLetTheirMembersReachTheRoot(t *testing.T) {
	const d, n = 4, 300
	g := newLKHGroup(t, d, n)
	h := g.tree.Height()
	var leaves []string
	for i := 0; i < n; i += 7 {
		leaves = append(leaves, memberNames("m", n)[i])
	}
	joins := memberNames("j", 10)
	r, err := g.tree.Rekey(joins, leaves)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range leaves {
		delete(g.members, m)
	}

	minimum := LKHChunkHeaderSize + h*LKHWrapSize
	if _, err := r.Chunks(minimum - 1); !errors.Is(err, ErrLKHChunkSize) {
		t.Errorf("Chunks(%d) = %v, want ErrLKHChunkSize", minimum-1, err)
	}
	for _, maxBytes := range []int{minimum, minimum + 3*LKHWrapSize, 1024, 4096} {
		t.Run(fmt.Sprint(maxBytes), func(t *testing.T) {
			chunks, err := r.Chunks(maxBytes)
			if err != nil {
				t.Fatal(err)
			}
			if len(chunks) < 2 {
				t.Errorf("%d chunks of at most %d bytes for %d wrapped keys", len(chunks), maxBytes, len(r.Wraps))
			}
			for k, c := range chunks {
				hdr, err := ParseLKHChunkHeader(c)
				if err != nil || len(c) > maxBytes || hdr != (LKHChunkHeader{Counter: r.Counter, Index: uint16(k), Count: uint16(len(chunks))}) {
					t.Errorf("chunk %d: %d bytes, header %+v, %v", k, len(c), hdr, err)
				}
			}
			// Each member reaches the root from a single chunk.
			wantV, wantK := g.tree.GroupKey()
			for name, m := range g.members {
				reached := false
				for _, c := range chunks {
					fresh, _ := NewLKHMember(m.Path())
					if _, err := fresh.Apply(c); err != nil {
						t.Fatalf("%s: %v", name, err)
					}
					if v, k := fresh.GroupKey(); v == wantV && k == wantK {
						reached = true
						break
					}
				}
				if !reached {
					t.Errorf("%s reaches the root from no single chunk", name)
				}
			}
		})
	}
}

func TestLKHChunksOfARekeyWithNothingToWrap(t *testing.T) {
	tree := NewLKHTree(2, lkhRand(1))
	r, err := tree.Rekey([]string{"a", "b"}, nil) // joiners only: no wraps
	if err != nil {
		t.Fatal(err)
	}
	chunks, err := r.Chunks(LKHChunkHeaderSize)
	if err != nil || len(chunks) != 1 || len(chunks[0]) != LKHChunkHeaderSize {
		t.Errorf("Chunks = %d chunks, %v; want one header", len(chunks), err)
	}
	if _, err := r.Chunks(LKHChunkHeaderSize - 1); !errors.Is(err, ErrLKHChunkSize) {
		t.Errorf("Chunks(%d) = %v, want ErrLKHChunkSize", LKHChunkHeaderSize-1, err)
	}
}

func TestLKHApplyRejectsTamperedEntriesAndKeepsTheRest(t *testing.T) {
	const d = 2
	g := newLKHGroup(t, d, 8)
	// m00001's sibling leaves: m00001's new key comes wrapped under its leaf.
	target := g.members["m00001"]
	r, err := g.tree.Leave("m00000")
	if err != nil {
		t.Fatal(err)
	}
	chunks, err := r.Chunks(1 << 18)
	if err != nil || len(chunks) != 1 {
		t.Fatalf("Chunks: %d, %v", len(chunks), err)
	}
	chunk := chunks[0]
	entry := -1
	for k, w := range r.Wraps {
		if w.Under == (LKHNodeID{Level: 0, Index: 1}) {
			entry = k
		}
	}
	if entry < 0 {
		t.Fatal("no wrapped key under leaf 1")
	}
	off := LKHChunkHeaderSize + entry*LKHWrapSize

	for _, tc := range []struct {
		name    string
		at      int // offset within the entry
		wantErr error
	}{
		{"wrapped node's version", 5, ErrUnwrap},
		{"wrapped node's index", 4, ErrUnwrap},
		{"wrapped node's level", 0, ErrUnwrap},
		{"nonce", 18, ErrUnwrap},
		{"ciphertext", 30, ErrUnwrap},
		{"tag", LKHWrapSize - 1, ErrUnwrap},
		{"wrapping key's version: not ours, ignored", 17, nil},
		{"wrapping node's index: not ours, ignored", 13, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, _ := NewLKHMember(target.Path())
			v0, k0 := m.GroupKey()
			bad := bytes.Clone(chunk)
			bad[off+tc.at] ^= 0x01
			n, err := m.Apply(bad)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Errorf("Apply = %d, %v; want %v", n, err, tc.wantErr)
			}
			if v, k := m.GroupKey(); n != 0 || v != v0 || k != k0 {
				t.Errorf("applied %d keys from a chain that was tampered with", n)
			}
			// The intact chunk still works.
			if _, err := m.Apply(chunk); err != nil {
				t.Fatal(err)
			}
			if v, k := m.GroupKey(); v != r.Counter || k == k0 {
				t.Error("the intact chunk no longer brings the new group key")
			}
		})
	}

	// Others whose own chain is intact still get the key from the tampered
	// chunk.
	bad := bytes.Clone(chunk)
	bad[off+40] ^= 0x80
	other, _ := NewLKHMember(g.members["m00007"].Path())
	if _, err := other.Apply(bad); err != nil {
		t.Errorf("m00007, whose chain is intact: %v", err)
	}
	if v, _ := other.GroupKey(); v != r.Counter {
		t.Errorf("m00007 at version %d, want %d", v, r.Counter)
	}
}

func TestLKHApplyRejectsMalformedChunks(t *testing.T) {
	g := newLKHGroup(t, 2, 4)
	r, err := g.tree.Leave("m00000")
	if err != nil {
		t.Fatal(err)
	}
	chunks, _ := r.Chunks(1 << 18)
	good := chunks[0]
	set := func(at int, v byte) []byte { b := bytes.Clone(good); b[at] = v; return b }
	for _, tc := range []struct {
		name  string
		chunk []byte
	}{
		{"empty", nil},
		{"short header", good[:LKHChunkHeaderSize-1]},
		{"partial entry", good[:len(good)-1]},
		{"trailing byte", append(bytes.Clone(good), 0)},
		{"format 2", set(0, 2)},
		{"index past count", set(6, 1)},
		{"count 0", set(8, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, _ := NewLKHMember(g.members["m00001"].Path())
			if n, err := m.Apply(tc.chunk); n != 0 || !errors.Is(err, ErrMalformed) {
				t.Errorf("Apply = %d, %v; want 0, ErrMalformed", n, err)
			}
		})
	}
}

func TestLKHMemberIgnoresStaleAndRepeatedRekeys(t *testing.T) {
	g := newLKHGroup(t, 3, 10)
	m := g.members["m00004"]
	_, first := g.rekey(nil, []string{"m00003"}, 1<<18)
	_, second := g.rekey(nil, []string{"m00005"}, 1<<18)
	v, k := m.GroupKey()
	for _, c := range append(first, second...) {
		if n, err := m.Apply(c); n != 0 || err != nil {
			t.Errorf("Apply of an old chunk = %d, %v; want 0, nil", n, err)
		}
	}
	if v2, k2 := m.GroupKey(); v2 != v || k2 != k {
		t.Error("an old chunk moved the group key back")
	}
}

func TestLKHEmptyBatchRefreshesOnlyTheRoot(t *testing.T) {
	const d = 4
	g := newLKHGroup(t, d, 10) // root over 3 non-empty children
	_, before := g.tree.GroupKey()
	r, _ := g.rekey(nil, nil, 1<<18)
	if len(r.Changed) != 1 || r.Changed[0] != g.tree.rootID() || len(r.Wraps) != 3 {
		t.Errorf("changed %v with %d wrapped keys; want the root with 3", r.Changed, len(r.Wraps))
	}
	if _, after := g.tree.GroupKey(); after == before {
		t.Error("the group key did not change")
	}
}

func TestLKHLastLeaveClearsEveryKey(t *testing.T) {
	g := newLKHGroup(t, 2, 3)
	r, _ := g.rekey(nil, []string{"m00000", "m00001", "m00002"}, 1<<18)
	if len(r.Wraps) != 0 || g.tree.Members() != 0 {
		t.Errorf("%d wrapped keys, %d members; want none", len(r.Wraps), g.tree.Members())
	}
	for l, lvl := range g.tree.levels {
		for i, n := range lvl {
			if n.key != ([GroupKeySize]byte{}) {
				t.Errorf("node %d/%d keeps a key", l, i)
			}
		}
	}
	// The tree is reusable.
	g.rekey([]string{"again"}, nil, 1<<18)
}

func TestLKHRandomChurnKeepsMembersInStepAndLeaversOut(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, d := range []int{2, 3, 5} {
		t.Run(fmt.Sprintf("d=%d", d), func(t *testing.T) {
			g := newLKHGroup(t, d, 30)
			gone := map[string]*LKHMember{} // every member that ever left
			next := 0
			for round := range 40 {
				var leaves, joins []string
				for name := range g.members {
					if rng.IntN(8) == 0 {
						leaves = append(leaves, name)
					}
				}
				for range rng.IntN(6) {
					joins = append(joins, fmt.Sprintf("n%04d", next))
					next++
				}
				for _, m := range leaves {
					gone[fmt.Sprintf("%s@%d", m, round)] = g.members[m]
				}
				_, chunks := g.rekey(joins, leaves, 512+rng.IntN(2048))
				_, key := g.tree.GroupKey()
				for name, m := range gone {
					for _, c := range chunks {
						if _, err := m.Apply(c); err != nil {
							t.Fatalf("%s: %v", name, err)
						}
					}
					if _, k := m.GroupKey(); k == key && g.tree.Members() > 0 {
						t.Fatalf("round %d: %s, who left, holds the group key", round, name)
					}
				}
			}
		})
	}
}

func TestLKHRekeyRefusesBadBatchesAndChangesNothing(t *testing.T) {
	g := newLKHGroup(t, 3, 5)
	before, _ := g.tree.MarshalBinary()
	for _, tc := range []struct {
		name          string
		joins, leaves []string
		want          error
	}{
		{"leave of a stranger", nil, []string{"m00001", "stranger"}, ErrLKHNotMember},
		{"join of a member", []string{"new", "m00002"}, nil, ErrLKHMember},
		{"join listed twice", []string{"new", "new"}, nil, nil},
		{"leave listed twice", nil, []string{"m00001", "m00001"}, nil},
		{"join and leave at once", []string{"m00001"}, []string{"m00001"}, nil},
		{"empty name", []string{""}, nil, nil},
		{"256-byte name", []string{strings.Repeat("x", 256)}, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := g.tree.Rekey(tc.joins, tc.leaves)
			if err == nil || r != nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Errorf("Rekey = %v, %v; want an error (%v)", r, err, tc.want)
			}
			if after, _ := g.tree.MarshalBinary(); !bytes.Equal(after, before) {
				t.Error("the tree changed")
			}
		})
	}
	if _, err := g.tree.Leave("stranger"); !errors.Is(err, ErrLKHNotMember) {
		t.Errorf("Leave(stranger) = %v, want ErrLKHNotMember", err)
	}
	if _, err := g.tree.Path("stranger"); !errors.Is(err, ErrLKHNotMember) {
		t.Errorf("Path(stranger) = %v, want ErrLKHNotMember", err)
	}
}

func TestLKHRekeyFailsCleanlyWithoutRandomness(t *testing.T) {
	g := newLKHGroup(t, 2, 5)
	before, _ := g.tree.MarshalBinary()
	g.tree.rand = strings.NewReader("too short")
	if _, err := g.tree.Leave("m00001"); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("Leave with a failing random source = %v, want io.ErrUnexpectedEOF", err)
	}
	if after, _ := g.tree.MarshalBinary(); !bytes.Equal(after, before) {
		t.Error("the tree changed")
	}
}

func TestLKHRekeyCounterExhaustion(t *testing.T) {
	tree := NewLKHTree(2, lkhRand(1))
	tree.counter = 1<<32 - 2
	if _, err := tree.Rekey([]string{"a"}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := tree.Rekey([]string{"b"}, nil); !errors.Is(err, ErrLKHExhausted) {
		t.Errorf("Rekey at counter %d = %v, want ErrLKHExhausted", tree.Counter(), err)
	}
}

// cloneLKHTree returns a copy through MarshalBinary and UnmarshalBinary.
func cloneLKHTree(t testing.TB, tree *LKHTree) *LKHTree {
	t.Helper()
	b, err := tree.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var c LKHTree
	if err := c.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	return &c
}

func TestLKHTreeMarshalRoundTrip(t *testing.T) {
	g := newLKHGroup(t, 3, 40)
	g.rekey(memberNames("x", 3), []string{"m00003", "m00010", "m00011", "m00012", "m00039"}, 1<<18)

	c := cloneLKHTree(t, g.tree)
	if c.Degree() != 3 || c.Height() != g.tree.Height() || c.Members() != 38 || c.Counter() != g.tree.Counter() {
		t.Errorf("copy: degree %d, height %d, %d members, counter %d", c.Degree(), c.Height(), c.Members(), c.Counter())
	}
	a, _ := g.tree.MarshalBinary()
	b, _ := c.MarshalBinary()
	if !bytes.Equal(a, b) {
		t.Error("the copy encodes differently")
	}
	for name := range g.members {
		p1, _ := g.tree.Path(name)
		p2, err := c.Path(name)
		if err != nil || !reflect.DeepEqual(p1, p2) {
			t.Errorf("%s: paths differ (%v)", name, err)
		}
	}
	// Both behave the same from here: same free leaves, same growth.
	g.tree.rand, c.rand = lkhRand(9), lkhRand(9)
	joins, leaves := memberNames("y", 30), []string{"m00000", "x00001"}
	r1, err1 := g.tree.Rekey(joins, leaves)
	r2, err2 := c.Rekey(joins, leaves)
	if err1 != nil || err2 != nil || !reflect.DeepEqual(r1, r2) {
		t.Errorf("the copy rekeys differently (%v, %v)", err1, err2)
	}
}

func TestLKHTreeUnmarshalRejectsDamageAndKeepsTheTree(t *testing.T) {
	g := newLKHGroup(t, 2, 6)
	g.rekey(nil, []string{"m00002"}, 1<<18)
	good, _ := g.tree.MarshalBinary()
	target := newLKHGroup(t, 3, 2).tree
	keep, _ := target.MarshalBinary()

	bad := map[string][]byte{
		"trailing byte": append(bytes.Clone(good), 0),
		"format 2":      append([]byte{2}, good[1:]...),
		"degree 1":      append([]byte{1, 0, 1}, good[3:]...),
		"height 0":      slices.Concat(good[:7], []byte{0}, good[8:]),
		"height 4":      slices.Concat(good[:7], []byte{4}, good[8:]),
	}
	for n := range len(good) {
		bad[fmt.Sprintf("truncated to %d", n)] = good[:n]
	}
	// The members come last, in leaf order, 11 bytes each (u32 leaf, u8
	// length, a 6-byte name).
	tail := len(good) - 2*11
	first, last := good[tail:tail+11], good[tail+11:]
	bad["members out of order"] = slices.Concat(good[:tail], last, first)
	bad["leaf twice"] = slices.Concat(good[:tail], first, first)
	bad["name twice"] = slices.Concat(good[:tail], first, last[:5], first[5:])
	bad["leaf outside"] = slices.Concat(good[:tail], first, []byte{0, 0, 0, 6}, last[4:])

	for name, b := range bad {
		if err := target.UnmarshalBinary(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: UnmarshalBinary = %v, want ErrMalformed", name, err)
		}
		if now, _ := target.MarshalBinary(); !bytes.Equal(now, keep) {
			t.Fatalf("%s: the tree changed", name)
		}
	}
}

func TestLKHPathMarshalRoundTripAndChecks(t *testing.T) {
	g := newLKHGroup(t, 4, 20)
	p, _ := g.tree.Path("m00017")
	b, err := p.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 7+len(p.Keys)*36 {
		t.Errorf("%d bytes for %d keys", len(b), len(p.Keys))
	}
	q, err := ParseLKHPath(b)
	if err != nil || !reflect.DeepEqual(p, q) {
		t.Errorf("ParseLKHPath: %v; equal %t", err, reflect.DeepEqual(p, q))
	}
	for n := range len(b) {
		if _, err := ParseLKHPath(b[:n]); !errors.Is(err, ErrMalformed) {
			t.Errorf("truncated to %d: %v, want ErrMalformed", n, err)
		}
	}
	for _, tc := range []struct {
		name string
		p    LKHPath
	}{
		{"degree 1", LKHPath{Degree: 1, Keys: p.Keys}},
		{"degree 257", LKHPath{Degree: 257, Keys: p.Keys}},
		{"root alone", LKHPath{Degree: 4, Keys: p.Keys[:1]}},
		{"leaf outside the root", LKHPath{Degree: 4, Leaf: 16, Keys: p.Keys[:3]}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := tc.p.MarshalBinary(); !errors.Is(err, ErrMalformed) {
				t.Errorf("MarshalBinary = %v, want ErrMalformed", err)
			}
			if _, err := NewLKHMember(tc.p); !errors.Is(err, ErrMalformed) {
				t.Errorf("NewLKHMember = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestNewLKHTreePanicsOnBadDegree(t *testing.T) {
	for _, d := range []int{-1, 0, 1, MaxLKHDegree + 1} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewLKHTree(%d) did not panic", d)
				}
			}()
			NewLKHTree(d, nil)
		}()
	}
}

// FuzzLKHApply feeds arbitrary chunks to a member. Nothing may panic; errors
// are the documented ones; a chunk that installs nothing leaves the group
// key alone.
func FuzzLKHApply(f *testing.F) {
	g := newLKHGroup(f, 2, 6)
	start := g.members["m00001"].Path()
	for _, batch := range [][2][]string{{nil, {"m00000"}}, {{"z"}, {"m00004", "m00005"}}, {{"y", "x", "w"}, nil}} {
		r, err := g.tree.Rekey(batch[0], batch[1])
		if err != nil {
			f.Fatal(err)
		}
		chunks, err := r.Chunks(LKHChunkHeaderSize + 4*LKHWrapSize)
		if err != nil {
			f.Fatal(err)
		}
		for _, c := range chunks {
			f.Add(c)
		}
	}
	f.Add([]byte{})
	f.Add([]byte{lkhFormat, 0, 0, 0, 1, 0, 0, 0, 1})

	f.Fuzz(func(t *testing.T, chunk []byte) {
		m, err := NewLKHMember(start)
		if err != nil {
			t.Fatal(err)
		}
		v0, k0 := m.GroupKey()
		n, err := m.Apply(chunk)
		if err != nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnwrap) {
			t.Fatalf("Apply error %v wraps neither ErrMalformed nor ErrUnwrap", err)
		}
		if errors.Is(err, ErrMalformed) && n != 0 {
			t.Fatalf("malformed chunk, yet %d keys installed", n)
		}
		if entries := (len(chunk) - LKHChunkHeaderSize) / LKHWrapSize; n < 0 || n > entries {
			t.Fatalf("%d keys installed from %d entries", n, entries)
		}
		if v, k := m.GroupKey(); n == 0 && (v != v0 || k != k0) {
			t.Fatal("nothing installed, yet the group key changed")
		}
	})
}

// FuzzLKHUnmarshal feeds arbitrary bytes to the LKH decoders: they never
// panic, errors wrap ErrMalformed, and what decodes re-encodes to the input.
func FuzzLKHUnmarshal(f *testing.F) {
	g := newLKHGroup(f, 3, 7)
	g.rekey(nil, []string{"m00002"}, 1<<18)
	tree, _ := g.tree.MarshalBinary()
	path, _ := g.members["m00001"].Path().MarshalBinary()
	f.Add(tree)
	f.Add(path)
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, b []byte) {
		var tree LKHTree
		if err := tree.UnmarshalBinary(b); err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("UnmarshalBinary error %v does not wrap ErrMalformed", err)
			}
		} else if again, _ := tree.MarshalBinary(); !bytes.Equal(again, b) {
			t.Fatal("tree re-encodes differently")
		}
		p, err := ParseLKHPath(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("ParseLKHPath error %v does not wrap ErrMalformed", err)
			}
		} else if again, _ := p.MarshalBinary(); !bytes.Equal(again, b) {
			t.Fatal("path re-encodes differently")
		}
	})
}

// BenchmarkLKHLeave measures the key server's side of one leave (Rekey and
// Chunks at 256 KiB) in a tree of degree 4, and reports the wrapped keys and
// bytes it multicasts.
func BenchmarkLKHLeave(b *testing.B) {
	for _, n := range []int{100, 1000, 10000, 100000} {
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) { benchLKHLeave(b, 4, n) })
	}
}

// BenchmarkLKHDegree compares tree degrees: wrapped keys per leave and join
// (d·log_d n is least near d = 3 and 4, as Wong, Gouda and Lam found). The
// default, 4, sends about 5% more than 3 but gives each member a path of
// fewer levels (9 keys instead of 11 at 100,000 members) and the tree
// fewer nodes; docs/PERFORMANCE.md has the figures.
func BenchmarkLKHDegree(b *testing.B) {
	for _, n := range []int{10000, 100000} {
		for _, d := range []int{2, 3, 4, 5, 8, 16} {
			b.Run(fmt.Sprintf("n=%d/d=%d", n, d), func(b *testing.B) { benchLKHLeave(b, d, n) })
		}
	}
}

// benchLKHLeave measures leaves (each followed, untimed, by the same
// member's join) in a tree of degree d and n members.
func benchLKHLeave(b *testing.B, d, n int) {
	names := memberNames("m", n)
	tree := NewLKHTree(d, nil)
	if _, err := tree.Rekey(names, nil); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	wraps, size, joinWraps := 0, 0, 0
	for i := range b.N {
		name := names[(i*7919)%n]
		r, err := tree.Leave(name)
		if err != nil {
			b.Fatal(err)
		}
		chunks, err := r.Chunks(256 << 10)
		if err != nil {
			b.Fatal(err)
		}
		wraps += len(r.Wraps)
		for _, c := range chunks {
			size += len(c)
		}
		b.StopTimer()
		_, jr, err := tree.Join(name)
		if err != nil {
			b.Fatal(err)
		}
		joinWraps += len(jr.Wraps)
		b.StartTimer()
	}
	b.ReportMetric(float64(wraps)/float64(b.N), "wraps/leave")
	b.ReportMetric(float64(size)/float64(b.N), "bytes/leave")
	b.ReportMetric(float64(joinWraps)/float64(b.N), "wraps/join")
	b.ReportMetric(float64(d*ceilLog(d, n)), "bound")
}

// A tree encoding that claims more members than leaves is refused before
// anything is sized by the claim (a 486-byte input once made the decoder
// allocate a map for 1.3 billion members: FuzzLKHUnmarshal's corpus keeps it).
func TestLKHUnmarshalRefusesAMemberCountBeyondItsLeaves(t *testing.T) {
	tree := NewLKHTree(3, nil)
	if _, err := tree.Rekey(memberNames("m", 7), nil); err != nil {
		t.Fatal(err)
	}
	b, err := tree.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	off := 1 + 2 + 4 + 1 + 4 // the member count follows the nodes
	for _, lvl := range tree.levels {
		off += len(lvl) * (4 + GroupKeySize)
	}
	binary.BigEndian.PutUint32(b[off:], 0x4e934e1d)
	if err := new(LKHTree).UnmarshalBinary(b); !errors.Is(err, ErrMalformed) {
		t.Fatalf("error %v, want ErrMalformed", err)
	}
}
