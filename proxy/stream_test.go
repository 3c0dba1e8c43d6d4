package proxy_test

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/faultnet"
	"github.com/smqtt/smqtt/internal/mosquitto"
	"github.com/smqtt/smqtt/proxy"
)

// streamThroughFaults sends n QoS 1 messages from an app on sidecar A to an
// app on sidecar B while the sidecars' upstream connections are cut, twice,
// and the upstream broker restarts (with persistence) in between, and checks
// that every message arrives exactly once and in order, that a witness on
// the broker sees only envelopes, and how long each fault took to recover
// from.
func streamThroughFaults(t *testing.T, up upstream, upAddr string, n int, qos byte, restarts int) {
	r := newBridgeRig(t, up)
	relayA, err := faultnet.New(upAddr)
	must(t, err)
	t.Cleanup(func() { relayA.Close() })
	relayB, err := faultnet.New(upAddr)
	must(t, err)
	t.Cleanup(func() { relayB.Close() })
	via := func(relay *faultnet.Relay) sidecarOpt {
		return func(o *proxy.Options) { o.Upstream.URL = relay.URL() }
	}
	a := r.sidecar(uniq("stream-a"), "", via(relayA))
	b := r.sidecar(uniq("stream-b"), "", via(relayB))
	pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
	must(t, sub.Subscribe("secure/stream", qos))
	witness := wireWitness(t, up, "secure/stream")
	faultAt := map[int]time.Time{} // message number -> when the fault after it began

	restart := func() { must(t, up.Restart()); t.Log("upstream restarted") }
	faults := map[int]func(){
		n / 5:      func() { t.Logf("cut %d+%d upstream connections", relayA.Cut(), relayB.Cut()) },
		n / 2:      restart,
		n * 7 / 10: func() { t.Logf("cut %d+%d upstream connections", relayA.Cut(), relayB.Cut()) },
	}
	for k := 1; k < restarts; k++ { // further restarts, spread over the stream
		i := k * n / restarts
		if faults[i] == nil {
			faults[i] = restart
		} else {
			faults[i+1] = restart
		}
	}
	toks := make([]paho.Token, 0, n)
	for i := 1; i <= n; i++ {
		toks = append(toks, pub.Client.Publish("secure/stream", qos, false, []byte(strconv.Itoa(i))))
		if f := faults[i]; f != nil {
			faultAt[i] = time.Now()
			f()
		}
	}
	for i, tok := range toks {
		if !tok.WaitTimeout(60*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d not acknowledged by sidecar A: %v", i+1, tok.Error())
		}
	}
	var got []int
	arrived := map[int]time.Time{}
	deadline := time.After(60 * time.Second)
	for len(got) < n {
		select {
		case m := <-sub.Inbox:
			v, err := strconv.Atoi(string(m.Payload))
			if err != nil {
				t.Fatalf("garbled payload %q", m.Payload)
			}
			got = append(got, v)
			if _, seen := arrived[v]; !seen {
				arrived[v] = m.At
			}
		case <-deadline:
			t.Fatalf("only %d of %d messages arrived; sidecar A queue holds %d; drops at B %v, messages A %v B %v; %s", len(got), n, a.QueueLen(), b.DropCounts(), a.MessageCounts(), b.MessageCounts(), orderReport(got))
		}
	}
	if r := orderReport(got); r != "" {
		t.Fatal(r)
	}
	expectNone(t, sub, time.Second)
	t.Logf("%d messages, none lost, none duplicated, in order; drops at B: %s", n, dropSummary(b))
	// Recovery: from a fault to the arrival of the first message published
	// after it.
	var worst time.Duration
	for i, at := range faultAt {
		if d := arrived[i+1].Sub(at); d > worst {
			worst = d
		}
	}
	t.Logf("%d faults; slowest recovery (fault → next message delivered) %v", len(faultAt), worst.Round(time.Millisecond))
	if seen := witness(); seen == 0 {
		t.Error("the witness on the broker saw nothing of the stream")
	} else {
		t.Logf("the witness on the broker saw %d envelopes on secure/stream and no plaintext", seen)
	}
}

