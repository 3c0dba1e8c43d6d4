package proxy_test

import (
	"bytes"
	"context"
	"sync"

	"crypto/rand"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

// upstream is the untrusted broker a test runs against.
type upstream interface {
	URL() string
	Restart() error
	Close() error
}

// rig is one test topology: an upstream broker and sidecars sharing one
// static group key, all in one mode (the default, session, when empty).
type rig struct {
	t    testing.TB
	up   upstream
	key  envelope.GroupKey
	mode proxy.Mode
}

func newRig(t testing.TB, up upstream) *rig { return newModeRig(t, "", up) }

// newBridgeRig is a rig of sidecars in bridge mode, for what only that mode
// does (the local broker, the outbound queue, the upstream mirror).
func newBridgeRig(t testing.TB, up upstream) *rig { return newModeRig(t, proxy.ModeBridge, up) }

func newModeRig(t testing.TB, mode proxy.Mode, up upstream) *rig {
	t.Helper()
	r := &rig{t: t, up: up, mode: mode}
	if _, err := rand.Read(r.key[:]); err != nil {
		t.Fatal(err)
	}
	return r
}

// bothModes runs a test once in each mode: what the sidecar promises holds
// in both.
func bothModes(t *testing.T, f func(t *testing.T, mode proxy.Mode)) {
	for _, m := range []proxy.Mode{proxy.ModeSession, proxy.ModeBridge} {
		t.Run(string(m), func(t *testing.T) { f(t, m) })
	}
}

func embeddedUpstream(t testing.TB, persist bool) *embedded.Broker {
	t.Helper()
	o := embedded.Options{}
	if persist {
		o.StorePath = filepath.Join(t.TempDir(), "upstream.db")
	}
	b, err := embedded.Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

var testRules = []proxy.Rule{{Filters: []string{"secure/#"}, Group: "demo"}}

type sidecarOpt func(*proxy.Options)

// sidecar starts a sidecar named name (its upstream client id) with its
// data in dir (a fresh temp dir when empty).
func (r *rig) sidecar(name, dir string, opts ...sidecarOpt) *proxy.Sidecar {
	r.t.Helper()
	if dir == "" {
		dir = r.t.TempDir()
	}
	ring := keyclient.NewRing()
	if err := ring.AddStatic("demo", r.key); err != nil {
		r.t.Fatal(err)
	}
	o := proxy.Options{
		Mode:     r.mode,
		Listen:   []string{"tcp://127.0.0.1:0"},
		Upstream: proxy.UpstreamOptions{URL: r.up.URL(), ClientID: name, MaxReconnectInterval: 200 * time.Millisecond},
		Rules:    testRules,
		Keys:     ring,
		DataDir:  dir,
		Queue:    queue.Options{Sync: queue.SyncBatch},
	}
	for _, f := range opts {
		f(&o)
	}
	sc, err := proxy.New(o)
	if err != nil {
		r.t.Fatal(err)
	}
	if err := sc.Start(); err != nil {
		r.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := sc.WaitConnected(ctx); err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		sc.Close(ctx)
	})
	return sc
}

func localURL(sc *proxy.Sidecar) string { return "tcp://" + sc.Addrs()[0].String() }

func (r *rig) app(sc *proxy.Sidecar, id string) *mqtttest.App {
	r.t.Helper()
	a, err := mqtttest.Connect(localURL(sc), id, mqtttest.AppOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(a.Close)
	return a
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// expect waits for the next message and checks it.
func expect(t *testing.T, a *mqtttest.App, topic, payload string) mqtttest.Msg {
	t.Helper()
	m, ok := a.Next(5 * time.Second)
	if !ok {
		t.Fatalf("no message on %s (want %q)", topic, payload)
	}
	if m.Topic != topic || string(m.Payload) != payload {
		t.Fatalf("got %s %q, want %s %q", m.Topic, m.Payload, topic, payload)
	}
	return m
}

// expectNone checks that nothing arrives for d.
func expectNone(t *testing.T, a *mqtttest.App, d time.Duration) {
	t.Helper()
	if m, ok := a.Next(d); ok {
		t.Fatalf("unexpected message %s %q (retain=%v qos=%d)", m.Topic, m.Payload, m.Retain, m.QoS)
	}
}

func uniq(prefix string) string { return fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano()) }

// wireSpy is an ordinary client of the upstream broker subscribed to "#":
// it sees what anyone with access to the broker sees.
type wireSpy struct {
	app *mqtttest.App
	mu  sync.Mutex
	all [][]byte
}

func newWireSpy(t *testing.T, url string) *wireSpy {
	t.Helper()
	a, err := mqtttest.Connect(url, uniq("spy"), mqtttest.AppOptions{InboxSize: 1})
	must(t, err)
	s := &wireSpy{app: a}
	a.Client.Unsubscribe("#")
	tok := a.Client.Subscribe("#", 2, func(_ paho.Client, m paho.Message) {
		s.mu.Lock()
		s.all = append(s.all, append([]byte(nil), m.Payload()...))
		s.mu.Unlock()
	})
	tok.Wait()
	must(t, tok.Error())
	t.Cleanup(a.Close)
	return s
}

func (s *wireSpy) Contains(needle []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.all {
		if bytes.Contains(p, needle) {
			return true
		}
	}
	return false
}
