package keyserver

import (
	"fmt"
	"testing"

	"github.com/smqtt/smqtt/gkd"
)

// The measured costs follow the schemes' shapes: update and slotted leaves
// send one sealed key per remaining member, an lkh leave a few wrapped keys
// within d·⌈log_d n⌉, a slotted join nothing to the others, and a batch of
// lkh leaves shares path keys.
func TestCostFollowsTheSchemes(t *testing.T) {
	const n = 64
	cost := func(scheme string, batch int) CostResult {
		r, err := Cost(CostOptions{Scheme: scheme, Members: n, Batch: batch, Suite: gkd.SuiteX25519, Dir: t.TempDir()})
		if err != nil {
			t.Fatalf("%s: %v", scheme, err)
		}
		return r
	}
	update, lkh, lkh8, slotted := cost("update", 1), cost("lkh", 1), cost("lkh", 8), cost("slotted", 1)
	if update.Leave.Messages != n || update.Leave.WrappedKeys != n { // n+1 after the join, one left
		t.Errorf("update leave: %+v, want %d sealed rekeys", update.Leave, n)
	}
	if update.Join.Messages != n+1 {
		t.Errorf("update join: %+v, want a rekey to each of %d members and the join response", update.Join, n)
	}
	// n+1 = 65 members when one leaves: d·⌈log_d 65⌉ = 4·4
	if lkh.Leave.Messages != 1 || lkh.Leave.WrappedKeys > 16 || lkh.Leave.WrappedKeys < 3 {
		t.Errorf("lkh leave: %+v, want one broadcast of 3 to 16 wrapped keys (d=4, n=%d)", lkh.Leave, n+1)
	}
	if lkh8.Leave.WrappedKeys >= lkh.Leave.WrappedKeys {
		t.Errorf("lkh: 8 leaves in one batch cost %.1f wrapped keys each, one alone %.1f: a batch should share path keys", lkh8.Leave.WrappedKeys, lkh.Leave.WrappedKeys)
	}
	if slotted.Join.Messages != 1 || slotted.Leave.Messages != n {
		t.Errorf("slotted: join %+v (want only the join response), leave %+v (want a K2 refresh to each of %d)", slotted.Join, slotted.Leave, n)
	}
	for _, r := range []CostResult{update, lkh, lkh8, slotted} {
		if r.Join.ServerTime <= 0 || r.Leave.ServerTime <= 0 || r.Leave.Bytes <= 0 {
			t.Errorf("%s batch %d: no time or bytes measured: %+v", r.Scheme, r.Batch, r)
		}
	}
}

// BenchmarkSchemeCost reports, per scheme and size, what one join and one
// leave cost: messages, keys and bytes sent, and the key server's time.
// n = 10^5 takes a while for update and slotted (one HPKE seal per member);
// select sizes with -bench 'SchemeCost/.*n=1000$'.
func BenchmarkSchemeCost(b *testing.B) {
	for _, n := range []int{100, 1000, 10000, 100000} {
		for _, c := range []struct {
			scheme string
			batch  int
		}{{"update", 1}, {"lkh", 1}, {"lkh", 16}, {"slotted", 1}} {
			b.Run(fmt.Sprintf("%s/batch=%d/n=%d", c.scheme, c.batch, n), func(b *testing.B) {
				var r CostResult
				for b.Loop() {
					var err error
					if r, err = Cost(CostOptions{Scheme: c.scheme, Members: n, Batch: c.batch, Dir: b.TempDir()}); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(r.Join.WrappedKeys, "join-keys")
				b.ReportMetric(r.Join.Bytes, "join-bytes")
				b.ReportMetric(float64(r.Join.ServerTime.Microseconds()), "join-µs")
				b.ReportMetric(r.Leave.WrappedKeys, "leave-keys")
				b.ReportMetric(r.Leave.Bytes, "leave-bytes")
				b.ReportMetric(float64(r.Leave.ServerTime.Microseconds()), "leave-µs")
			})
		}
	}
}
