package proxy

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestRetainedAndLiveCopiesOfOneValue: a subscription waiting for its
// retained values gets a sealed value once when upstream sends it both as
// retained and live (a publish racing the subscribe), in either order; a
// live message is never held back because an earlier one had the same
// payload, on unprotected topics (where values have no name) as on
// protected ones.
func TestRetainedAndLiveCopiesOfOneValue(t *testing.T) {
	sealed := func(seq uint64) string { return valueID(retainedTriple{Epoch: 1, Sender: 7, Seq: seq}) }
	type step struct {
		retained bool
		id       string // the value's name: "" on unprotected topics
		want     bool   // delivered to the waiting subscription
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"sealed: retained, then its live copy", []step{{true, sealed(5), true}, {false, sealed(5), false}, {false, sealed(6), true}}},
		{"sealed: live, then its retained copy", []step{{false, sealed(5), true}, {true, sealed(5), false}, {false, sealed(6), true}}},
		{"sealed: retained, then another value live", []step{{true, sealed(5), true}, {false, sealed(6), true}}},
		{"unprotected: the same reading twice, live", []step{{false, "", true}, {false, "", true}, {false, "", true}}},
		{"unprotected: retained, then the same payload live", []step{{true, "", true}, {false, "", true}, {false, "", true}}},
		{"unprotected: live, then a retained copy", []step{{false, "", true}, {true, "", false}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p pendingRetained
			p.add("app", packets.Subscription{Filter: "t/#", Qos: 1})
			for i, s := range tc.steps {
				var got bool
				if s.retained {
					got = len(p.claimRetained("t/x", s.id)) == 1
				} else {
					got = !p.claimLive("t/x", func() string { return s.id })["app"]
				}
				if got != s.want {
					t.Fatalf("step %d (retained %v, value %q): delivered %v, want %v", i, s.retained, s.id, got, s.want)
				}
			}
		})
	}
}