// wireWitness subscribes directly on the upstream broker to topic and fails
// the test if any payload it sees there is not an envelope (plaintext on the
// wire); the returned func says how many it saw. It reconnects across the
// broker's restarts and may miss messages meanwhile.
func wireWitness(t *testing.T, up upstream, topic string) func() int {
	t.Helper()
	var mu sync.Mutex
	seen := 0
	o := paho.NewClientOptions().AddBroker(up.URL()).SetClientID(uniq("witness")).
		SetAutoReconnect(true).SetMaxReconnectInterval(200 * time.Millisecond).
		SetOnConnectHandler(func(c paho.Client) {
			c.Subscribe(topic, 0, func(_ paho.Client, m paho.Message) {
				if _, err := envelope.ParseHeader(m.Payload()); err != nil {
					t.Errorf("plaintext on the wire: %q is not an envelope (%v)", m.Payload(), err)
				}
				mu.Lock()
				seen++
				mu.Unlock()
			})
		})
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("witness: %v", tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		return seen
	}
}

// orderReport describes how got differs from 1, 2, 3, ...: "" when it does
// not.
func orderReport(got []int) string {
	var out []string
	seen := map[int]int{}
	for i, v := range got {
		seen[v]++
		if v != i+1 && len(out) < 10 {
			out = append(out, fmt.Sprintf("#%d is %d", i+1, v))
		}
	}
	dups := 0
	for _, c := range seen {
		if c > 1 {
			dups += c - 1
		}
	}
	if len(out) == 0 {
		return ""
	}
	return fmt.Sprintf("out of order or duplicated (%d duplicates, %d distinct): %s", dups, len(seen), strings.Join(out, ", "))
}

func dropSummary(sc *proxy.Sidecar) string {
	return fmt.Sprint(sc.DropCounts())
}

// The stream is proven against Mosquitto. Against the embedded mochi broker
// (2.7.9) messages go missing under the same cuts even with no sidecar at
// all (a plain paho publisher and subscriber lost 1 to 2 of 10,000), and its
// bbolt store neither keeps every queued message across a restart nor
// forgets acknowledged ones; it remains the e2e suite's upstream but cannot
// be the reference for zero loss.
// TestQoS2StreamThroughTenRestartsMosquitto: QoS 2, the upstream broker
// restarted ten times during the stream (plus the two cuts): exactly once,
// in order.
func TestQoS2StreamThroughTenRestartsMosquitto(t *testing.T) {
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed (.ci/run installs it)")
	}
	m, err := mosquitto.Start(t.TempDir())
	must(t, err)
	t.Cleanup(func() { m.Close() })
	streamThroughFaults(t, m, m.Addr(), 5000, 2, 10)
}

// TestStreamThroughPartitionMosquitto: the upstream broker frozen with
// SIGSTOP for 3 s, twice, during a QoS 1 stream: nothing lost, nothing
// duplicated, order kept.
func TestStreamThroughPartitionMosquitto(t *testing.T) {
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed (.ci/run installs it)")
	}
	m, err := mosquitto.Start(t.TempDir())
	must(t, err)
	t.Cleanup(func() { m.Resume(); m.Close() })
	r := newBridgeRig(t, m)
	a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
	pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
	must(t, sub.Subscribe("secure/partition", 1))
	witness := wireWitness(t, m, "secure/partition")
	const n = 3000
	resumed := map[int]time.Time{}
	for i := 1; i <= n; i++ {
		pub.Client.Publish("secure/partition", 1, false, []byte(strconv.Itoa(i)))
		if i == n/3 || i == 2*n/3 {
			must(t, m.Pause())
			time.Sleep(3 * time.Second)
			must(t, m.Resume())
			resumed[i] = time.Now()
		}
	}
	var got []int
	arrived := map[int]time.Time{}
	deadline := time.After(60 * time.Second)
	for len(got) < n {
		select {
		case msg := <-sub.Inbox:
			v, _ := strconv.Atoi(string(msg.Payload))
			got = append(got, v)
			if _, seen := arrived[v]; !seen {
				arrived[v] = msg.At
			}
		case <-deadline:
			t.Fatalf("only %d of %d arrived; %s", len(got), n, orderReport(got))
		}
	}
	if r := orderReport(got); r != "" {
		t.Fatal(r)
	}
	expectNone(t, sub, 300*time.Millisecond)
	for i, at := range resumed {
		t.Logf("partition after message %d: next message delivered %v after the broker resumed", i, arrived[i+1].Sub(at).Round(time.Millisecond))
	}
	if witness() == 0 {
		t.Error("the witness on the broker saw nothing of the stream")
	}
}

func TestStreamThroughCutsAndRestartMosquitto(t *testing.T) {
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed (.ci/run installs it)")
	}
	m, err := mosquitto.Start(t.TempDir())
	must(t, err)
	t.Cleanup(func() { m.Close() })
	streamThroughFaults(t, m, m.Addr(), 10000, 1, 1)
}
