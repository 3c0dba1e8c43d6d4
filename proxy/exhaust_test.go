package proxy_test

import (
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smqtt/smqtt/internal/mqtttest"
)

// TestTenThousandSubscriptionsOnOneSidecar: one local application
// subscribes to 10,000 distinct filters (exact and wildcard, protected and
// not) in batches of SUBSCRIBE packets. The sidecar mirrors every one
// upstream, a message on the last of them arrives, another application on
// the same sidecar keeps publishing and receiving throughout, unsubscribing
// them all empties the upstream mirror, and the heap grows by a bounded
// amount per subscription.
func TestTenThousandSubscriptionsOnOneSidecar(t *testing.T) {
	const (
		n     = 10_000
		batch = 100 // filters per SUBSCRIBE / UNSUBSCRIBE packet
		// bound on the whole process's heap growth per subscription; it
		// holds the local broker's, the mirror's and (in this process) the
		// upstream broker's copy of each filter.
		maxBytesPerSub = 8 << 10
	)
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	name := uniq("sc")
	sc := r.sidecar(name, "")
	many, other := r.app(sc, uniq("many")), r.app(sc, uniq("other"))
	must(t, other.Subscribe("secure/other/probe", 1))

	filters := make([]string, n)
	for i := range filters {
		switch i % 4 {
		case 0:
			filters[i] = fmt.Sprintf("secure/dev/%d/state", i)
		case 1:
			filters[i] = fmt.Sprintf("secure/room/%d/+", i)
		case 2:
			filters[i] = fmt.Sprintf("plain/dev/%d", i)
		case 3:
			filters[i] = fmt.Sprintf("plain/zone/%d/#", i)
		}
	}
	upstreamFilters := func() int {
		cl, ok := up.Server().Clients.Get(name)
		if !ok {
			return -1
		}
		return cl.State.Subscriptions.Len()
	}

	direct, err := mqtttest.Connect(up.URL(), uniq("direct"), mqtttest.AppOptions{InboxSize: 1})
	must(t, err) // an ordinary client of the upstream broker
	defer direct.Close()

	probe := startProbe(t, other, "secure/other/probe")
	heapBefore := liveHeap()
	start := time.Now()
	for i := 0; i < n; i += batch {
		subs := make(map[string]byte, batch)
		for _, f := range filters[i : i+batch] {
			subs[f] = 1
		}
		tok := many.Client.SubscribeMultiple(subs, nil)
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("SUBSCRIBE of filters %d-%d: %v", i, i+batch-1, tok.Error())
		}
	}
	subscribed := time.Since(start)
	duringSubscribe := probe.sent.Load()
	// one upstream subscription per local filter, plus the probe's
	waitLong(t, func() bool { return upstreamFilters() == n+1 }, "upstream holds %d filters", n+1)
	if got := len(sc.MirroredFilters()); got != n+1 {
		t.Fatalf("the sidecar mirrors %d filters, want %d", got, n+1)
	}
	heapAfter := liveHeap()
	perSub := (int64(heapAfter) - int64(heapBefore)) / n
	t.Logf("10,000 filters subscribed and mirrored in %v; heap %d -> %d bytes: %d bytes per subscription",
		subscribed.Round(time.Millisecond), heapBefore, heapAfter, perSub)
	if perSub > maxBytesPerSub {
		t.Fatalf("heap grew by %d bytes per subscription, bound %d", perSub, maxBytesPerSub)
	}

	// The last filters work end to end: a plain message from an ordinary
	// upstream client, and a protected one from the other application.
	must(t, direct.Publish("plain/zone/9999/a/b", 1, false, []byte("to the 10,000th filter")))
	expect(t, many, "plain/zone/9999/a/b", "to the 10,000th filter")
	must(t, other.Publish("secure/room/9997/x", 1, false, []byte("protected, to the 9,998th")))
	expect(t, many, "secure/room/9997/x", "protected, to the 9,998th")

	start = time.Now()
	for i := 0; i < n; i += batch {
		tok := many.Client.Unsubscribe(filters[i : i+batch]...)
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("UNSUBSCRIBE of filters %d-%d: %v", i, i+batch-1, tok.Error())
		}
	}
	waitLong(t, func() bool { return upstreamFilters() == 1 }, "upstream drops the mirror")
	unsubscribed := time.Since(start)
	if got := sc.MirroredFilters(); !slices.Equal(got, []string{"secure/other/probe"}) {
		t.Fatalf("the sidecar still mirrors %d filters", len(got))
	}
	heapEnd := liveHeap()
	kept := int64(heapEnd) - int64(heapBefore)
	t.Logf("10,000 filters unsubscribed upstream in %v; heap %d bytes, %+d against the start",
		unsubscribed.Round(time.Millisecond), heapEnd, kept)
	// What stays is the capacity of maps that held the filters (Go maps do
	// not shrink): bounded by the peak, not growing with use.
	if grown := int64(heapAfter) - int64(heapBefore); kept > grown/2 {
		t.Fatalf("after unsubscribing everything the heap keeps %d of the %d bytes the subscriptions took", kept, grown)
	}

	sent, worst := probe.stop()
	t.Logf("the other application: %d round trips during the run (%d while the filters were subscribed), slowest %v",
		sent, duringSubscribe, worst.Round(time.Millisecond))
	if duringSubscribe == 0 || sent == duringSubscribe {
		t.Fatalf("the other application's traffic stalled: %d round trips while subscribing, %d in all", duringSubscribe, sent)
	}
	must(t, other.Publish("secure/other/probe", 1, false, []byte("after")))
	expect(t, other, "secure/other/probe", "after")
	expectNone(t, many, 100*time.Millisecond)
}

// probe is an application that publishes on a topic it subscribes to and
// waits for each message to come back, until stopped.
type probe struct {
	done  chan struct{}
	wg    sync.WaitGroup
	sent  atomic.Int64
	worst time.Duration
}

// startProbe runs a probe; each round trip must complete within 10 s.
func startProbe(t *testing.T, a *mqtttest.App, topic string) *probe {
	p := &probe{done: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for i := 0; ; i++ {
			select {
			case <-p.done:
				return
			case <-time.After(10 * time.Millisecond):
			}
			began := time.Now()
			payload := strconv.Itoa(i)
			if err := a.Publish(topic, 1, false, []byte(payload)); err != nil {
				t.Errorf("probe publish %d: %v", i, err)
				return
			}
			m, ok := a.Next(10 * time.Second)
			if !ok || m.Topic != topic || string(m.Payload) != payload {
				t.Errorf("probe %d: got %v %s %q", i, ok, m.Topic, m.Payload)
				return
			}
			p.sent.Add(1)
			p.worst = max(p.worst, time.Since(began))
		}
	}()
	return p
}

// stop ends the probe and returns its round trips and the slowest one.
func (p *probe) stop() (int64, time.Duration) {
	close(p.done)
	p.wg.Wait()
	return p.sent.Load(), p.worst
}

// waitLong is waitFor with room for the race detector on a busy machine:
// the sidecar mirrors filter by filter, one upstream round trip each.
func waitLong(t *testing.T, cond func() bool, what string, args ...any) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: "+what, args...)
		}
	}
}

// liveHeap returns the bytes of live heap objects after a full collection.
func liveHeap() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
