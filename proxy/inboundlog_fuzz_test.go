package proxy

import (
	"bytes"
	"testing"
)

// FuzzInboundLog loads arbitrary bytes as an inbound log: it must neither
// crash nor hang, load only a prefix of the input, and whatever state it
// loads must come back the same from its own snapshot (so that a compaction
// never changes what a restarted sidecar refuses).
func FuzzInboundLog(f *testing.F) {
	st := newReplayState()
	for seq := uint64(1); seq <= 40; seq += 3 {
		st.accept("g", 1, 7, seq)
		st.accept("h", 2, 8, seq*100)
	}
	st.freshRetained("secure/r", retainedTriple{Epoch: 1, Sender: 7, Seq: 9})
	st.closeRunLocked()
	log := append([]byte(inboundLogMagic), st.pend...)
	f.Add(log)
	f.Add(log[:len(log)-5])
	f.Add(st.snapshot())
	f.Add([]byte(inboundLogMagic))
	f.Add([]byte("SMQTINB1\x00\x00\x00\x00\xff\xff\xff\xff"))

	f.Fuzz(func(t *testing.T, data []byte) {
		st := newReplayState()
		good, err := decodeInboundLog(data, st.apply)
		if good < 0 || good > len(data) {
			t.Fatalf("a good prefix of %d bytes in %d", good, len(data))
		}
		if err != nil {
			return
		}
		snap := st.snapshot()
		again := newReplayState()
		n, err := decodeInboundLog(snap, again.apply)
		if err != nil || n != len(snap) {
			t.Fatalf("a snapshot does not load whole: %d of %d bytes, %v", n, len(snap), err)
		}
		if len(again.windows) != len(st.windows) || len(again.retained) != len(st.retained) {
			t.Fatalf("the snapshot has %d windows and %d registers, the state %d and %d", len(again.windows), len(again.retained), len(st.windows), len(st.retained))
		}
		for k, w := range st.windows {
			a, _ := w.MarshalBinary()
			b, _ := again.windows[k].MarshalBinary()
			if !bytes.Equal(a, b) {
				t.Fatalf("window %+v differs after a snapshot", k)
			}
		}
		for topic, v := range st.retained {
			if again.retained[topic] != v {
				t.Fatalf("register %q differs after a snapshot", topic)
			}
		}
	})
}
