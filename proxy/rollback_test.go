package proxy_test

import (
	"testing"
	"time"

	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/proxy"
)

// TestRetainedRollbackRefused: the broker overwrites a protected topic's
// retained value with an older sealed value of the same sender. A new
// subscriber on a sidecar that saw the newer value gets nothing, and the
// attempt is counted as stale_retained.
func TestRetainedRollbackRefused(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
		topic := "secure/valve/" + uniq("t")
		watcher := r.app(b, uniq("watcher"))
		must(t, watcher.Subscribe(topic, 1))
		pub := r.app(a, uniq("pub"))
		must(t, pub.Publish(topic, 1, true, []byte("open")))
		expect(t, watcher, topic, "open")
		old := lastOn(up.Spy.All(), topic)
		must(t, pub.Publish(topic, 1, true, []byte("closed")))
		expect(t, watcher, topic, "closed")

		evil, err := mqtttest.Connect(up.URL(), uniq("evil"), mqtttest.AppOptions{})
		must(t, err)
		defer evil.Close()
		must(t, evil.Publish(topic, 1, true, old)) // the broker now stores the old value
		late := r.app(b, uniq("late"))
		must(t, late.Subscribe(topic, 1))
		waitFor(t, func() bool { return b.DropCounts()["in/"+proxy.DropStaleRetain] >= 1 }, "rollback counted")
		expectNone(t, late, 300*time.Millisecond)
		expectNone(t, watcher, 10*time.Millisecond) // its live copy was a replay
	})
}

func lastOn(seen []embedded.Seen, topic string) []byte {
	var last []byte
	for _, s := range seen {
		if s.Topic == topic {
			last = s.Payload
		}
	}
	return last
}
