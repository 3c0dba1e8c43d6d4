package keyserver_test

import (
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/keyserver"
)

// testFleet is a key server and its members around an embedded broker.
type testFleet struct {
	*fleet.Fleet
	t  *testing.T
	up *embedded.Broker
}

func newFleet(t *testing.T, scheme string, allowed []string, others ...string) *testFleet {
	t.Helper()
	return newFleetWith(t, fleet.Options{Scheme: scheme, Members: allowed, Others: others})
}

// newFleetWith starts an embedded broker (with hooks after its spy) and a
// fleet of o around it.
func newFleetWith(t *testing.T, o fleet.Options, hooks ...mqtt.Hook) *testFleet {
	t.Helper()
	up, err := embedded.Start(embedded.Options{Hooks: hooks})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	o.UpstreamURL, o.UpstreamAddr, o.Dir = up.URL(), up.Addr(), t.TempDir()
	f, err := fleet.New(o)
	must(t, err)
	t.Cleanup(f.Close)
	return &testFleet{Fleet: f, t: t, up: up}
}

// A testStore is where a test's key server keeps its state. Tests that must
// hold on every store the key server can run on loop over testStores; a store
// other than the default bbolt file in the test's directory adds an entry
// whose keyServer opens it (on a prefix of its own for each test).
type testStore struct {
	name      string
	keyServer func(t *testing.T, o *keyserver.Options) // nil: the bbolt file
}

var testStores = []testStore{{name: "bbolt"}}

// forEachStore runs test once per store, as a subtest named after it, with
// fleet options that open that store.
func forEachStore(t *testing.T, test func(t *testing.T, o fleet.Options)) {
	for _, st := range testStores {
		t.Run(st.name, func(t *testing.T) {
			var o fleet.Options
			if st.keyServer != nil {
				o.KeyServer = func(ko *keyserver.Options) { st.keyServer(t, ko) }
			}
			test(t, o)
		})
	}
}

// revoke reloads the key server with its group allowing only members.
func (f *testFleet) revoke(members ...string) {
	f.t.Helper()
	opts := f.KSOpts
	g := opts.Groups[0]
	g.Members = members
	opts.Groups = []keyserver.GroupConfig{g}
	must(f.t, f.KS.Reload(opts))
}

// stream publishes n QoS 1 messages "0" … "n-1" on topic from app, pause
// apart, in the background; wait waits for the last one.
func stream(t *testing.T, app *mqtttest.App, topic string, n int, pause time.Duration) (wait func()) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < n; i++ {
			if err := app.Publish(topic, 1, false, []byte(strconv.Itoa(i))); err != nil {
				t.Errorf("publish %d: %v", i, err)
				return
			}
			time.Sleep(pause)
		}
	}()
	return wg.Wait
}

// expectStream expects "0" … "n-1" on topic, in order.
func expectStream(t *testing.T, app *mqtttest.App, topic string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		expect(t, app, topic, strconv.Itoa(i))
	}
}

func (f *testFleet) join(name string) *fleet.Node {
	f.t.Helper()
	n, err := f.Join(name)
	must(f.t, err)
	return n
}

func (f *testFleet) restartServer() {
	f.t.Helper()
	must(f.t, f.KS.Close())
	must(f.t, f.StartServer())
}

// waitEpoch waits until the node seals with an epoch above after.
func waitEpoch(t *testing.T, n *fleet.Node, after uint32) uint32 {
	t.Helper()
	waitFor(t, func() bool { return n.Epoch() > after }, "%s moves past epoch %d (at %d)", n.Name, after, n.Epoch())
	return n.Epoch()
}

// settle waits until every node seals with the same epoch (joins and
// rekeys activate at activate_at) and returns it.
func settle(t *testing.T, nodes ...*fleet.Node) uint32 {
	t.Helper()
	e, err := fleet.Settle(10*time.Second, nodes...)
	must(t, err)
	return e
}

// captured returns the last envelope the broker saw on topic.
func (f *testFleet) captured(topic string) []byte {
	all := f.capturedAll(topic)
	if len(all) == 0 {
		return nil
	}
	return all[len(all)-1]
}

// capturedAll returns every payload the broker saw on topic, oldest first.
func (f *testFleet) capturedAll(topic string) [][]byte {
	var out [][]byte
	for _, s := range f.up.Spy.All() {
		if s.Topic == topic {
			out = append(out, s.Payload)
		}
	}
	return out
}

// canOpen reports whether ring opens env (sealed for topic in the group).
func canOpen(ring *keyclient.Ring, topic string, env []byte) bool {
	_, _, err := envelope.NewOpener(ring, 16).Open(nil, fleet.Group, topic, env)
	return err == nil
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: "+format, args...)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func expect(t *testing.T, a *mqtttest.App, topic, payload string) {
	t.Helper()
	m, ok := a.Next(5 * time.Second)
	if !ok {
		t.Fatalf("no message on %s (want %q)", topic, payload)
	}
	if m.Topic != topic || string(m.Payload) != payload {
		t.Fatalf("got %s %q, want %s %q", m.Topic, m.Payload, topic, payload)
	}
}

var _ = fmt.Sprint
