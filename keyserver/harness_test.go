package keyserver_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/faultnet"
	"github.com/smqtt/smqtt/internal/mqttconn"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/keyserver"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

// fleet is a key server, an embedded upstream broker and the identities of
// every member the key server's configuration names.
type fleet struct {
	t       *testing.T
	up      *embedded.Broker
	server  *gkd.Identity
	store   string
	ks      *keyserver.Server
	opts    keyserver.Options
	members map[string]*gkd.Identity
}

func newFleet(t *testing.T, scheme string, allowed []string, others ...string) *fleet {
	t.Helper()
	up, err := embedded.Start(embedded.Options{})
	must(t, err)
	t.Cleanup(func() { up.Close() })
	f := &fleet{t: t, up: up, store: filepath.Join(t.TempDir(), "keyserver.db"), members: map[string]*gkd.Identity{}}
	f.server = newIdentity(t)
	pks := map[string]*gkd.PublicKey{}
	for _, n := range append(append([]string(nil), allowed...), others...) {
		f.members[n] = newIdentity(t)
		pks[n] = f.members[n].Public()
	}
	f.opts = keyserver.Options{
		Identity:  f.server,
		Upstream:  mqttconn.Options{URL: up.URL(), ClientID: "keyserver", MaxReconnectInterval: 200 * time.Millisecond},
		StorePath: f.store,
		Members:   pks,
		Groups: []keyserver.GroupConfig{{
			Name: "demo", Topics: []string{"secure/#"}, Scheme: scheme, Members: allowed,
			RekeyBatch: 100 * time.Millisecond, RekeyLead: 300 * time.Millisecond,
			SendGrace: 2 * time.Second, ReceiveRetention: 5 * time.Second,
		}},
		Heartbeat:  300 * time.Millisecond,
		LeaveDelay: 300 * time.Millisecond,
	}
	f.startServer()
	return f
}

func newIdentity(t *testing.T) *gkd.Identity {
	t.Helper()
	id, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	must(t, err)
	return id
}

func (f *fleet) startServer() {
	f.t.Helper()
	ks, err := keyserver.New(f.opts)
	must(f.t, err)
	must(f.t, ks.Start())
	waitFor(f.t, ks.Connected, "key server connected")
	f.ks = ks
	f.t.Cleanup(func() { ks.Close() })
}

// node is one sidecar with its key client.
type node struct {
	name  string
	ring  *keyclient.Ring
	kc    *keyclient.Client
	sc    *proxy.Sidecar
	relay *faultnet.Relay // the key client's path to upstream
	app   *mqtttest.App
}

type nodeOpt func(*keyclient.ClientOptions)

// startKeyClient starts name's key client (identity from the fleet unless
// given) and waits up to wait for it to join.
func (f *fleet) keyClient(name string, id *gkd.Identity, wait time.Duration) (*keyclient.Client, *keyclient.Ring, *faultnet.Relay, error) {
	f.t.Helper()
	if id == nil {
		id = f.members[name]
	}
	relay, err := faultnet.New(f.up.Addr())
	must(f.t, err)
	f.t.Cleanup(func() { relay.Close() })
	ring := keyclient.NewRing()
	kc, err := keyclient.NewClient(keyclient.ClientOptions{
		Identity:     id,
		Server:       f.server.Public(),
		Upstream:     mqttconn.Options{URL: relay.URL(), ClientID: name + "-keys", MaxReconnectInterval: 200 * time.Millisecond},
		Groups:       []string{"demo"},
		MaxStaleness: 5 * time.Second,
		JoinRetry:    time.Second,
		Ring:         ring,
	})
	must(f.t, err)
	kc.Start()
	f.t.Cleanup(kc.Close)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return kc, ring, relay, kc.WaitJoined(ctx)
}

// join starts a full member: key client, then its sidecar and one app.
func (f *fleet) join(name string) *node {
	f.t.Helper()
	kc, ring, relay, err := f.keyClient(name, nil, 10*time.Second)
	must(f.t, err)
	sc, err := proxy.New(proxy.Options{
		Listen:    []string{"tcp://127.0.0.1:0"},
		Upstream:  proxy.UpstreamOptions{URL: f.up.URL(), ClientID: name, MaxReconnectInterval: 200 * time.Millisecond},
		Rules:     []proxy.Rule{{Filters: []string{"secure/#"}, Group: "demo"}},
		Keys:      ring,
		DataDir:   f.t.TempDir(),
		Queue:     queue.Options{Sync: queue.SyncBatch},
		NoKeyWait: 5 * time.Second,
	})
	must(f.t, err)
	must(f.t, sc.Start())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	must(f.t, sc.WaitConnected(ctx))
	f.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		sc.Close(ctx)
	})
	app, err := mqtttest.Connect("tcp://"+sc.Addrs()[0].String(), name+"-app", mqtttest.AppOptions{})
	must(f.t, err)
	f.t.Cleanup(app.Close)
	return &node{name: name, ring: ring, kc: kc, sc: sc, relay: relay, app: app}
}

func (n *node) epoch() uint32 {
	e, _ := n.ring.SendEpoch("demo")
	return e
}

// waitEpoch waits until the node seals with an epoch above after.
func waitEpoch(t *testing.T, n *node, after uint32) uint32 {
	t.Helper()
	waitFor(t, func() bool { return n.epoch() > after }, "%s moves past epoch %d (at %d)", n.name, after, n.epoch())
	return n.epoch()
}

// settle waits until every node seals with the same epoch (joins and
// rekeys activate at activate_at) and returns it.
func settle(t *testing.T, nodes ...*node) uint32 {
	t.Helper()
	waitFor(t, func() bool {
		e := nodes[0].epoch()
		for _, n := range nodes {
			if n.epoch() == 0 || n.epoch() != e {
				return false
			}
		}
		return true
	}, "all nodes on one epoch")
	return nodes[0].epoch()
}

// captured returns the last envelope the broker saw on topic.
func (f *fleet) captured(topic string) []byte {
	var last []byte
	for _, s := range f.up.Spy.All() {
		if s.Topic == topic {
			last = s.Payload
		}
	}
	return last
}

// canOpen reports whether ring opens env (sealed for topic in group demo).
func canOpen(ring *keyclient.Ring, topic string, env []byte) bool {
	_, _, err := envelope.NewOpener(ring, 16).Open(nil, "demo", topic, env)
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

func uniq(p string) string { return fmt.Sprintf("%s-%d", p, time.Now().UnixNano()) }
