// Package fleet starts, in one process, what a deployment runs on many
// hosts: a key server and sidecars with their key clients, around one
// upstream broker. The demo, the benchmarks and the tests build on it.
package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/faultnet"
	"github.com/smqtt/smqtt/internal/mqttconn"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/keyserver"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

// Group is the one group a fleet runs: it protects secure/#.
const Group = "demo"

// Options configure a Fleet.
type Options struct {
	UpstreamURL  string // the broker
	UpstreamAddr string // host:port of the broker, for fault relays
	Dir          string // state: key server store, sidecar data
	Scheme       string // static, update, slotted or lkh (degree 4)
	Suite        gkd.Suite
	Members      []string // allowed in the group
	Others       []string // known to the key server but not in the group
	Logger       *slog.Logger
	Registry     prometheus.Registerer // the key server's metrics
	Mode         proxy.Mode            // the sidecars' (default session)
	// Timings (tests shorten them): defaults 100ms, 300ms, 2s, 5s, 300ms, 300ms.
	RekeyBatch, RekeyLead, SendGrace, ReceiveRetention, Heartbeat, LeaveDelay time.Duration
	// Slotted groups: zero values take the key server's defaults.
	Slot, MemberInterval time.Duration
	SkewSlots, SlotDepth int
	// SenderAuth makes the group a sender_auth group; MaxMessageSize bounds
	// its key-distribution messages (0: the key server's default).
	SenderAuth     bool
	MaxMessageSize int
	// KeyServer, when set, adjusts the key server's options before it
	// first starts (a test puts its store elsewhere, for instance).
	KeyServer func(*keyserver.Options)
}

// Fleet is a running key server and the identities of its members.
type Fleet struct {
	Opts     Options
	Server   *gkd.Identity
	KS       *keyserver.Server
	KSOpts   keyserver.Options
	Members  map[string]*gkd.Identity
	Nodes    []*Node
	log      *slog.Logger
	cleanups []func()
}

// Node is one member: a key client, its ring, and (unless key-only) a
// sidecar with one legacy application connected to it.
type Node struct {
	Name  string
	Ring  *keyclient.Ring
	Keys  *keyclient.Client
	Side  *proxy.Sidecar
	Relay *faultnet.Relay // the key client's path to upstream, to cut it
	Data  *faultnet.Relay // the sidecar's path to upstream
	App   *mqtttest.App
}

// New makes identities and starts the key server.
func New(o Options) (*Fleet, error) {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&o.RekeyBatch, 100*time.Millisecond)
	def(&o.RekeyLead, 300*time.Millisecond)
	def(&o.SendGrace, 2*time.Second)
	def(&o.ReceiveRetention, 5*time.Second)
	def(&o.Heartbeat, 300*time.Millisecond)
	def(&o.LeaveDelay, 300*time.Millisecond)
	if o.Suite == "" {
		o.Suite = gkd.SuiteX25519
	}
	if o.Scheme == "" {
		o.Scheme = "update"
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	f := &Fleet{Opts: o, Members: map[string]*gkd.Identity{}, log: o.Logger}
	var err error
	if f.Server, err = gkd.GenerateIdentity(o.Suite); err != nil {
		return nil, err
	}
	pks := map[string]*gkd.PublicKey{}
	for _, n := range append(append([]string(nil), o.Members...), o.Others...) {
		id, err := gkd.GenerateIdentity(o.Suite)
		if err != nil {
			return nil, err
		}
		f.Members[n] = id
		pks[n] = id.Public()
	}
	f.KSOpts = keyserver.Options{
		Identity:  f.Server,
		Upstream:  mqttconn.Options{URL: o.UpstreamURL, ClientID: "keyserver", MaxReconnectInterval: 200 * time.Millisecond},
		StorePath: filepath.Join(o.Dir, "keyserver.db"),
		Members:   pks,
		Groups: []keyserver.GroupConfig{{
			Name: Group, Topics: []string{"secure/#"}, Scheme: o.Scheme, Members: o.Members,
			RekeyBatch: o.RekeyBatch, RekeyLead: o.RekeyLead, SendGrace: o.SendGrace, ReceiveRetention: o.ReceiveRetention,
			Degree: 4, MaxMessageSize: o.MaxMessageSize, SenderAuth: o.SenderAuth,
			Slot: o.Slot, MemberInterval: o.MemberInterval, SkewSlots: o.SkewSlots, SlotDepth: o.SlotDepth,
		}},
		Heartbeat:  o.Heartbeat,
		LeaveDelay: o.LeaveDelay,
		Logger:     o.Logger,
		Registry:   o.Registry,
	}
	if o.KeyServer != nil {
		o.KeyServer(&f.KSOpts)
	}
	if err := f.StartServer(); err != nil {
		return nil, err
	}
	return f, nil
}

