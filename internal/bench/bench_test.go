package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/proxy"
)

var resultKeys = []string{"name", "topology", "qos", "size", "sent", "received", "lost", "dup", "ooo",
	"msgs_per_s", "p50_us", "p90_us", "p99_us", "max_us", "cpu_s_per_1k", "rss_mib"}

func TestSuiteDeliversEveryMessageOnceOnEachTopology(t *testing.T) {
	var progress bytes.Buffer
	rs, err := Suite(context.Background(), Options{
		QoS: 1, Size: 64, Messages: 500, Subscribers: 2, Timeout: 20 * time.Second, Dir: t.TempDir(), Progress: &progress,
	}, []string{Direct, Passthrough, Protected, Signed}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 4 {
		t.Fatalf("got %d results, want 4", len(rs))
	}
	for _, r := range rs {
		t.Run(r.Topology, func(t *testing.T) {
			if r.Sent != 500 || r.Received != 1000 || r.Lost != 0 || r.Dup != 0 {
				t.Errorf("sent %d received %d lost %d dup %d; want 500 sent, 1000 received (2 subscribers), none lost or duplicated",
					r.Sent, r.Received, r.Lost, r.Dup)
			}
			if r.MsgsPerS <= 0 || r.P50us <= 0 || r.MaxUs < r.P99us || r.P99us < r.P50us || r.RSSMiB <= 0 {
				t.Errorf("implausible figures: %+v", r)
			}
			line := r.Line()
			raw, ok := strings.CutPrefix(line, LinePrefix)
			if !ok {
				t.Fatalf("line %q does not start with %q", line, LinePrefix)
			}
			var m map[string]any
			if err := json.Unmarshal([]byte(raw), &m); err != nil {
				t.Fatalf("line %q: %v", line, err)
			}
			for _, k := range resultKeys {
				if _, ok := m[k]; !ok {
					t.Errorf("line %q lacks key %q", line, k)
				}
			}
			if len(m) != len(resultKeys) {
				t.Errorf("line has %d keys, want exactly %d: %q", len(m), len(resultKeys), line)
			}
		})
	}
	var table bytes.Buffer
	if err := WriteTable(&table, rs); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"direct", "passthrough", "protected", "signed", "process CPU"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
}

// With a spread, a subscriber gets exactly the publisher's messages on the
// one topic it took: one in spread, none counted lost.
func TestSpreadDeliversOneTopicOfEach(t *testing.T) {
	up := startEmbedded(t)
	r, err := Run(context.Background(), Options{
		Topology: Signed, UpstreamURL: up.URL(), QoS: 1, Size: 64, Messages: 400, Spread: 8, Timeout: 20 * time.Second, Dir: t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if r.Sent != 400 || r.Received != 50 || r.Lost != 0 || r.Dup != 0 || r.OOO != 0 {
		t.Fatalf("sent %d received %d lost %d dup %d ooo %d; want 400 sent, 50 received", r.Sent, r.Received, r.Lost, r.Dup, r.OOO)
	}
}

func TestRunRefusesBadOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
	}{
		{"unknown topology", Options{Topology: "mesh", UpstreamURL: "tcp://127.0.0.1:1"}},
		{"no upstream", Options{Topology: Direct}},
		{"chain without brokers", Options{Topology: Chain}},
		{"qos 3", Options{Topology: Direct, UpstreamURL: "tcp://127.0.0.1:1", QoS: 3}},
		{"payload below the header", Options{Topology: Direct, UpstreamURL: "tcp://127.0.0.1:1", Size: HeaderLen - 1}},
		{"negative rate", Options{Topology: Direct, UpstreamURL: "tcp://127.0.0.1:1", Rate: -1}},
		{"topic root of two levels", Options{Topology: Direct, UpstreamURL: "tcp://127.0.0.1:1", TopicRoot: "a/b"}},
		{"wildcard topic root", Options{Topology: Direct, UpstreamURL: "tcp://127.0.0.1:1", TopicRoot: "#"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Run(context.Background(), tc.o); !errors.Is(err, ErrOptions) {
				t.Errorf("Run: %v, want ErrOptions", err)
			}
		})
	}
}

func TestSubscriberCountsDuplicatesAndReordering(t *testing.T) {
	s := &subscriber{}
	s.t.seen = [][]uint64{make([]uint64, 1)}
	s.t.high = make([]uint64, 1)
	for _, seq := range []uint64{0, 2, 1, 2, 3} {
		s.add(payload(0, seq, HeaderLen))
	}
	s.add(payload(7, 0, HeaderLen)) // an unknown publisher is ignored
	s.add([]byte("short"))
	got := s.stop()
	if got.received != 4 || got.dup != 1 || got.ooo != 1 || len(got.lat) != 4 {
		t.Errorf("received %d dup %d ooo %d latencies %d; want 4, 1, 1, 4", got.received, got.dup, got.ooo, len(got.lat))
	}
}

func TestLeaveSendsOneRekeyToEachRemainingMember(t *testing.T) {
	r, err := Rekey(context.Background(), RekeyOptions{Members: 10, Suite: gkd.SuiteX25519, Dir: t.TempDir(), Timeout: 15 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if r.RekeyMsgs != 9 {
		t.Errorf("rekey messages = %d, want 9 (one per remaining member)", r.RekeyMsgs)
	}
	if r.JoinS <= 0 || r.JoinsPerS <= 0 || r.LeaveMs <= 0 {
		t.Errorf("implausible figures: %+v", r)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(strings.TrimPrefix(r.Line(), LinePrefix)), &m); err != nil {
		t.Fatalf("line %q: %v", r.Line(), err)
	}
	for _, k := range []string{"name", "scheme", "members", "join_s", "joins_per_s", "leave_ms", "rekey_msgs", "cpu_s", "rss_mib"} {
		if _, ok := m[k]; !ok {
			t.Errorf("line %q lacks key %q", r.Line(), k)
		}
	}
}

// TestLKHLeaveIsOneBroadcast: in an lkh group a leave is one broadcast of a
// few wrapped keys, where update sends one sealed message per member.
func TestLKHLeaveIsOneBroadcast(t *testing.T) {
	r, err := Rekey(context.Background(), RekeyOptions{Members: 20, Scheme: "lkh", Suite: gkd.SuiteX25519, Dir: t.TempDir(), Timeout: 15 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// degree 4, 20 members: height 3, at most 4*3 wrapped keys
	if r.RekeyMsgs != 1 || r.WrappedKeys == 0 || r.WrappedKeys > 12 {
		t.Errorf("lkh leave: %d messages, %d wrapped keys; want 1 message of at most 12", r.RekeyMsgs, r.WrappedKeys)
	}
}

// TestSlottedLeaveIsAK2RefreshPerMember: in a slotted group joins cost the
// others nothing and a leave sends the new K2 sealed to each remaining member.
func TestSlottedLeaveIsAK2RefreshPerMember(t *testing.T) {
	r, err := Rekey(context.Background(), RekeyOptions{Members: 6, Scheme: "slotted", Suite: gkd.SuiteX25519, Dir: t.TempDir(), Timeout: 15 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if r.RekeyMsgs != 5 || r.WrappedKeys != 5 {
		t.Errorf("slotted leave: %d messages, %d keys; want one K2 refresh to each of the 5 others", r.RekeyMsgs, r.WrappedKeys)
	}
}

func TestRekeyRefusesSchemesWithoutRekeys(t *testing.T) {
	for _, scheme := range []string{"static", "rotating"} {
		if _, err := Rekey(context.Background(), RekeyOptions{Members: 3, Scheme: scheme}); !errors.Is(err, ErrOptions) {
			t.Errorf("scheme %s: %v, want ErrOptions", scheme, err)
		}
	}
}

// BenchmarkPath pushes b.N messages through each topology (one publisher,
// one subscriber, 256-byte payloads) against an embedded upstream, for
// profiling the data path:
//
//	go test -run '^$' -bench 'Path/protected/qos1' -benchtime 20000x -cpuprofile cpu.out ./internal/bench
//
// SMQTT_BENCH_UPSTREAM names another upstream broker (e.g. a Mosquitto);
// SMQTT_BENCH_MODE=bridge runs the sidecars in bridge mode (default session).
func BenchmarkPath(b *testing.B) {
	url := os.Getenv("SMQTT_BENCH_UPSTREAM")
	mode := proxy.Mode(os.Getenv("SMQTT_BENCH_MODE"))
	if url == "" {
		up, err := embedded.Start(embedded.Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer up.Close()
		url = up.URL()
	}
	for _, topo := range []string{Direct, Passthrough, Protected} {
		for _, qos := range []byte{0, 1} {
			b.Run(fmt.Sprintf("%s/qos%d", topo, qos), func(b *testing.B) {
				r, err := Run(context.Background(), Options{
					Topology: topo, UpstreamURL: url, QoS: qos, Messages: b.N, Mode: mode, Dir: b.TempDir(),
				})
				if err != nil {
					b.Fatal(err)
				}
				if r.Lost != 0 || r.Dup != 0 || r.OOO != 0 {
					b.Errorf("lost %d dup %d out of order %d", r.Lost, r.Dup, r.OOO)
				}
				b.ReportMetric(r.MsgsPerS, "msg/s")
				b.ReportMetric(r.CPUSPer1k*1e6/1000, "cpu-µs/msg")
			})
		}
	}
}

// BenchmarkSenderAuth compares a sender_auth group (signed) with the same
// group without it (protected), side by side on one broker
// (SMQTT_BENCH_UPSTREAM, else an embedded one): throughput at QoS 0 and 1
// as fast as one publisher goes, latency at 2,000 msg/s, and the worst case
// of batch proofs, a subscriber that takes one topic of the 64 a publisher
// cycles over (it sees one envelope of each batch and checks a signature
// for every message).
func BenchmarkSenderAuth(b *testing.B) {
	url := os.Getenv("SMQTT_BENCH_UPSTREAM")
	if url == "" {
		up, err := embedded.Start(embedded.Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer up.Close()
		url = up.URL()
	}
	loads := []struct {
		name   string
		qos    byte
		rate   float64
		spread int
	}{
		{"qos0", 0, 0, 1},
		{"qos1", 1, 0, 1},
		{"qos1-2000msgps", 1, 2000, 1},
		{"qos1-spread64", 1, 0, 64},
	}
	for _, l := range loads {
		for _, topo := range []string{Protected, Signed} {
			b.Run(l.name+"/"+topo, func(b *testing.B) {
				n := max(b.N, l.spread)
				r, err := Run(context.Background(), Options{
					Topology: topo, UpstreamURL: url, QoS: l.qos, Messages: n, Rate: l.rate, Spread: l.spread, Dir: b.TempDir(),
				})
				if err != nil {
					b.Fatal(err)
				}
				if r.Lost != 0 || r.Dup != 0 || r.OOO != 0 {
					b.Errorf("lost %d dup %d out of order %d", r.Lost, r.Dup, r.OOO)
				}
				b.ReportMetric(r.MsgsPerS, "msg/s")
				b.ReportMetric(r.P50us, "p50-µs")
				b.ReportMetric(r.CPUSPer1k*1e6/1000, "cpu-µs/msg")
			})
		}
	}
}

// TestTopicRootNamesEveryTopic: with a topic root, every message the
// scenario puts on the broker is under it, so that a bridge carrying
// another root (the Mosquitto comparison's chain) never carries it.
func TestTopicRootNamesEveryTopic(t *testing.T) {
	up := startEmbedded(t)
	r, err := Run(context.Background(), Options{Topology: Protected, UpstreamURL: up.URL(), QoS: 1, Messages: 200, TopicRoot: "elsewhere", Timeout: 20 * time.Second, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if r.Received != 200 || r.Lost != 0 {
		t.Fatalf("received %d, lost %d; want 200, 0", r.Received, r.Lost)
	}
	benchTopics := 0
	for _, m := range up.Spy.All() {
		if strings.HasPrefix(m.Topic, "elsewhere/") {
			benchTopics++
		} else if strings.HasPrefix(m.Topic, "bench/") {
			t.Fatalf("a message on %q, outside the topic root", m.Topic)
		}
	}
	if benchTopics < 200 {
		t.Fatalf("%d messages under the topic root on the broker, want at least 200", benchTopics)
	}
}

// TestIdleCountsEveryConnection: idle connections, subscribed, to an
// embedded broker in this process; the RSS readings are this process's.
func TestIdleCountsEveryConnection(t *testing.T) {
	up := startEmbedded(t)
	rs, err := Idle(context.Background(), IdleOptions{
		URL: up.URL(), Connections: 40, PIDs: []int{os.Getpid()}, Subscribe: true, Settle: 10 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 {
		t.Fatalf("got %d results, want 1", len(rs))
	}
	r := rs[0]
	if r.Connections != 40 || !r.Subscribed || r.PID != os.Getpid() || r.RSSBefore <= 0 || r.RSSAfter <= 0 || r.RSSClosed <= 0 {
		t.Errorf("implausible result: %+v", r)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(strings.TrimPrefix(r.Line(), LinePrefix)), &m); err != nil {
		t.Fatalf("line %q: %v", r.Line(), err)
	}
	for _, k := range []string{"name", "connections", "pid", "rss_before_mib", "rss_after_mib", "kib_per_conn"} {
		if _, ok := m[k]; !ok {
			t.Errorf("line %q lacks key %q", r.Line(), k)
		}
	}
	if _, err := Idle(context.Background(), IdleOptions{URL: up.URL(), Connections: 1}); !errors.Is(err, ErrOptions) {
		t.Errorf("Idle without a pid: %v, want ErrOptions", err)
	}
}

// startEmbedded starts an embedded broker for one test.
func startEmbedded(t testing.TB) *embedded.Broker {
	t.Helper()
	up, err := embedded.Start(embedded.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	return up
}
