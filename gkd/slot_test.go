package gkd

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"testing"
)

func slotRoot(seed byte) (r [32]byte) {
	r[0] = seed
	return sha256.Sum256(r[:])
}

func TestSlotTreeDerivationIsTheDocumentedHashChain(t *testing.T) {
	root := slotRoot(1)
	tree := NewSlotTree(2, root)
	h := func(label string, v [32]byte) [32]byte { return sha256.Sum256(append([]byte(label), v[:]...)) }
	l, r := h("smqtt/v1 slot L", root), h("smqtt/v1 slot R", root)
	want := [4][32]byte{h("smqtt/v1 slot L", l), h("smqtt/v1 slot R", l), h("smqtt/v1 slot L", r), h("smqtt/v1 slot R", r)}
	for i, w := range want {
		if got, err := tree.Leaf(uint64(i)); err != nil || got != w {
			t.Errorf("Leaf(%d) = %x, %v; want %x", i, got, err, w)
		}
	}
	if _, err := tree.Leaf(4); !errors.Is(err, ErrSlotRange) {
		t.Errorf("Leaf(4) of 4 slots = %v, want ErrSlotRange", err)
	}
}

// TestCoverDerivesExactlyTheRange checks every range of a depth-6 tree: the
// cover is small, its nodes are in slot order, and they give exactly the
// leaves of the range, equal to the tree's.
func TestCoverDerivesExactlyTheRange(t *testing.T) {
	const depth = 6
	tree := NewSlotTree(depth, slotRoot(2))
	leaves := make([][32]byte, tree.Slots())
	for i := range leaves {
		leaves[i], _ = tree.Leaf(uint64(i))
	}
	for a := uint64(0); a < tree.Slots(); a++ {
		for b := a; b < tree.Slots(); b++ {
			nodes, err := tree.Cover(a, b)
			if err != nil {
				t.Fatalf("Cover(%d, %d): %v", a, b, err)
			}
			if len(nodes) > 2*depth {
				t.Errorf("Cover(%d, %d): %d nodes, more than %d", a, b, len(nodes), 2*depth)
			}
			for k := 1; k < len(nodes); k++ {
				if nodes[k].First() != nodes[k-1].Last()+1 {
					t.Errorf("Cover(%d, %d): nodes %d and %d are not consecutive", a, b, k-1, k)
				}
			}
			for i := range tree.Slots() {
				leaf, ok := DeriveLeaf(nodes, i)
				switch inside := a <= i && i <= b; {
				case ok != inside:
					t.Fatalf("Cover(%d, %d): DeriveLeaf(%d) ok = %t", a, b, i, ok)
				case ok && leaf != leaves[i]:
					t.Fatalf("Cover(%d, %d): DeriveLeaf(%d) gives a wrong leaf", a, b, i)
				}
			}
		}
	}
}

