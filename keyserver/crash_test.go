package keyserver_test

import (
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/faultnet"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/keyserver"
)

// TestUpdateRekeyInterruptedByKeyServerCrash: the key server dies in the
// middle of an update rekey's fan-out, after the new epoch is committed to
// its store and only some members have their Rekey. Restarted on the same
// store, it does not rekey again: the members that got the Rekey keep it,
// the others see the newer epoch in the next signed heartbeat and rejoin,
// so every member ends on the new epoch with one key; the leaver that
// caused the rekey never gets it; and a QoS 1 stream between two members
// across the crash loses nothing.
func TestUpdateRekeyInterruptedByKeyServerCrash(t *testing.T) {
	cases := []struct {
		name       string
		crashAfter int // Rekeys the members got before the crash, of 4
		revoke     bool
	}{
		{"leave, crash after 1 of 4 rekeys", 1, false},
		{"revocation, crash after 3 of 4 rekeys", 3, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			testRekeyInterruptedByCrash(t, c.crashAfter, c.revoke)
		})
	}
}

func testRekeyInterruptedByCrash(t *testing.T, crashAfter int, revoke bool) {
	up, err := embedded.Start(embedded.Options{})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	// Short heartbeats: they are how a member learns of a rekey it missed.
	// The old epoch stays open long enough for a member that missed the
	// rekey to seal under it until it has resynced.
	fl, err := fleet.New(fleet.Options{
		UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: t.TempDir(),
		Members:   []string{"a", "b", "c", "d", "leaver"},
		Heartbeat: 150 * time.Millisecond, SendGrace: 5 * time.Second, ReceiveRetention: 10 * time.Second,
	})
	must(t, err)
	t.Cleanup(fl.Close)
	f := &testFleet{Fleet: fl, t: t, up: up}

	// The key server reaches the broker through a relay, so that its crash
	// cuts the connection abruptly (RST, no DISCONNECT, nothing queued
	// flushed).
	ksNet, err := faultnet.New(up.Addr())
	must(t, err)
	t.Cleanup(func() { ksNet.Close() })
	f.KSOpts.Upstream.URL = ksNet.URL()
	f.restartServer()

	members := map[string]*fleet.Node{}
	var nodes []*fleet.Node
	for _, name := range []string{"a", "b", "c", "d"} {
		members[name] = f.join(name)
		nodes = append(nodes, members[name])
	}
	a, b := members["a"], members["b"]
	leaver := f.join("leaver")
	must(t, b.App.Subscribe("secure/#", 1))
	before := settle(t, append(nodes, leaver)...)
	next := before + 1
	sendersBefore := senders(nodes)

	// The crash: after the crashAfter-th member has its Rekey (it holds the
	// new epoch's key), the connection is cut and the server abandoned.
	var got []string
	var hookErr error
	crashed := make(chan time.Time, 1)
	ks := f.KS
	ks.SetAfterRekeySend(func(name string) bool {
		n := members[name]
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(2 * time.Millisecond) {
			if _, ok := n.Ring.GroupKey(fleet.Group, next); ok {
				break
			}
			if time.Now().After(deadline) {
				hookErr = fmt.Errorf("%s never got the Rekey the server handed to the broker", name)
				break
			}
		}
		got = append(got, name)
		if len(got) < crashAfter {
			return true
		}
		ksNet.Down()
		ks.CrashLocked()
		crashed <- time.Now()
		return false
	})

	// A QoS 1 stream from a to b runs from before the leave until after
	// every member is on the new epoch.
	var (
		wg        sync.WaitGroup
		published atomic.Int64
		stop      = make(chan struct{})
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := a.App.Publish("secure/stream", 1, false, []byte(strconv.Itoa(i))); err != nil {
				t.Errorf("publish %d: %v", i, err)
				return
			}
			published.Add(1)
			time.Sleep(3 * time.Millisecond)
		}
	}()
	stopStream := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopStream()

	waitFor(t, func() bool { return published.Load() >= 20 }, "the stream runs")
	if revoke {
		opts := f.KSOpts
		g := opts.Groups[0]
		g.Members = []string{"a", "b", "c", "d"}
		opts.Groups = []keyserver.GroupConfig{g}
		f.KSOpts = opts // the configuration the restarted server reads too
		must(t, ks.Reload(opts))
	} else {
		leaver.Keys.Close()
	}
	var crashedAt time.Time
	select {
	case crashedAt = <-crashed:
	case <-time.After(10 * time.Second):
		t.Fatal("the rekey never reached the crash point")
	}
	must(t, hookErr)
	if len(got) != crashAfter {
		t.Fatalf("%d members got the Rekey before the crash, want %d", len(got), crashAfter)
	}

	f.KSOpts.Upstream.URL = up.URL()
	must(t, f.StartServer())
	restarted := time.Since(crashedAt)
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != next {
		t.Fatalf("restarted server is at epoch %d, want %d: the committed rekey was lost or repeated", e, next)
	}
	var resynced time.Duration
	waitFor(t, func() bool {
		all := true
		for _, n := range nodes {
			_, ok := n.Ring.GroupKey(fleet.Group, next)
			all = all && ok
		}
		if all && resynced == 0 {
			resynced = time.Since(crashedAt)
		}
		for _, n := range nodes {
			if n.Epoch() != next {
				return false
			}
		}
		return true
	}, "every member on epoch %d", next)
	recovered := time.Since(crashedAt)
	t.Logf("Rekeys delivered before the crash: %v; from the crash to: restarted server connected %v, every member holding epoch %d %v, every member sealing under it %v",
		got, restarted.Round(time.Millisecond), next, resynced.Round(time.Millisecond), recovered.Round(time.Millisecond))

	// One key for everyone, and the right path to it.
	key, _ := a.Ring.GroupKey(fleet.Group, next)
	gotRekey := map[string]bool{}
	for _, name := range got {
		gotRekey[name] = true
	}
	for _, n := range nodes {
		if k, ok := n.Ring.GroupKey(fleet.Group, next); !ok || *k != *key {
			t.Fatalf("%s holds another key for epoch %d", n.Name, next)
		}
		sender := n.Keys.Status()[0].Sender
		if gotRekey[n.Name] && sender != sendersBefore[n.Name] {
			t.Errorf("%s got the Rekey but rejoined (sender %d, was %d)", n.Name, sender, sendersBefore[n.Name])
		}
		if !gotRekey[n.Name] && sender == sendersBefore[n.Name] {
			t.Errorf("%s missed the Rekey yet holds the key without having rejoined", n.Name)
		}
	}
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != next {
		t.Fatalf("the restarted server moved on to epoch %d during the resync", e)
	}

	// The stream: nothing lost, nothing twice, in order.
	more := published.Load() + 20 // a little more traffic under the new epoch
	waitFor(t, func() bool { return published.Load() >= more }, "the stream goes on")
	stopStream()
	for i := range int(published.Load()) {
		expect(t, b.App, "secure/stream", strconv.Itoa(i))
	}
	t.Logf("stream: %d QoS 1 messages across the crash, all delivered once, in order", published.Load())

	// The leaver is out.
	must(t, a.App.Publish("secure/after", 1, false, []byte("after the crash")))
	expect(t, b.App, "secure/after", "after the crash")
	env := f.captured("secure/after")
	if _, ok := leaver.Ring.GroupKey(fleet.Group, next); ok || canOpen(leaver.Ring, "secure/after", env) {
		t.Fatal("the leaver holds the key of the rekey that removed it")
	}
	for _, n := range nodes {
		if !canOpen(n.Ring, "secure/after", env) {
			t.Fatalf("%s cannot open traffic sent after the recovery", n.Name)
		}
	}
	if revoke {
		// still connected, it sees the newer epoch too, asks again and is refused
		waitFor(t, func() bool { _, err := leaver.Ring.Sealer(fleet.Group); return err != nil }, "the revoked member stops sealing")
		if _, ok := leaver.Ring.GroupKey(fleet.Group, next); ok {
			t.Fatal("the revoked member got the new key by rejoining the restarted server")
		}
	}
}
