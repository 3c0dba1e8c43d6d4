// Package embedded runs a mochi-mqtt broker in process, on a loopback port,
// as the untrusted upstream broker of the demo, the benchmarks and the tests.
// A Spy records every message the broker routes, so callers can check what
// the broker saw.
package embedded

import (
	"bytes"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/hooks/storage/bolt"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	bbolt "go.etcd.io/bbolt"
)

// Options configure a Broker.
type Options struct {
	// Addr to listen on; default 127.0.0.1:0 (a free port). A restarted broker
	// listens on the address its previous run had.
	Addr string
	// StorePath, when set, persists sessions, subscriptions, in-flight and
	// retained messages in a bbolt file, so a restart keeps them.
	StorePath string
	// Hooks are added after the spy, e.g. a hostile hook that alters traffic.
	Hooks  []mqtt.Hook
	Logger *slog.Logger
}

// Broker is a running embedded broker.
type Broker struct {
	opts   Options
	server *mqtt.Server
	ln     net.Listener
	addr   string
	Spy    *Spy
}

// Start starts a broker.
func Start(opts Options) (*Broker, error) {
	if opts.Addr == "" {
		opts.Addr = "127.0.0.1:0"
	}
	b := &Broker{opts: opts, Spy: &Spy{}}
	if err := b.start(); err != nil {
		return nil, err
	}
	return b, nil
}

func (b *Broker) start() error {
	log := b.opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumInflight = 65535
	caps.MaximumClientWritesPending = 65536
	s := mqtt.New(&mqtt.Options{InlineClient: true, Logger: log, Capabilities: caps})
	if err := s.AddHook(new(auth.AllowHook), nil); err != nil {
		return err
	}
	if err := s.AddHook(&spyHook{spy: b.Spy}, nil); err != nil {
		return err
	}
	if b.opts.StorePath != "" {
		if err := s.AddHook(new(bolt.Hook), &bolt.Options{Path: b.opts.StorePath, Options: &bbolt.Options{}}); err != nil {
			return fmt.Errorf("embedded broker store: %w", err)
		}
	}
	for _, h := range b.opts.Hooks {
		if err := s.AddHook(h, nil); err != nil {
			return err
		}
	}
	nl, err := net.Listen("tcp", b.opts.Addr)
	if err != nil {
		return fmt.Errorf("embedded broker: %w", err)
	}
	if err := s.AddListener(listeners.NewNet("upstream", nl)); err != nil {
		nl.Close()
		return err
	}
	if err := s.Serve(); err != nil {
		return err
	}
	b.server, b.ln, b.addr = s, nl, nl.Addr().String()
	b.opts.Addr = b.addr
	return nil
}

// Addr is host:port. URL is tcp://host:port.
func (b *Broker) Addr() string { return b.addr }
func (b *Broker) URL() string  { return "tcp://" + b.addr }

// Server exposes the mochi server (for tests that inject traffic as the
// broker would).
func (b *Broker) Server() *mqtt.Server { return b.server }

// Close stops the broker.
func (b *Broker) Close() error {
	if b.server == nil {
		return nil
	}
	// Bounded: mochi 2.7.9's Close can deadlock when a client disconnects
	// at that very moment (see proxy.Sidecar's closeLocalBroker).
	srv := b.server
	b.server = nil
	// mochi 2.7.9 disconnects its clients before it closes the listener, so
	// a client reconnecting at once is accepted and then neither served nor
	// closed: it would wait out its whole connect timeout. A broker that
	// stops accepts nothing more: the listener goes first.
	b.ln.Close()
	done := make(chan error, 1)
	go func() { done <- srv.Close() }()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		return nil
	}
}

// Restart stops the broker and starts it again on the same address, with
// the same store (if any): what a broker restart looks like to its clients.
func (b *Broker) Restart() error {
	if err := b.Close(); err != nil {
		return err
	}
	return b.start()
}

// Seen is one message the broker routed.
type Seen struct {
	Topic   string
	Payload []byte
	Retain  bool
	QoS     byte
	Client  string
}

// Spy records every PUBLISH the broker receives from a client.
type Spy struct {
	mu   sync.Mutex
	seen []Seen
}

// All returns a copy of what the spy saw.
func (s *Spy) All() []Seen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Seen(nil), s.seen...)
}

// Contains reports whether any payload the broker saw contains needle.
func (s *Spy) Contains(needle []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.seen {
		if bytes.Contains(m.Payload, needle) {
			return true
		}
	}
	return false
}

// Reset forgets what was seen.
func (s *Spy) Reset() {
	s.mu.Lock()
	s.seen = nil
	s.mu.Unlock()
}

type spyHook struct {
	mqtt.HookBase
	spy *Spy
}

func (h *spyHook) ID() string { return "spy" }
func (h *spyHook) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnWillSent
}

func (h *spyHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	h.record(cl.ID, pk)
	return pk, nil
}

func (h *spyHook) OnWillSent(cl *mqtt.Client, pk packets.Packet) { h.record(cl.ID, pk) }

func (h *spyHook) record(client string, pk packets.Packet) {
	h.spy.mu.Lock()
	h.spy.seen = append(h.spy.seen, Seen{
		Topic:   pk.TopicName,
		Payload: append([]byte(nil), pk.Payload...),
		Retain:  pk.FixedHeader.Retain,
		QoS:     pk.FixedHeader.Qos,
		Client:  client,
	})
	h.spy.mu.Unlock()
}
