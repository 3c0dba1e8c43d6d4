package keyserver_test

import (
	"fmt"
	"maps"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/proxy"
)

// TestUpdateLeaveThreeWays: in an UPDATE group, members that leave by a
// clean shutdown, by crashing (their signed Will) and by revocation
// (SIGHUP-style reload) can open nothing sent after the rekey, while the
// remaining members exchange a QoS 1 stream across each rekey without loss.
func TestUpdateLeaveThreeWays(t *testing.T) { testLeaveThreeWays(t, "update") }

// testLeaveThreeWays runs TestUpdateLeaveThreeWays for a scheme.
func testLeaveThreeWays(t *testing.T, scheme string) {
	f := newFleet(t, scheme, []string{"a", "b", "shutdown", "crash", "revoked"})
	a, b := f.join("a"), f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))

	leaves := []struct {
		name  string
		leave func(n *fleet.Node)
	}{
		{"shutdown", func(n *fleet.Node) { n.Keys.Close() }},
		{"crash", func(n *fleet.Node) {
			n.Crash() // the connection dies without DISCONNECT: the broker sends the Will
		}},
		{"revoked", func(*fleet.Node) { f.revoke("a", "b", "shutdown", "crash") }},
	}
	for _, l := range leaves {
		t.Run(l.name, func(t *testing.T) {
			leaver := f.join(l.name)
			before := settle(t, a, b, leaver)

			// a QoS 1 stream from a to b runs across the leave and its rekey
			const n = 300
			wait := stream(t, a.App, "secure/stream/"+l.name, n, 2*time.Millisecond)
			l.leave(leaver)
			after := waitEpoch(t, a, before)
			waitFor(t, func() bool { return b.Epoch() == after }, "b activates epoch %d", after)
			wait()
			expectStream(t, b.App, "secure/stream/"+l.name, n)

			secret := "after-" + l.name
			must(t, a.App.Publish("secure/after", 1, false, []byte(secret)))
			expect(t, b.App, "secure/after", secret)
			env := f.captured("secure/after")
			if canOpen(leaver.Ring, "secure/after", env) {
				t.Fatalf("the member that left by %s opened a message sent after the rekey", l.name)
			}
			if !canOpen(b.Ring, "secure/after", env) {
				t.Fatal("a remaining member cannot open it")
			}
			if _, has := leaver.Ring.GroupKey(fleet.Group, after); has {
				t.Fatalf("the member that left by %s holds the new epoch's key", l.name)
			}
			if l.name == "revoked" {
				// its next join is refused, and it stops sealing altogether
				waitFor(t, func() bool { _, err := leaver.Ring.Sealer(fleet.Group); return err != nil }, "the revoked member stops sealing")
			}
		})
	}
}

// TestUpdateNewMemberCannotReadEarlierTraffic: backward secrecy.
func TestUpdateNewMemberCannotReadEarlierTraffic(t *testing.T) {
	testNewMemberCannotReadEarlierTraffic(t, "update")
}

func testNewMemberCannotReadEarlierTraffic(t *testing.T, scheme string) {
	f := newFleet(t, scheme, []string{"a", "b", "late"})
	a, b := f.join("a"), f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))
	settle(t, a, b)
	must(t, a.App.Publish("secure/old", 1, false, []byte("before you came")))
	expect(t, b.App, "secure/old", "before you came")
	old := f.captured("secure/old")

	late := f.join("late")
	if canOpen(late.Ring, "secure/old", old) {
		t.Fatal("a new member opened a message sent before it joined")
	}
	// and it takes part from now on
	must(t, late.App.Subscribe("secure/#", 1))
	settle(t, a, late)
	must(t, a.App.Publish("secure/new", 1, false, []byte("welcome")))
	expect(t, late.App, "secure/new", "welcome")
}

// TestKeyServerRestartKeepsKeys: a restarted key server has the same keys
// and members; the members carry on, and a later rekey reaches everyone.
func TestKeyServerRestartKeepsKeys(t *testing.T) { testRestartKeepsKeys(t, "update") }