// StartServer starts (or restarts) the key server on its store.
func (f *Fleet) StartServer() error {
	ks, err := keyserver.New(f.KSOpts)
	if err != nil {
		return err
	}
	if err := ks.Start(); err != nil {
		ks.Close()
		return err
	}
	if err := waitUntil(10*time.Second, ks.Connected); err != nil {
		ks.Close()
		return fmt.Errorf("key server: %w", err)
	}
	f.KS = ks
	return nil
}

// KeyClient starts name's key client (with id, or the fleet's identity for
// name) and waits up to wait for it to join. The client is returned even
// when joining failed, with the error.
func (f *Fleet) KeyClient(name string, id *gkd.Identity, wait time.Duration) (*Node, error) {
	if id == nil {
		id = f.Members[name]
	}
	if id == nil {
		return nil, fmt.Errorf("fleet: no identity for %q", name)
	}
	relay, err := faultnet.New(f.Opts.UpstreamAddr)
	if err != nil {
		return nil, err
	}
	n := &Node{Name: name, Ring: keyclient.NewRing(), Relay: relay}
	n.Keys, err = keyclient.NewClient(keyclient.ClientOptions{
		Identity:     id,
		Server:       f.Server.Public(),
		Upstream:     mqttconn.Options{URL: relay.URL(), ClientID: name + "-keys", MaxReconnectInterval: 200 * time.Millisecond},
		Groups:       []string{Group},
		MaxStaleness: 10 * f.Opts.Heartbeat,
		JoinRetry:    time.Second,
		Ring:         n.Ring,
		Logger:       f.log,
	})
	if err != nil {
		relay.Close()
		return nil, err
	}
	n.Keys.Start()
	f.Nodes = append(f.Nodes, n)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return n, n.Keys.WaitJoined(ctx)
}

// Join starts a full member: key client, sidecar (protecting secure/# with
// the group's key) and one application connected to the sidecar.
func (f *Fleet) Join(name string) (*Node, error) {
	n, err := f.KeyClient(name, nil, 15*time.Second)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(f.Opts.Dir, name)
	if n.Data, err = faultnet.New(f.Opts.UpstreamAddr); err != nil {
		return nil, err
	}
	n.Side, err = proxy.New(proxy.Options{
		Mode:      f.Opts.Mode,
		Listen:    []string{"tcp://127.0.0.1:0"},
		Upstream:  proxy.UpstreamOptions{URL: n.Data.URL(), ClientID: name, MaxReconnectInterval: 200 * time.Millisecond},
		Rules:     []proxy.Rule{{Filters: []string{"secure/#"}, Group: Group}},
		Keys:      n.Ring,
		DataDir:   dir,
		Queue:     queue.Options{Sync: queue.SyncBatch},
		NoKeyWait: 5 * time.Second,
		Logger:    f.log,
	})
	if err != nil {
		return nil, err
	}
	if err := n.Side.Start(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Side.WaitConnected(ctx); err != nil {
		return nil, err
	}
	n.App, err = mqtttest.Connect(n.URL(), name+"-app", mqtttest.AppOptions{})
	return n, err
}

// URL is where the node's sidecar listens for applications.
func (n *Node) URL() string { return "tcp://" + n.Side.Addrs()[0].String() }

// Epoch is the epoch the node seals with (0: none).
func (n *Node) Epoch() uint32 {
	e, _ := n.Ring.SendEpoch(Group)
	return e
}

// Crash stops the node's key client as a crash would: its connection is cut
// under it (so the broker publishes its Will) and it sends no leave.
func (n *Node) Crash() {
	n.Keys.Abandon() // first, so that it does not reconnect
	n.Relay.Cut()
}

// Close stops the node cleanly (its key client leaves the group).
func (n *Node) Close() {
	if n.App != nil {
		n.App.Close()
	}
	if n.Side != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		n.Side.Close(ctx)
		cancel()
	}
	n.Keys.Close()
	n.Relay.Close()
	if n.Data != nil {
		n.Data.Close()
	}
}

// Settle waits until every node seals with one epoch and returns it.
func Settle(wait time.Duration, nodes ...*Node) (uint32, error) {
	err := waitUntil(wait, func() bool {
		for _, n := range nodes {
			if n.Epoch() == 0 || n.Epoch() != nodes[0].Epoch() {
				return false
			}
		}
		return true
	})
	if err != nil {
		var es []uint32
		for _, n := range nodes {
			es = append(es, n.Epoch())
		}
		return 0, fmt.Errorf("nodes not on one epoch: %v", es)
	}
	return nodes[0].Epoch(), nil
}

// Close stops every node and the key server.
func (f *Fleet) Close() {
	for _, n := range f.Nodes {
		n.Close()
	}
	if f.KS != nil {
		f.KS.Close()
	}
}

func waitUntil(d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return errors.New("timed out")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}
