package keyserver_test

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/fleet"
)

// TestLKHLeaveThreeWays: in an lkh group, members that leave by a clean
// shutdown, by crashing and by revocation open nothing sent after the rekey
// and lack the new epoch's key, while the others exchange messages across
// each rekey.
func TestLKHLeaveThreeWays(t *testing.T) { testLeaveThreeWays(t, "lkh") }

// TestLKHNewMemberCannotReadEarlierTraffic: backward secrecy in lkh.
func TestLKHNewMemberCannotReadEarlierTraffic(t *testing.T) {
	testNewMemberCannotReadEarlierTraffic(t, "lkh")
}

// TestLKHKeyServerRestartKeepsTree: a restarted key server has the same key
// tree: same epoch and key, and its next rekey, wrapped under the members'
// path keys, reaches everyone without a rejoin.
func TestLKHKeyServerRestartKeepsTree(t *testing.T) { testRestartKeepsKeys(t, "lkh") }

// newKeyFleet is a fleet of key clients only (no sidecars) with the given
// rekey batching window.
func newKeyFleet(t *testing.T, batch time.Duration, members []string) *testFleet {
	t.Helper()
	up, err := embedded.Start(embedded.Options{})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	f, err := fleet.New(fleet.Options{
		UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: t.TempDir(),
		Scheme: "lkh", Members: members, RekeyBatch: batch,
	})
	must(t, err)
	t.Cleanup(f.Close)
	return &testFleet{Fleet: f, t: t, up: up}
}

