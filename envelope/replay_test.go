package envelope_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/smqtt/smqtt/envelope"
)

// modelWindow is the specification of ReplayWindow, written as plainly as
// possible: a set of every accepted seq.
type modelWindow struct {
	highest uint64
	seen    map[uint64]bool
}

func (m *modelWindow) accept(seq uint64) bool {
	if seq == 0 || m.seen[seq] || (seq <= m.highest && m.highest-seq >= envelope.WindowSize) {
		return false
	}
	m.seen[seq] = true
	m.highest = max(m.highest, seq)
	return true
}

func TestReplayWindowAcceptsInOrderOnce(t *testing.T) {
	var w envelope.ReplayWindow
	for seq := uint64(1); seq <= 3*envelope.WindowSize; seq++ {
		if !w.Accept(seq) {
			t.Fatalf("in-order seq %d rejected", seq)
		}
		if w.Accept(seq) {
			t.Fatalf("duplicate seq %d accepted", seq)
		}
		if seq > 1 && w.Accept(seq-1) {
			t.Fatalf("duplicate seq %d accepted after %d", seq-1, seq)
		}
	}
	if w.Highest() != 3*envelope.WindowSize {
		t.Errorf("Highest = %d, want %d", w.Highest(), 3*envelope.WindowSize)
	}
}

func TestReplayWindowCases(t *testing.T) {
	type step struct {
		seq  uint64
		want bool
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"seq 0 is never valid", []step{{0, false}, {1, true}, {0, false}}},
		{"out of order within the window", []step{{100, true}, {50, true}, {99, true}, {1, true}, {50, false}, {99, false}, {1, false}, {100, false}, {101, true}}},
		{"oldest seq inside the window, and the first outside", []step{
			{10000, true}, {10000 - envelope.WindowSize, false}, {10000 - envelope.WindowSize + 1, true}, {10000 - envelope.WindowSize + 1, false}}},
		{"jump far ahead forgets the old window", []step{
			{1, true}, {2, true}, {1 << 40, true}, {2, false}, {1<<40 - 1, true}, {1<<40 - envelope.WindowSize + 1, true}, {1<<40 - envelope.WindowSize, false}, {1 << 40, false}}},
		{"jump of exactly one ring turn", []step{{64, true}, {64 + 129*64, true}, {64, false}, {65 + 128*64, true}, {64 + 129*64, false}}},
		{"largest seq", []step{{math.MaxUint64, true}, {math.MaxUint64, false}, {math.MaxUint64 - 1, true}, {math.MaxUint64 - envelope.WindowSize, false}}},
		{"stale bits from a previous turn of the ring do not count", []step{
			{5, true}, {5 + envelope.WindowSize + 64, true}, {5 + 2*(envelope.WindowSize+64), true}, {5 + 2*(envelope.WindowSize+64) - 1, true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w envelope.ReplayWindow
			for i, s := range tt.steps {
				if got := w.Check(s.seq); got != s.want {
					t.Fatalf("step %d: Check(%d) = %v, want %v", i, s.seq, got, s.want)
				}
				if got := w.Accept(s.seq); got != s.want {
					t.Fatalf("step %d: Accept(%d) = %v, want %v", i, s.seq, got, s.want)
				}
			}
		})
	}
}

func TestReplayWindowCheckDoesNotMark(t *testing.T) {
	var w envelope.ReplayWindow
	for range 3 {
		if !w.Check(7) {
			t.Fatal("Check(7) on an empty window = false")
		}
	}
	if w.Highest() != 0 || !w.Accept(7) || w.Check(7) {
		t.Error("Check changed the window, or Accept did not mark")
	}
}

// randomSeqs returns n seqs that wander around a moving front: mostly near
// it, in both directions, sometimes far ahead, sometimes repeated.
func randomSeqs(r *rand.Rand, n int) []uint64 {
	front := uint64(1)
	seqs := make([]uint64, 0, n)
	for range n {
		var seq uint64
		switch p := r.IntN(100); {
		case p < 2:
			front += r.Uint64N(50000) // jump ahead
			seq = front
		case p < 10 && len(seqs) > 0:
			seq = seqs[r.IntN(len(seqs))] // replay
		default:
			d := r.Uint64N(2*envelope.WindowSize + 200)
			seq = max(front+100, d) - d // around and below the front
			front++
		}
		seqs = append(seqs, seq)
	}
	return seqs
}