func testRestartKeepsKeys(t *testing.T, scheme string) {
	f := newFleet(t, scheme, []string{"a", "b", "c"})
	a, b := f.join("a"), f.join("b")
	must(t, b.App.Subscribe("secure/#", 1))
	epoch := settle(t, a, b)
	key, _ := a.Ring.GroupKey(fleet.Group, epoch)

	must(t, f.KS.Close())
	must(t, a.App.Publish("secure/x", 1, false, []byte("during the outage")))
	expect(t, b.App, "secure/x", "during the outage")
	must(t, f.StartServer())
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != epoch {
		t.Fatalf("restarted server is at epoch %d, want %d", e, epoch)
	}

	ids := senders([]*fleet.Node{a, b})
	c := f.join("c") // a rejoin-free change: forces a rekey of the restarted server
	after := waitEpoch(t, a, epoch)
	if after != epoch+1 {
		t.Fatalf("restarted server moved from epoch %d to %d, want %d: it lost its state", epoch, after, epoch+1)
	}
	waitFor(t, func() bool { return b.Epoch() == after && c.Epoch() == after }, "everyone at epoch %d", after)
	if got := senders([]*fleet.Node{a, b}); !maps.Equal(got, ids) {
		t.Fatalf("sender ids %v, were %v: members rejoined instead of following the rekey", got, ids)
	}
	if k, ok := a.Ring.GroupKey(fleet.Group, epoch); !ok || *k != *key {
		t.Fatal("the old epoch's key changed across the restart")
	}
	must(t, c.App.Publish("secure/y", 1, false, []byte("after the restart")))
	expect(t, b.App, "secure/y", "after the restart")
}

// TestStaticGroupKeepsOneKey: STATIC gives every member the same key, kept
// across joins and a restart of the key server.
func TestStaticGroupKeepsOneKey(t *testing.T) {
	f := newFleet(t, "static", []string{"a", "b"})
	a := f.join("a")
	if st := a.Keys.Status(); len(st) != 1 || !st[0].Joined || st[0].JoinLatency <= 0 {
		t.Fatalf("key client status after joining: %+v", st)
	}
	k1, ok := a.Ring.GroupKey(fleet.Group, a.Epoch())
	if !ok {
		t.Fatal("no key")
	}
	f.restartServer()
	b := f.join("b")
	if b.Epoch() != a.Epoch() {
		t.Fatalf("epochs differ: %d and %d", a.Epoch(), b.Epoch())
	}
	k2, _ := b.Ring.GroupKey(fleet.Group, b.Epoch())
	if *k1 != *k2 {
		t.Fatal("static key changed")
	}
	must(t, b.App.Subscribe("secure/#", 1))
	must(t, a.App.Publish("secure/s", 1, false, []byte("static")))
	expect(t, b.App, "secure/s", "static")
	_ = fmt.Sprint()
}

// TestKeyServerMetrics: the key server counts joins and rekeys and shows
// each group's members and epoch.
func TestKeyServerMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	up, err := embedded.Start(embedded.Options{})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	fl, err := fleet.New(fleet.Options{UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: t.TempDir(), Members: []string{"a", "b"}, Registry: reg})
	must(t, err)
	t.Cleanup(fl.Close)
	f := &testFleet{Fleet: fl, t: t, up: up}
	a, b := f.join("a"), f.join("b")
	epoch := settle(t, a, b)
	b.Close()
	waitEpoch(t, a, epoch)
	// A rekey may still be under way (b's leave, a late batch): the gauges
	// must match the server's state once it is quiet.
	var got map[string]float64
	var current uint32
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		before, _ := f.KS.GroupEpoch(fleet.Group)
		got = map[string]float64{}
		mfs, err := reg.Gather()
		must(t, err)
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				got[mf.GetName()] += m.GetCounter().GetValue() + m.GetGauge().GetValue()
			}
		}
		current, _ = f.KS.GroupEpoch(fleet.Group)
		if before == current && got["smqtt_keyserver_members"] == 1 && got["smqtt_keyserver_epoch"] == float64(current) || time.Now().After(deadline) {
			break
		}
	}
	if got["smqtt_keyserver_joins_total"] < 2 || got["smqtt_keyserver_rekeys_total"] < 2 {
		t.Fatalf("joins %v, rekeys %v: counters did not move", got["smqtt_keyserver_joins_total"], got["smqtt_keyserver_rekeys_total"])
	}
	if got["smqtt_keyserver_members"] != 1 || got["smqtt_keyserver_epoch"] != float64(current) {
		t.Fatalf("members %v epoch %v, want 1 and %d", got["smqtt_keyserver_members"], got["smqtt_keyserver_epoch"], current)
	}
}

