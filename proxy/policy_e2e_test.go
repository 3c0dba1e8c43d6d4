package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
)

// TestUnmatchedDeny: with unmatched: deny, topics no rule protects are
// refused, never relayed; protected ones still flow.
func TestUnmatchedDeny(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		deny := func(o *proxy.Options) { o.Deny = true }
		a, b := r.sidecar(uniq("a"), "", deny), r.sidecar(uniq("b"), "")
		pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
		must(t, sub.Subscribe("#", 1))
		// refused: a 3.1.1 app is acknowledged and the message dropped, as
		// brokers do for publishes their ACL denies
		must(t, pub.Publish("plain/leak", 1, false, []byte("must not pass")))
		must(t, pub.Publish("secure/ok", 1, false, []byte("fine")))
		expect(t, sub, "secure/ok", "fine")
		expectNone(t, sub, 300*time.Millisecond)
		if up.Spy.Contains([]byte("must not pass")) {
			t.Fatal("a denied topic reached the broker")
		}
		if a.DropCounts()["out/"+proxy.DropDenied] == 0 {
			t.Fatal("the refusal was not counted")
		}
	})
}

// TestFailClosedWithoutKey: a protected topic whose group has no key is
// never published in clear; the publish is refused and counted.
func TestFailClosedWithoutKey(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		nokey := func(o *proxy.Options) {
			o.Keys = keyclient.NewRing() // no key for group demo
			o.NoKeyWait = 200 * time.Millisecond
		}
		a := r.sidecar(uniq("a"), "", nokey)
		pub := r.app(a, uniq("pub"))
		for qos := byte(0); qos <= 1; qos++ {
			tok := pub.Client.Publish("secure/x", qos, false, []byte("SECRET-NO-KEY"))
			tok.WaitTimeout(time.Second)
		}
		waitFor(t, func() bool { return a.DropCounts()["out/"+proxy.DropNoKey] == 2 }, "both refusals counted")
		time.Sleep(100 * time.Millisecond)
		if up.Spy.Contains([]byte("SECRET-NO-KEY")) {
			t.Fatal("a protected message without a key reached the broker in clear")
		}
		for _, s := range up.Spy.All() {
			if s.Topic == "secure/x" {
				t.Fatal("something was published on the protected topic")
			}
		}
	})
}

// TestQueuedMessagesSurviveSidecarRestart: QoS 1 messages acknowledged to
// the app while upstream is down are sent after the sidecar restarts.
func TestQueuedMessagesSurviveSidecarRestart(t *testing.T) {
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	name, dir := uniq("a"), t.TempDir()
	a := r.sidecar(name, dir)
	bName := uniq("b")
	b := r.sidecar(bName, "")
	sub := r.app(b, uniq("sub"))
	must(t, sub.Subscribe("secure/queued", 1))

	addr := up.Addr()
	must(t, up.Close()) // upstream down
	waitFor(t, func() bool { return !a.Connected() }, "sidecar A sees upstream down")
	pub := r.app(a, uniq("pub"))
	const n = 50
	for i := 0; i < n; i++ {
		must(t, pub.Publish("secure/queued", 1, false, []byte{byte(i)})) // acknowledged: held in the queue
	}
	if a.QueueLen() != n {
		t.Fatalf("queue holds %d, want %d", a.QueueLen(), n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	must(t, a.Close(ctx)) // the sidecar stops with everything queued
	cancel()

	must(t, up.Restart()) // same address
	if up.Addr() != addr {
		t.Fatalf("upstream moved from %s to %s", addr, up.Addr())
	}
	// b's upstream session went with the (non-persistent) broker: its
	// mirror subscribes again on reconnect; wait for that first.
	waitFor(t, func() bool {
		_, ok := up.Server().Topics.Subscribers("secure/queued").Subscriptions[bName]
		return ok
	}, "sidecar B subscribed again")
	r.sidecar(name, dir) // restarted on the same data directory
	for i := 0; i < n; i++ {
		m, ok := sub.Next(10 * time.Second)
		if !ok {
			t.Fatalf("message %d of %d never arrived after the restart", i, n)
		}
		if m.Payload[0] != byte(i) {
			t.Fatalf("message %d arrived as %d", i, m.Payload[0])
		}
	}
	expectNone(t, sub, 300*time.Millisecond)
}
