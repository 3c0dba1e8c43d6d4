package gkd

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
	"time"
)

func testGrant(t testing.TB, depth int, first, last uint64) SlotGrant {
	t.Helper()
	covers, err := SlotCovers(depth, first, last, func(tree uint32) ([32]byte, error) { return slotRoot(byte(tree)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return SlotGrant{
		Origin: time.UnixMilli(1_700_000_000_123), Slot: 10 * time.Second,
		Depth: uint8(depth), Skew: 1, First: first, Last: last, Covers: covers,
	}
}

// A grant that runs past the end of a tree carries the next tree's cover,
// and derives exactly the keys the key server derives from the trees' roots,
// for the granted slots and no others.
func TestSlotGrantSpansTreesAndDerivesOnlyItsSlots(t *testing.T) {
	const depth = 4 // 16 slots a tree
	g := testGrant(t, depth, 13, 35)
	if len(g.Covers) != 3 || g.Covers[0].Tree != 0 || g.Covers[2].Tree != 2 {
		t.Fatalf("covers %+v, want trees 0, 1 and 2", g.Covers)
	}
	k2 := slotRoot(99)
	for s := uint64(10); s < 40; s++ {
		tree, leaf := uint32(s>>depth), s&15
		l, _ := NewSlotTree(depth, slotRoot(byte(tree))).Leaf(leaf)
		want := SlotKey(k2, l, "g", tree, leaf, 7)
		got, ok := g.Key(k2, "g", 7, s)
		if in := s >= 13 && s <= 35; ok != in || ok && got != want {
			t.Fatalf("slot %d: derived %t (want %t), key matches %t", s, ok, in, got == want)
		}
	}
}

func TestSlotGrantRoundTripAndClock(t *testing.T) {
	g := testGrant(t, 16, 100, 460)
	b, err := g.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	p, err := ParseSlotGrant(b)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := p.MarshalBinary()
	if !bytes.Equal(again, b) || !p.Origin.Equal(g.Origin) || p.Slot != g.Slot || p.First != 100 || p.Last != 460 {
		t.Fatalf("round trip changed the grant: %+v", p)
	}
	if s, ok := p.SlotAt(g.Origin.Add(25 * time.Second)); !ok || s != 2 {
		t.Fatalf("SlotAt(origin+25s) = %d, %t; want 2", s, ok)
	}
	if _, ok := p.SlotAt(g.Origin.Add(-time.Millisecond)); ok {
		t.Fatal("a time before the origin has a slot")
	}
	if got := p.SlotStart(3); !got.Equal(g.Origin.Add(30 * time.Second)) {
		t.Fatalf("SlotStart(3) = %v", got)
	}
}

func TestSlotEpochPacksGenerationAndSlot(t *testing.T) {
	if e := SlotEpoch(2, 1<<24+5); e != 2<<24|5 {
		t.Fatalf("SlotEpoch(2, 2^24+5) = %#x", e)
	}
	if SlotEpoch(1, 9) == SlotEpoch(2, 9) || SlotEpoch(1, 9) == SlotEpoch(1, 10) {
		t.Fatal("neighbouring generations or slots share an epoch")
	}
}

func TestParseSlotGrantRejectsMalformed(t *testing.T) {
	good, _ := testGrant(t, 4, 3, 20).MarshalBinary()
	mutate := func(f func(b []byte) []byte) []byte { return f(append([]byte{}, good...)) }
	cases := map[string][]byte{
		"empty":         {},
		"truncated":     good[:len(good)-1],
		"trailing":      append(append([]byte{}, good...), 0),
		"zero slot":     mutate(func(b []byte) []byte { copy(b[8:12], []byte{0, 0, 0, 0}); return b }),
		"depth zero":    mutate(func(b []byte) []byte { b[12] = 0; return b }),
		"depth 64":      mutate(func(b []byte) []byte { b[12] = 64; return b }),
		"first > last":  mutate(func(b []byte) []byte { b[14+7] = 200; return b }),
		"node too high": mutate(func(b []byte) []byte { b[31+4+1] = 9; return b }), // first node's height above depth 4
	}
	for name, b := range cases {
		if _, err := ParseSlotGrant(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: error %v, want ErrMalformed", name, err)
		}
	}
}

// FuzzParseSlotGrant: arbitrary bytes never panic, errors wrap
// ErrMalformed, and whatever parses re-encodes to the input and derives keys
// only for the slots it claims.
func FuzzParseSlotGrant(f *testing.F) {
	for _, g := range []SlotGrant{testGrant(f, 4, 3, 20), testGrant(f, 16, 0, 0), testGrant(f, 1, 5, 9)} {
		b, _ := g.MarshalBinary()
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := ParseSlotGrant(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		again, err := g.MarshalBinary()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("re-encoding: %v, equal %t", err, bytes.Equal(again, b))
		}
		for _, s := range []uint64{g.First, g.Last, g.First - 1, g.Last + 1} {
			g.Key([32]byte{}, "g", 0, s) // must not panic
		}
	})
}

// TestSlotGrantVector pins the grant's encoding (docs/PROTOCOL.md 3.3) with
// bytes computed from the documented formulas by a separate implementation
// (Python's hashlib and struct): depth 4, root 80 81 … 9f, slots 5 to 12 of
// tree 0, 10 s slots from 1,700,000,000,000 ms, skew 1.
func TestSlotGrantVector(t *testing.T) {
	var root [32]byte
	for i := range 32 {
		root[i] = byte(0x80 + i)
	}
	nodes, err := NewSlotTree(4, root).Cover(5, 12)
	if err != nil {
		t.Fatal(err)
	}
	g := SlotGrant{Origin: time.UnixMilli(1_700_000_000_000), Slot: 10 * time.Second, Depth: 4, Skew: 1, First: 5, Last: 12,
		Covers: []SlotCover{{Tree: 0, Nodes: nodes}}}
	b, err := g.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	const want = "0000018bcfe568000000271004010000000000000005000000000000000c01000000000400" +
		"0000000000000005ae4d791bc9405c5f39177954f0f7cd8687ea75f716f48f91dc49a56fc6e4de36" +
		"0100000000000000030ee9c903c73abbe8bcc2c35f151ce4a575fa5d8549d81466c1567737f14c756b" +
		"020000000000000002de53a6ff49ee72723d0f70bcf7fd828af9409561e850f3d480b5077a7e500ee1" +
		"00000000000000000c7f5e93c14a2f3ae8a9c81b3fb2f1cc7ace10415c4ea5b13c7428f54d41b0e1c4"
	if got := hex.EncodeToString(b); got != want {
		t.Fatalf("grant encodes as\n%s\nwant\n%s", got, want)
	}
}
