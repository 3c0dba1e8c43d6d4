package envelope

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"testing"
)

func TestSealerRefusesToWrapPastMaxSeq(t *testing.T) {
	var key GroupKey
	s, err := NewSealer("demo", 1, &key, 1)
	if err != nil {
		t.Fatal(err)
	}
	s.last.Store(math.MaxUint64 - 1)
	_, seq, err := s.Seal(nil, "t", 0, []byte("m"))
	if err != nil || seq != math.MaxUint64 {
		t.Fatalf("last seq: got %d, %v; want %d", seq, err, uint64(math.MaxUint64))
	}
	for range 2 {
		out, seq, err := s.Seal([]byte("dst"), "t", 0, []byte("m"))
		if !errors.Is(err, ErrSeqExhausted) || seq != 0 || string(out) != "dst" {
			t.Errorf("past the last seq: got seq %d, %q, %v; want ErrSeqExhausted", seq, out, err)
		}
	}
	if s.LastSeq() != math.MaxUint64 {
		t.Errorf("LastSeq = %d after refusing, want %d", s.LastSeq(), uint64(math.MaxUint64))
	}
}

// The encoder takes the bitmap 64 bits at a time; the bytes are those of
// the definition, one bit per sequence number from the lowest.
func TestReplayWindowEncodingIsBitByBit(t *testing.T) {
	var w ReplayWindow
	for seq := uint64(1); seq < 3*WindowSize; seq += 1 + seq%5 {
		w.Accept(seq)
		if seq%13 != 0 {
			continue
		}
		want := binary.BigEndian.AppendUint64([]byte{windowEncodingVersion}, w.highest)
		lo := w.lowest()
		for s := lo; s <= w.highest; s += 8 {
			var v byte
			for bit := uint64(0); bit < 8 && s+bit <= w.highest; bit++ {
				if !w.Check(s + bit) { // accepted before
					v |= 1 << bit
				}
			}
			want = append(want, v)
		}
		got, _ := w.MarshalBinary()
		if !bytes.Equal(got, want) {
			t.Fatalf("highest %d: encoding differs from the bit-by-bit definition", w.highest)
		}
	}
}
