package proxy_test

import (
	"strconv"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/internal/mqtttest"
)

// TestLiveDeliveryToDirectAndSharedSubscribers: on one topic, a plain
// subscriber (served by the worker directly), the only member of a shared
// group (served by the local broker), and an application that holds both
// kinds of subscription each get every message exactly once, in order,
// also when the shared subscription comes and goes in the middle of the
// stream.
func TestLiveDeliveryToDirectAndSharedSubscribers(t *testing.T) {
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
	plain, shared, both := r.app(b, uniq("plain")), r.app(b, uniq("shared")), r.app(b, uniq("both"))
	late := r.app(b, uniq("late"))
	must(t, plain.Subscribe("secure/mix/#", 1))
	must(t, shared.Subscribe("$share/g/secure/mix/#", 1))
	must(t, both.Subscribe("secure/mix/#", 1))
	must(t, both.Subscribe("$share/h/secure/mix/#", 1))
	pub := r.app(a, uniq("pub"))

	const n = 600
	toks := make([]paho.Token, 0, n)
	for i := range n {
		switch i {
		case n / 3:
			must(t, late.Subscribe("$share/k/secure/mix/#", 1))
		case 2 * n / 3:
			must(t, late.Unsubscribe("$share/k/secure/mix/#"))
		}
		toks = append(toks, pub.Client.Publish("secure/mix/x", 1, false, []byte(strconv.Itoa(i))))
	}
	for i, tok := range toks {
		if !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d: %v", i, tok.Error())
		}
	}
	for name, app := range map[string]*mqtttest.App{"plain": plain, "shared": shared, "both": both} {
		for i := range n {
			m, ok := app.Next(10 * time.Second)
			if !ok {
				t.Fatalf("%s got %d of %d messages", name, i, n)
			}
			if got := string(m.Payload); got != strconv.Itoa(i) {
				t.Fatalf("%s: message %d is %q (lost, duplicated or out of order)", name, i, got)
			}
		}
		expectNone(t, app, 200*time.Millisecond)
	}
	// late got a gapless, ordered run while its shared subscription lasted.
	prev := -1
	for {
		m, ok := late.Next(200 * time.Millisecond)
		if !ok {
			break
		}
		v, err := strconv.Atoi(string(m.Payload))
		must(t, err)
		if prev >= 0 && v != prev+1 {
			t.Fatalf("late got %d after %d", v, prev)
		}
		prev = v
	}
}

// Subscriptions made or dropped while messages flow on a topic take effect
// for the next message (the subscriber lookups the worker keeps are
// dropped on every change).
func TestLiveDeliveryFollowsSubscriptionChanges(t *testing.T) {
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
	first, second := r.app(b, uniq("first")), r.app(b, uniq("second"))
	pub := r.app(a, uniq("pub"))
	must(t, first.Subscribe("secure/follow", 1))
	must(t, pub.Publish("secure/follow", 1, false, []byte("1")))
	expect(t, first, "secure/follow", "1")
	must(t, second.Subscribe("secure/follow", 0))
	must(t, pub.Publish("secure/follow", 1, false, []byte("2")))
	expect(t, first, "secure/follow", "2")
	if m := expect(t, second, "secure/follow", "2"); m.QoS != 0 {
		t.Errorf("delivered at QoS %d to a QoS 0 subscription", m.QoS)
	}
	must(t, second.Subscribe("secure/follow", 1)) // the same filter at another QoS
	must(t, first.Unsubscribe("secure/follow"))
	must(t, pub.Publish("secure/follow", 1, false, []byte("3")))
	if m := expect(t, second, "secure/follow", "3"); m.QoS != 1 {
		t.Errorf("delivered at QoS %d after the subscription was raised to 1", m.QoS)
	}
	expectNone(t, first, 300*time.Millisecond)
}