func TestReplayWindowMatchesModel(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var w envelope.ReplayWindow
	m := modelWindow{seen: make(map[uint64]bool)}
	for i, seq := range randomSeqs(r, 200000) {
		check := w.Check(seq)
		got, want := w.Accept(seq), m.accept(seq)
		if got != want || check != want {
			t.Fatalf("step %d seq %d (highest %d): Check %v, Accept %v, model %v", i, seq, m.highest, check, got, want)
		}
		if w.Highest() != m.highest {
			t.Fatalf("step %d: Highest = %d, model %d", i, w.Highest(), m.highest)
		}
	}
}

func TestReplayWindowMarshalRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var w envelope.ReplayWindow
	seqs := randomSeqs(r, 60000)
	for i, seq := range seqs {
		w.Accept(seq)
		if i%997 != 0 {
			continue
		}
		enc, err := w.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if len(enc) > envelope.MaxReplayWindowEncodingLen {
			t.Fatalf("encoding is %d bytes, above the %d maximum", len(enc), envelope.MaxReplayWindowEncodingLen)
		}
		var restored envelope.ReplayWindow
		if err := restored.UnmarshalBinary(enc); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if again, _ := restored.MarshalBinary(); !bytes.Equal(again, enc) {
			t.Fatalf("step %d: re-encoding differs", i)
		}
		// The restored window answers like the original for every seq
		// the original could still be asked about.
		for s := w.Highest() - min(w.Highest(), envelope.WindowSize+2); s <= w.Highest()+2; s++ {
			if restored.Check(s) != w.Check(s) {
				t.Fatalf("step %d: restored Check(%d) = %v, original %v", i, s, restored.Check(s), w.Check(s))
			}
		}
	}
}

func TestReplayWindowEncodingSizes(t *testing.T) {
	var w envelope.ReplayWindow
	for _, tc := range []struct {
		accept uint64 // accept 1..accept
		want   int
	}{
		{0, 9}, {1, 10}, {8, 10}, {9, 11}, {envelope.WindowSize, envelope.MaxReplayWindowEncodingLen}, {5 * envelope.WindowSize, envelope.MaxReplayWindowEncodingLen},
	} {
		for seq := w.Highest() + 1; seq <= tc.accept; seq++ {
			w.Accept(seq)
		}
		enc, err := w.MarshalBinary()
		if err != nil || len(enc) != tc.want {
			t.Errorf("after accepting 1..%d: %d bytes (%v), want %d", tc.accept, len(enc), err, tc.want)
		}
	}
	if envelope.MaxReplayWindowEncodingLen != 1+8+1024 {
		t.Errorf("MaxReplayWindowEncodingLen = %d, want 1033", envelope.MaxReplayWindowEncodingLen)
	}
}

func TestReplayWindowUnmarshalRejectsMalformed(t *testing.T) {
	enc := func(highest uint64, bitmap ...byte) []byte {
		return append(binary.BigEndian.AppendUint64([]byte{1}, highest), bitmap...)
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"nil", nil},
		{"header cut short", enc(5)[:8]},
		{"version 0", append([]byte{0}, enc(0)[1:]...)},
		{"version 2", append([]byte{2}, enc(0)[1:]...)},
		{"empty window with a bitmap", enc(0, 0)},
		{"bitmap missing", enc(5)},
		{"bitmap a byte short", enc(9, 0xff)},
		{"bitmap a byte long", enc(5, 0x10, 0)},
		{"bits past highest", enc(5, 0x30)},
		{"highest not marked", enc(5, 0x0f)},
		{"full window, truncated", append(enc(envelope.WindowSize*3), bytes.Repeat([]byte{0xff}, 1023)...)},
		{"full window, extended", append(enc(envelope.WindowSize*3), bytes.Repeat([]byte{0xff}, 1025)...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w envelope.ReplayWindow
			w.Accept(3)
			err := w.UnmarshalBinary(tt.data)
			if !errors.Is(err, envelope.ErrReplayWindowEncoding) {
				t.Fatalf("err = %v, want ErrReplayWindowEncoding", err)
			}
			if w.Highest() != 3 || w.Check(3) || !w.Check(2) {
				t.Errorf("a failed UnmarshalBinary changed the window")
			}
		})
	}
	// The smallest valid encodings, for contrast.
	var w envelope.ReplayWindow
	for _, data := range [][]byte{enc(0), enc(5, 0x10), enc(8, 0x80), enc(9, 0x00, 0x01)} {
		if err := w.UnmarshalBinary(data); err != nil {
			t.Errorf("UnmarshalBinary(%x): %v", data, err)
		}
	}
}