// TestQueuedMessagePastSendGraceIsResealed: a message queued while the
// sidecar's upstream was down, under an epoch that senders had to stop
// using meanwhile (a rekey plus send_grace), leaves the queue re-sealed under
// the current epoch, and is delivered.
func TestQueuedMessagePastSendGraceIsResealed(t *testing.T) {
	up, err := embedded.Start(embedded.Options{})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	fl, err := fleet.New(fleet.Options{
		UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: t.TempDir(), Members: []string{"a", "b", "c"},
		RekeyLead: 100 * time.Millisecond, SendGrace: 200 * time.Millisecond,
		Mode: proxy.ModeBridge, // the queue that holds a message across a rekey is bridge mode's
	})
	must(t, err)
	t.Cleanup(fl.Close)
	f := &testFleet{Fleet: fl, t: t, up: up}
	a, b := f.join("a"), f.join("b")
	old := settle(t, a, b)
	must(t, b.App.Subscribe("secure/#", 1))

	a.Data.Down()
	waitFor(t, func() bool { return !a.Side.Connected() }, "a's upstream down")
	must(t, a.App.Publish("secure/q", 1, false, []byte("queued across a rekey")))
	c := f.join("c")
	current := settle(t, a, b, c)
	if current == old {
		t.Fatal("no rekey")
	}
	time.Sleep(400 * time.Millisecond) // past activate_at + send_grace
	a.Data.Up()
	expect(t, b.App, "secure/q", "queued across a rekey")
	env := f.captured("secure/q")
	h, err := envelope.ParseHeader(env)
	must(t, err)
	if h.Epoch != current {
		t.Fatalf("the queued message went out under epoch %d, want the current %d", h.Epoch, current)
	}
}

// TestLeaveSurvivesKeyServerRestartBeforeItsRekey: the key server stops
// after accepting a leave but before the batched rekey; after its restart
// the rekey still happens and the leaver is out.
func TestLeaveSurvivesKeyServerRestartBeforeItsRekey(t *testing.T) {
	up, err := embedded.Start(embedded.Options{})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	fl, err := fleet.New(fleet.Options{
		UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: t.TempDir(), Members: []string{"a", "b", "c"},
		RekeyBatch: time.Second,
	})
	must(t, err)
	t.Cleanup(fl.Close)
	f := &testFleet{Fleet: fl, t: t, up: up}
	a, b := f.join("a"), f.join("b")
	c := f.join("c")
	epoch := settle(t, a, b, c)
	c.Keys.Close()                     // the leave is accepted and stored...
	time.Sleep(300 * time.Millisecond) // ...well within the 1 s batch
	if e, _ := f.KS.GroupEpoch(fleet.Group); e != epoch {
		t.Fatalf("rekeyed before the restart (epoch %d -> %d): the test proves nothing", epoch, e)
	}
	f.restartServer()
	after := waitEpoch(t, a, epoch)
	waitFor(t, func() bool { return b.Epoch() == after }, "b follows")
	if _, ok := c.Ring.GroupKey(fleet.Group, after); ok {
		t.Fatal("the member that left before the restart holds the new key")
	}
}

// TestKeyClientJoinsAGroupAddedWhileRunning: a sidecar whose reloaded
// configuration protects a group it did not name joins it without a
// restart and seals for it, while keeping the groups it had.
func TestKeyClientJoinsAGroupAddedWhileRunning(t *testing.T) {
	f := newFleet(t, "update", []string{"a"})
	opts := f.KSOpts
	extra := opts.Groups[0]
	extra.Name, extra.Topics = "extra", []string{"extra/#"}
	opts.Groups = append(opts.Groups, extra)
	must(t, f.KS.Reload(opts))
	a := f.join("a")
	if _, err := a.Ring.Sealer("extra"); err == nil {
		t.Fatal("sealing for a group the sidecar never joined")
	}
	a.Keys.AddGroups("extra")
	waitFor(t, func() bool { _, err := a.Ring.Sealer("extra"); return err == nil }, "a seals for the added group")
	st := a.Keys.Status()
	if len(st) != 2 || !st[0].Joined || !st[1].Joined || st[1].Group != "extra" {
		t.Fatalf("status after adding a group: %+v", st)
	}
	if name, ok := a.Keys.GroupName(gkd.GroupID(f.Server.Public().RawID(), "extra")); !ok || name != "extra" {
		t.Fatalf("GroupName of the added group: %q, %t", name, ok)
	}
}
