// The race detector makes sync.Pool drop items at random, so allocation
// counts are only meaningful without it.

//go:build !race

package envelope_test

import (
	"testing"

	"github.com/smqtt/smqtt/envelope"
)

func TestSealAndOpenDoNotAllocateInSteadyState(t *testing.T) {
	key := testKey(1)
	s := mustSealer(t, testGroup, testEpoch, key, 1)
	o := envelope.NewOpener(newRing().set(testGroup, testEpoch, key), 16)
	plaintext := make([]byte, 256)
	msg := make([]byte, 0, 256+envelope.Overhead)
	out := make([]byte, 0, 256)
	m, _, err := s.Seal(msg[:0], testTopic, 0, plaintext)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := o.Open(out[:0], testGroup, testTopic, m); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() { s.Seal(msg[:0], testTopic, 0, plaintext) }); n != 0 {
		t.Errorf("Seal allocates %.1f times per call", n)
	}
	if n := testing.AllocsPerRun(100, func() { o.Open(out[:0], testGroup, testTopic, m) }); n != 0 {
		t.Errorf("Open allocates %.1f times per call", n)
	}
	var w envelope.ReplayWindow
	seq := uint64(0)
	if n := testing.AllocsPerRun(100, func() { seq++; w.Accept(seq) }); n != 0 {
		t.Errorf("ReplayWindow.Accept allocates %.1f times per call", n)
	}
}
