package proxy

import (
	"bytes"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
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
	app, five := localClient("app", 4, false, 0), localClient("five", 5, false, 30)
	st.kept.established(app, false)
	st.kept.established(five, true)
	st.kept.subscribed(app, packets.Subscription{Filter: "secure/#", Qos: 1, Identifier: 3})
	st.kept.subscribed(five, packets.Subscription{Filter: "a/+", Qos: 2, NoLocal: true})
	m := st.kept.hold("secure/x", []byte("held"), 1, false, map[string]byte{"app": 1, "five": 1})
	st.kept.hold("a/b", []byte("kept"), 2, true, map[string]byte{"five": 2})
	st.kept.handed(m, app, 1)
	st.kept.settle(m)
	st.kept.completed(app, 1)
	st.kept.unsubscribed(five, "a/+")
	st.kept.expired("nobody")
	st.kept.disconnected(five, true)
	log := append([]byte(inboundLogMagic), st.pend...)
	log = st.kept.drain(log)
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
		if a, b := st.kept.snapshot(nil), again.kept.snapshot(nil); !bytes.Equal(a, b) {
			t.Fatalf("the kept sessions differ after a snapshot: %x, then %x", a, b)
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