func TestCoverIsMinimal(t *testing.T) {
	tree := NewSlotTree(4, slotRoot(3))
	for _, tc := range []struct {
		a, b uint64
		want []string // height/index
	}{
		{0, 15, []string{"4/0"}},
		{0, 7, []string{"3/0"}},
		{8, 15, []string{"3/1"}},
		{5, 5, []string{"0/5"}},
		{1, 14, []string{"0/1", "1/1", "2/1", "2/2", "1/6", "0/14"}},
		{4, 11, []string{"2/1", "2/2"}},
		{3, 12, []string{"0/3", "2/1", "2/2", "0/12"}},
	} {
		nodes, err := tree.Cover(tc.a, tc.b)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, n := range nodes {
			got = append(got, fmt.Sprintf("%d/%d", n.Height, n.Index))
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("Cover(%d, %d) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestCoverRejectsEmptyAndOutsideRanges(t *testing.T) {
	tree := NewSlotTree(3, slotRoot(4))
	for _, r := range [][2]uint64{{3, 2}, {0, 8}, {8, 8}, {1, 1 << 63}} {
		if nodes, err := tree.Cover(r[0], r[1]); !errors.Is(err, ErrSlotRange) || nodes != nil {
			t.Errorf("Cover(%d, %d) = %d nodes, %v; want ErrSlotRange", r[0], r[1], len(nodes), err)
		}
	}
}

func TestCoverOfTheDeepestTree(t *testing.T) {
	tree := NewSlotTree(MaxSlotDepth, slotRoot(5))
	last := tree.Slots() - 1
	nodes, err := tree.Cover(1, last-1)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2*(MaxSlotDepth-1) {
		t.Errorf("%d nodes, want %d", len(nodes), 2*(MaxSlotDepth-1))
	}
	for _, i := range []uint64{0, 1, last / 2, last - 1, last} {
		leaf, ok := DeriveLeaf(nodes, i)
		want, _ := tree.Leaf(i)
		if inside := i != 0 && i != last; ok != inside || (ok && leaf != want) {
			t.Errorf("slot %d: ok = %t, leaf right: %t", i, ok, leaf == want)
		}
	}
}

func TestSlotKeyDependsOnEveryInputAndIsNotTheLeaf(t *testing.T) {
	k2 := [32]byte{1}
	leaf := [32]byte{2}
	base := SlotKey(k2, leaf, "demo", 7, 100, 3)
	if base == leaf || base == k2 {
		t.Fatal("the slot key is one of its inputs")
	}
	for name, k := range map[string][32]byte{
		"another K2":         SlotKey([32]byte{9}, leaf, "demo", 7, 100, 3),
		"another leaf":       SlotKey(k2, [32]byte{9}, "demo", 7, 100, 3),
		"another group":      SlotKey(k2, leaf, "demo2", 7, 100, 3),
		"another tree":       SlotKey(k2, leaf, "demo", 8, 100, 3),
		"another slot":       SlotKey(k2, leaf, "demo", 7, 101, 3),
		"another generation": SlotKey(k2, leaf, "demo", 7, 100, 4),
	} {
		if k == base {
			t.Errorf("%s gives the same key", name)
		}
	}
	if SlotKey(k2, leaf, "demo", 7, 100, 3) != base {
		t.Error("SlotKey is not deterministic")
	}
}

// TestRevokedMemberCannotComputeNewGenerationKeys: a member revoked by a K2
// refresh keeps its leaves and the old K2, and gets none of the new keys,
// whatever generation number it tries.
func TestRevokedMemberCannotComputeNewGenerationKeys(t *testing.T) {
	tree := NewSlotTree(8, slotRoot(6))
	oldK2, newK2 := [32]byte{0xa}, [32]byte{0xb}
	const group, treeID, gen = "plant", 1, 2
	revoked, _ := tree.Cover(0, 255) // it held every slot
	for i := uint64(10); i < 20; i++ {
		leaf, _ := tree.Leaf(i)
		want := SlotKey(newK2, leaf, group, treeID, i, gen+1)
		mine, _ := DeriveLeaf(revoked, i)
		for g := uint32(0); g < 8; g++ {
			if SlotKey(oldK2, mine, group, treeID, i, g) == want {
				t.Fatalf("slot %d: the old K2 with generation %d gives the new key", i, g)
			}
		}
	}
}

// TestSlotKeyVector pins the derivation with values computed from the
// documented formulas by a separate implementation (Python's hashlib and
// hmac), so that another implementation can check itself against them.
func TestSlotKeyVector(t *testing.T) {
	var k2, root [32]byte
	for i := range 32 {
		k2[i], root[i] = byte(i), byte(0x80+i)
	}
	leaf, _ := NewSlotTree(4, root).Leaf(9)
	key := SlotKey(k2, leaf, "demo", 3, 9, 2)
	const (
		wantLeaf = "2f65db2a127b4a551710463b80a9a2a5efc435d016e5dc13b0b2fda34cd04138"
		wantKey  = "230648c9e983c511c9ccb5123dabfec90fcbf8f15ce7e8f43dea91687edacae3"
	)
	if got := hex.EncodeToString(leaf[:]); got != wantLeaf {
		t.Errorf("leaf 9 = %s, want %s", got, wantLeaf)
	}
	if got := hex.EncodeToString(key[:]); got != wantKey {
		t.Errorf("slot key = %s, want %s", got, wantKey)
	}
}

func TestSlotKeyPanicsOnBadGroupName(t *testing.T) {
	for _, group := range []string{"", string(make([]byte, 256))} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("SlotKey with a %d-byte group did not panic", len(group))
				}
			}()
			SlotKey([32]byte{}, [32]byte{}, group, 0, 0, 0)
		}()
	}
}

func TestNewSlotTreePanicsOnBadDepth(t *testing.T) {
	for _, d := range []int{-1, 0, MaxSlotDepth + 1} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewSlotTree(%d) did not panic", d)
				}
			}()
			NewSlotTree(d, [32]byte{})
		}()
	}
}

func TestDeriveLeafIgnoresNodesOutsideAnyTree(t *testing.T) {
	bogus := []SlotNode{{Height: 64, Index: 0}, {Height: 63, Index: 1}, {Height: 200}}
	for _, i := range []uint64{0, 1 << 63, 1<<64 - 1} {
		if _, ok := DeriveLeaf(bogus, i); ok {
			t.Errorf("DeriveLeaf(%d) from nodes outside any tree: ok", i)
		}
	}
}

