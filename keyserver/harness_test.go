package keyserver_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
)

// testFleet is a key server and its members around an embedded broker.
type testFleet struct {
	*fleet.Fleet
	t  *testing.T
	up *embedded.Broker
}

func newFleet(t *testing.T, scheme string, allowed []string, others ...string) *testFleet {
	t.Helper()
	up, err := embedded.Start(embedded.Options{})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	f, err := fleet.New(fleet.Options{
		UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: t.TempDir(),
		Scheme: scheme, Members: allowed, Others: others,
	})
	must(t, err)
	t.Cleanup(f.Close)
	return &testFleet{Fleet: f, t: t, up: up}
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