// startKeyClients starts a key client for each name without waiting, then
// waits until all seal under one epoch, which it returns.
func (f *testFleet) startKeyClients(names []string) ([]*fleet.Node, uint32) {
	f.t.Helper()
	var nodes []*fleet.Node
	for _, name := range names {
		n, err := f.KeyClient(name, nil, 0) // joined or not: waited for below
		if n == nil {
			must(f.t, err)
		}
		nodes = append(nodes, n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, n := range nodes {
		must(f.t, n.Keys.WaitJoined(ctx))
	}
	e, err := fleet.Settle(10*time.Second, nodes...)
	must(f.t, err)
	return nodes, e
}

// senders returns each node's sender id: a rejoin draws a new one, so an
// unchanged id shows that a node followed a rekey by itself.
func senders(nodes []*fleet.Node) map[string]uint64 {
	out := map[string]uint64{}
	for _, n := range nodes {
		out[n.Name] = n.Keys.Status()[0].Sender
	}
	return out
}

// groupRekeys parses the GroupRekey messages the broker saw, by tree rekey
// counter: the number of wrapped keys each rekey multicast and the message
// counters its chunks carried.
func (f *testFleet) groupRekeys() (wraps map[uint32]int, counters map[uint32]map[uint64]bool) {
	f.t.Helper()
	topic := gkd.GroupTopic("smqtt/v1", gkd.GroupID(f.Server.Public().RawID(), fleet.Group))
	wraps, counters = map[uint32]int{}, map[uint32]map[uint64]bool{}
	for _, s := range f.up.Spy.All() {
		if s.Topic != topic {
			continue
		}
		msg, err := gkd.Parse(s.Payload)
		must(f.t, err)
		if msg.Type != gkd.TypeGroupRekey {
			continue
		}
		must(f.t, msg.Verify(f.Server.Public()))
		gr, err := gkd.ParseGroupRekey(msg.Body)
		must(f.t, err)
		h, err := gkd.ParseLKHChunkHeader(gr.Chunk)
		must(f.t, err)
		wraps[h.Counter] += (len(gr.Chunk) - gkd.LKHChunkHeaderSize) / gkd.LKHWrapSize
		if counters[h.Counter] == nil {
			counters[h.Counter] = map[uint64]bool{}
		}
		counters[h.Counter][gr.Counter] = true
	}
	return wraps, counters
}

// TestLKHBatchedLeavesRekeyOnce: leaves within one rekey_batch window make
// one rekey: the epoch moves by one, one multicast goes out, and none of the
// leavers holds the new key.
func TestLKHBatchedLeavesRekeyOnce(t *testing.T) {
	names := []string{"a", "b", "c", "x", "y", "z"}
	f := newKeyFleet(t, 500*time.Millisecond, names)
	nodes, before := f.startKeyClients(names)
	stay, leavers := nodes[:3], nodes[3:]
	ids := senders(stay)
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != before {
		t.Fatalf("key server at epoch %d, members at %d", e, before)
	}

	var wg sync.WaitGroup
	for _, n := range leavers {
		wg.Go(n.Keys.Close)
	}
	wg.Wait()
	after := waitEpoch(t, stay[0], before)
	if after != before+1 {
		t.Fatalf("3 leaves in one batch moved the epoch from %d to %d, want %d", before, after, before+1)
	}
	if _, err := fleet.Settle(10*time.Second, stay...); err != nil {
		t.Fatal(err)
	}
	if got := senders(stay); !maps.Equal(got, ids) {
		t.Fatalf("sender ids %v, were %v: members rejoined instead of following the rekey", got, ids)
	}
	time.Sleep(600 * time.Millisecond) // a second batch window, if any, would end now
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != after {
		t.Fatalf("key server moved on to epoch %d after %d: the leaves were not batched", e, after)
	}
	wraps, counters := f.groupRekeys()
	for v := range wraps {
		if v > after {
			t.Errorf("a rekey %d after the batch", v)
		}
	}
	if len(counters[after]) != 1 || wraps[after] == 0 {
		t.Fatalf("rekey %d: %d wrapped keys under message counters %v, want some under one counter", after, wraps[after], counters[after])
	}
	for _, n := range leavers {
		if _, has := n.Ring.GroupKey(fleet.Group, after); has {
			t.Fatalf("%s left but holds the key of epoch %d", n.Name, after)
		}
	}
}

// TestLKHLeaveCostIsLogarithmic: one leave from a 50-member group of degree
// 4 multicasts at most degree × height = 12 wrapped keys, not the 49 keys
// that update sends, and every remaining member follows it.
func TestLKHLeaveCostIsLogarithmic(t *testing.T) {
	const members = 50
	var names []string
	for i := range members {
		names = append(names, fmt.Sprintf("m%02d", i))
	}
	f := newKeyFleet(t, 50*time.Millisecond, names)
	nodes, before := f.startKeyClients(names)

	leaver := nodes[members/2]
	rest := append(append([]*fleet.Node(nil), nodes[:members/2]...), nodes[members/2+1:]...)
	ids := senders(rest)
	leaver.Keys.Close()
	after := waitEpoch(t, nodes[0], before)
	if _, err := fleet.Settle(10*time.Second, rest...); err != nil {
		t.Fatal(err)
	}
	for _, n := range rest {
		if s := n.Keys.Status(); s[0].Epoch != after || !s[0].Joined {
			t.Fatalf("%s: status %+v, want joined at epoch %d", n.Name, s[0], after)
		}
	}
	if got := senders(rest); !maps.Equal(got, ids) {
		t.Fatal("members rejoined instead of following the rekey")
	}
	if _, has := leaver.Ring.GroupKey(fleet.Group, after); has {
		t.Fatal("the leaver holds the new key")
	}
	wraps, _ := f.groupRekeys()
	const bound = 4 * 3 // degree × height, for 50 leaves of a degree-4 tree
	if wraps[after] == 0 || wraps[after] > bound {
		t.Fatalf("one leave among %d members multicast %d wrapped keys, want 1 to %d", members, wraps[after], bound)
	}
	t.Logf("one leave among %d members: %d wrapped keys (%d bytes) multicast", members, wraps[after], wraps[after]*gkd.LKHWrapSize)
}