func TestSlotNodesEncodingRoundTrip(t *testing.T) {
	tree := NewSlotTree(10, slotRoot(7))
	nodes, _ := tree.Cover(3, 1000)
	b, err := AppendSlotNodes([]byte("prefix"), nodes)
	if err != nil {
		t.Fatal(err)
	}
	b = b[len("prefix"):]
	if len(b) != 1+len(nodes)*SlotNodeSize {
		t.Errorf("%d bytes for %d nodes", len(b), len(nodes))
	}
	got, err := ParseSlotNodes(b)
	if err != nil || fmt.Sprint(got) != fmt.Sprint(nodes) {
		t.Errorf("ParseSlotNodes: %v; equal %t", err, fmt.Sprint(got) == fmt.Sprint(nodes))
	}
	for n := range len(b) {
		if _, err := ParseSlotNodes(b[:n]); !errors.Is(err, ErrMalformed) {
			t.Errorf("truncated to %d: %v, want ErrMalformed", n, err)
		}
	}
	if _, err := ParseSlotNodes(append(bytes.Clone(b), 0)); !errors.Is(err, ErrMalformed) {
		t.Errorf("trailing byte: %v, want ErrMalformed", err)
	}
	outside := append([]byte{1, 63}, make([]byte, 40)...)
	outside[9] = 1 // index 1 at height 63
	if _, err := ParseSlotNodes(outside); !errors.Is(err, ErrMalformed) {
		t.Errorf("node outside any tree: %v, want ErrMalformed", err)
	}
	if _, err := AppendSlotNodes(nil, []SlotNode{{Height: 64}}); !errors.Is(err, ErrSlotRange) {
		t.Errorf("AppendSlotNodes of a node outside any tree: %v, want ErrSlotRange", err)
	}
	if _, err := AppendSlotNodes(nil, make([]SlotNode, 256)); !errors.Is(err, ErrSlotRange) {
		t.Errorf("AppendSlotNodes of 256 nodes: %v, want ErrSlotRange", err)
	}
}

// FuzzCover checks, for any depth and range, that the cover is exact: its
// nodes are the tree's own, consecutive from a to b, at most 2·depth of
// them, and they derive the leaves at the edges of the range and nothing
// just outside.
func FuzzCover(f *testing.F) {
	f.Add(uint8(6), uint64(3), uint64(40))
	f.Add(uint8(16), uint64(0), uint64(65535))
	f.Add(uint8(63), uint64(1), uint64(1<<63-2))
	f.Add(uint8(1), uint64(1), uint64(1))
	root := slotRoot(8)

	f.Fuzz(func(t *testing.T, depth uint8, a, b uint64) {
		d := 1 + int(depth)%MaxSlotDepth
		tree := NewSlotTree(d, root)
		a, b = a%tree.Slots(), b%tree.Slots()
		if a > b {
			a, b = b, a
		}
		nodes, err := tree.Cover(a, b)
		if err != nil {
			t.Fatalf("Cover(%d, %d) at depth %d: %v", a, b, d, err)
		}
		if len(nodes) == 0 || len(nodes) > 2*d {
			t.Fatalf("%d nodes at depth %d", len(nodes), d)
		}
		if nodes[0].First() != a || nodes[len(nodes)-1].Last() != b {
			t.Fatalf("nodes span %d to %d, want %d to %d", nodes[0].First(), nodes[len(nodes)-1].Last(), a, b)
		}
		for k, n := range nodes {
			if k > 0 && n.First() != nodes[k-1].Last()+1 {
				t.Fatalf("nodes %d and %d are not consecutive", k-1, k)
			}
			// The node is the tree's: its first leaf derives from the root too.
			want, _ := tree.Leaf(n.First())
			if got, ok := DeriveLeaf([]SlotNode{n}, n.First()); !ok || got != want {
				t.Fatalf("node %d/%d is not the tree's", n.Height, n.Index)
			}
		}
		for _, i := range []uint64{a, b, a + (b-a)/2} {
			want, _ := tree.Leaf(i)
			if got, ok := DeriveLeaf(nodes, i); !ok || got != want {
				t.Fatalf("slot %d inside: ok = %t", i, ok)
			}
		}
		for _, i := range []uint64{a - 1, b + 1} {
			if i >= a && i <= b { // wrapped around
				continue
			}
			if _, ok := DeriveLeaf(nodes, i); ok {
				t.Fatalf("slot %d outside %d to %d derives", i, a, b)
			}
		}
	})
}
