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
	// a persistent app session with windows, a subscription and a Will
	s := st.openSession("app-1", false, true, 60)
	st.sessionSubscribed(s, "secure/#", true)
	st.commitSession(s, sessionMark{key: senderKey{"g", 1, 7}, seq: 44})
	st.commitSession(s, sessionMark{slot: 1, key: senderKey{"g", 1, 7}, seq: 44})
	st.commitSession(s, sessionMark{will: true, triple: retainedTriple{Epoch: 1, Sender: 7, Seq: 2}})
	st.closeSession(s, s.connection, 60)
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
		if len(again.sessions) != len(st.sessions) {
			t.Fatalf("the snapshot has %d sessions, the state %d", len(again.sessions), len(st.sessions))
		}
		for name, s := range st.sessions {
			a := again.sessions[name]
			if a == nil || len(a.windows) != len(s.windows) || len(a.subs) != len(s.subs) || len(a.wills) != len(s.wills) || a.expiry != s.expiry {
				t.Fatalf("session %q differs after a snapshot", name)
			}
			for k, w := range s.windows {
				x, _ := w.MarshalBinary()
				y, _ := a.windows[k].MarshalBinary()
				if !bytes.Equal(x, y) {
					t.Fatalf("session %q window %+v differs after a snapshot", name, k)
				}
			}
		}
	})
}
