package envelope

import (
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
