// Package bench measures what smqtt costs: it drives real MQTT clients,
// standing in for unmodified applications, through real brokers and
// sidecars, and reports throughput, latency, loss and CPU per scenario.
//
// A scenario is a topology crossed with a load:
//
//	direct       apps ──▶ upstream broker ──▶ apps           (the baseline)
//	passthrough  apps ──▶ sidecar ──▶ upstream ──▶ sidecar ──▶ apps, nothing protected
//	protected    the same, every benchmark topic sealed under a static group key
//	signed       protected, and the group is sender_auth: the publishing
//	             sidecar proves what it seals (batch proofs), the
//	             subscribing one checks every proof
//	chain        apps ──▶ broker A ──▶ … ──▶ broker B ──▶ apps, any brokers
//	             the caller set up (e.g. a Mosquitto bridge chain)
//
// Every payload starts with the publisher's number, a sequence number and
// the send time (nanoseconds on this process's monotonic clock), so each
// subscriber computes latency, loss, duplicates and reordering by itself.
// Everything but the brokers runs in this process: the CPU and memory
// figures are the process's (getrusage, /proc/self/status), apps included.
//
// Run measures one scenario; Suite runs several against one upstream broker
// (an embedded mochi-mqtt when none is given) so their figures compare.
// Rekey (rekey.go) measures group key distribution instead: joins and the
// rekey fan-out after a leave; Idle (idle.go) the memory an idle app
// connection costs a sidecar. The apps' connections read through a buffer
// and coalesce their writes (conn.go), so that the load generator is not
// what limits the path it measures.
//
// Results print as a table (WriteTable) and as one machine-readable line per
// scenario, "BENCH " followed by a JSON object with fixed keys (Result.Line).
package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

// Topologies, in the order Suite runs them.
const (
	Direct      = "direct"
	Passthrough = "passthrough"
	Protected   = "protected"
	Signed      = "signed"
	Chain       = "chain"
)

// Topologies lists every topology name.
var Topologies = []string{Direct, Passthrough, Protected, Signed, Chain}

// HeaderLen is the smallest payload: publisher (4 bytes), sequence (8),
// send time (8).
const HeaderLen = 20

// Group is the static group that protects the benchmark topics.
const Group = "bench"

// ErrOptions marks an invalid option; the message names it.
var ErrOptions = errors.New("invalid benchmark option")

// Options describe one scenario.
type Options struct {
	Name        string  // shown in the table; default the topology
	Topology    string  // Direct, Passthrough, Protected or Chain
	UpstreamURL string  // the broker (not for Chain)
	ChainPub    string  // Chain: the broker publishers connect to
	ChainSub    string  // Chain: the broker subscribers connect to
	QoS         byte    // 0, 1 or 2
	Size        int     // payload bytes, at least HeaderLen (default 256)
	Messages    int     // per publisher (default 20000)
	Publishers  int     // default 1
	Subscribers int     // each gets every message (default 1)
	KeepSession bool    // subscribers ask for a persistent session (clean session 0)
	Rate        float64 // messages per second per publisher; 0: as fast as the path takes
	// Spread makes each publisher cycle over this many topics, of which
	// the subscribers take one (default 1: every message): with Signed, a
	// subscriber then sees one envelope of each batch, the worst case of
	// batch proofs (one signature check per message).
	Spread int
	// TopicRoot is the first level of every benchmark topic (default
	// "bench"): scenarios sharing a broker with other traffic (a bridge
	// that carries one root) keep apart by it.
	TopicRoot string
	// Window bounds the publishes not yet acknowledged per publisher
	// (default 1000).
	Window int
	// Timeout bounds the scenario from the first publish (default 60s).
	Timeout time.Duration
	// Idle ends the scenario this long after the last delivery once every
	// publisher is done, when messages were lost (default 2s).
	Idle time.Duration
	// Mode is the sidecars' relay (passthrough, protected): session (the
	// default) or bridge.
	Mode     proxy.Mode
	Dir      string    // sidecar state; default a temporary directory
	Progress io.Writer // one line per second while it runs; nil: none
	Logger   *slog.Logger
}

func (o *Options) defaults() error {
	if o.Mode == "" {
		o.Mode = proxy.ModeSession
	}
	if o.Name == "" {
		o.Name = o.Topology
		if o.Mode == proxy.ModeBridge && sidecars(o.Topology) {
			o.Name += "-bridge"
		}
	}
	if o.Size == 0 {
		o.Size = 256
	}
	if o.Messages == 0 {
		o.Messages = 20000
	}
	if o.Publishers == 0 {
		o.Publishers = 1
	}
	if o.Subscribers == 0 {
		o.Subscribers = 1
	}
	if o.Window == 0 {
		o.Window = 1000
	}
	if o.Spread == 0 {
		o.Spread = 1
	}
	if o.TopicRoot == "" {
		o.TopicRoot = "bench"
	}
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	if o.Idle == 0 {
		o.Idle = 2 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case !slices.Contains(Topologies, o.Topology):
		return fmt.Errorf("%w: topology %q is not one of %s", ErrOptions, o.Topology, strings.Join(Topologies, ", "))
	case o.Topology == Chain && (o.ChainPub == "" || o.ChainSub == ""):
		return fmt.Errorf("%w: topology chain needs the publish and subscribe broker URLs", ErrOptions)
	case o.Topology != Chain && o.UpstreamURL == "":
		return fmt.Errorf("%w: topology %s needs an upstream URL", ErrOptions, o.Topology)
	case o.QoS > 2:
		return fmt.Errorf("%w: qos %d is not 0, 1 or 2", ErrOptions, o.QoS)
	case o.Size < HeaderLen:
		return fmt.Errorf("%w: size %d is below the %d-byte header", ErrOptions, o.Size, HeaderLen)
	case o.Messages < 0 || o.Publishers < 0 || o.Subscribers < 0 || o.Window < 1:
		return fmt.Errorf("%w: messages, publishers, subscribers and window must be positive", ErrOptions)
	case o.Rate < 0:
		return fmt.Errorf("%w: rate %g is negative", ErrOptions, o.Rate)
	case o.Spread < 1 || o.Spread > o.Messages:
		return fmt.Errorf("%w: spread %d is not between 1 and the messages per publisher", ErrOptions, o.Spread)
	case o.Mode != proxy.ModeSession && o.Mode != proxy.ModeBridge:
		return fmt.Errorf("%w: mode %q is not session or bridge", ErrOptions, o.Mode)
	case strings.ContainsAny(o.TopicRoot, "/+#\x00"):
		return fmt.Errorf("%w: topic root %q is not one topic level", ErrOptions, o.TopicRoot)
	}
	return nil
}

// Result is what one scenario measured. Counts add up over subscribers:
// with fan-out F, every sent message is expected F times.
type Result struct {
	Name       string  `json:"name"`
	Topology   string  `json:"topology"`
	QoS        byte    `json:"qos"`
	Size       int     `json:"size"`
	Sent       int     `json:"sent"`     // publishes the client library accepted (QoS>0: acknowledged)
	Received   int     `json:"received"` // distinct deliveries
	Lost       int     `json:"lost"`     // expected − received
	Dup        int     `json:"dup"`      // deliveries beyond the first
	OOO        int     `json:"ooo"`      // deliveries older than one already seen from the same publisher
	MsgsPerS   float64 `json:"msgs_per_s"`
	P50us      float64 `json:"p50_us"`
	P90us      float64 `json:"p90_us"`
	P99us      float64 `json:"p99_us"`
	MaxUs      float64 `json:"max_us"`
	CPUSPer1k  float64 `json:"cpu_s_per_1k"` // process CPU seconds per 1000 received
	RSSMiB     float64 `json:"rss_mib"`
	TimedOut   bool    `json:"-"`
	DurationS  float64 `json:"-"`
	CPUSeconds float64 `json:"-"`
}

// Line is the machine-readable form: "BENCH " and a JSON object.
func (r Result) Line() string { return benchLine(r) }

// Suite runs each topology in turn with the same load against one upstream:
// o.UpstreamURL, or an embedded mochi-mqtt broker started for the suite when
// it is empty. onResult, when set, is called after each scenario.
func Suite(ctx context.Context, o Options, topologies []string, onResult func(Result)) ([]Result, error) {
	if o.UpstreamURL == "" && !(len(topologies) == 1 && topologies[0] == Chain) {
		b, err := embedded.Start(embedded.Options{})
		if err != nil {
			return nil, fmt.Errorf("bench: embedded broker: %w", err)
		}
		defer b.Close()
		o.UpstreamURL = b.URL()
	}
	var out []Result
	for _, t := range topologies {
		so := o
		so.Topology, so.Name = t, ""
		if o.Name != "" {
			so.Name = o.Name + "-" + t
		}
		r, err := Run(ctx, so)
		if err != nil {
			return out, err
		}
		out = append(out, r)
		if onResult != nil {
			onResult(r)
		}
	}
	return out, nil
}

// Run measures one scenario. It returns an error only when the scenario
// could not be set up; lost or late messages are figures of the Result.
func Run(ctx context.Context, o Options) (Result, error) {
	if err := o.defaults(); err != nil {
		return Result{}, err
	}
	s := &scenario{o: o}
	defer s.close()
	if err := s.setup(ctx); err != nil {
		return Result{}, fmt.Errorf("bench %s: %w", o.Name, err)
	}
	return s.measure(ctx), nil
}

type scenario struct {
	o        Options
	run      string // random, so that runs against one broker do not mix
	prefix   string
	pubURL   string
	subURL   string
	tmp      string
	sidecars []*proxy.Sidecar
	pubs     []paho.Client
	subs     []*subscriber
}

func (s *scenario) setup(ctx context.Context) error {
	var rnd [4]byte
	rand.Read(rnd[:])
	s.run = hex.EncodeToString(rnd[:])
	o := s.o
	s.prefix = o.TopicRoot + "/" + s.run
	switch o.Topology {
	case Direct:
		s.pubURL, s.subURL = o.UpstreamURL, o.UpstreamURL
	case Chain:
		s.pubURL, s.subURL = o.ChainPub, o.ChainSub
	case Passthrough, Protected, Signed:
		if err := s.startSidecars(ctx); err != nil {
			return err
		}
	}
	for i := range o.Subscribers {
		sub, err := newSubscriber(s.subURL, fmt.Sprintf("bench-%s-sub-%d", s.run, i), s.prefix, o)
		if err != nil {
			return err
		}
		s.subs = append(s.subs, sub)
	}
	for i := range o.Publishers {
		c, err := connect(s.pubURL, fmt.Sprintf("bench-%s-pub-%d", s.run, i), true, nil)
		if err != nil {
			return err
		}
		s.pubs = append(s.pubs, c)
	}
	return s.probe(ctx)
}

func (s *scenario) startSidecars(ctx context.Context) error {
	o := s.o
	dir := o.Dir
	if dir == "" {
		var err error
		if s.tmp, err = os.MkdirTemp("", "smqtt-bench-"); err != nil {
			return err
		}
		dir = s.tmp
	}
	var key envelope.GroupKey
	rand.Read(key[:])
	var rings []*keyclient.Ring
	signers := map[*keyclient.Ring]ed25519.PublicKey{}
	for _, side := range []string{"pub", "sub"} {
		ring := keyclient.NewRing()
		rings = append(rings, ring)
		var rules []proxy.Rule
		if o.Topology == Protected || o.Topology == Signed {
			if err := ring.AddStatic(Group, key); err != nil {
				return err
			}
			rules = []proxy.Rule{{Filters: []string{s.prefix + "/#"}, Group: Group}}
		}
		if o.Topology == Signed {
			pub, err := signWith(ring)
			if err != nil {
				return err
			}
			signers[ring] = pub
		}
		sc, url, err := startSidecar(ctx, o.Mode, o.UpstreamURL, "bench-"+s.run+"-sidecar-"+side, filepath.Join(dir, s.run+"-"+side), rules, ring, o.Logger)
		if sc != nil {
			s.sidecars = append(s.sidecars, sc)
		}
		if err != nil {
			return fmt.Errorf("sidecar %s: %w", side, err)
		}
		if side == "pub" {
			s.pubURL = url
		} else {
			s.subURL = url
		}
	}
	if o.Topology == Signed {
		return installRoster(signers)
	}
	return nil
}

// sidecars reports whether a topology runs sidecars.
func sidecars(topology string) bool {
	return topology == Passthrough || topology == Protected || topology == Signed
}

// ringSigner is a ring's signing key, as a key server would certify it.
type ringSigner ed25519.PrivateKey

func (k ringSigner) Sign(m []byte) []byte { return ed25519.Sign(ed25519.PrivateKey(k), m) }

// signWith makes Group a sender_auth group in ring, signed by a new key
// whose public half it returns.
func signWith(ring *keyclient.Ring) (ed25519.PublicKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	ring.SetSenderAuth(Group, true)
	ring.SetProofSigner(ringSigner(priv))
	return pub, nil
}

// installRoster certifies, in every ring, each ring's sender id with its
// signing key, as a key server's Roster does.
func installRoster(signers map[*keyclient.Ring]ed25519.PublicKey) error {
	keys := map[uint64]ed25519.PublicKey{}
	for ring, pub := range signers {
		s, err := ring.Sealer(Group)
		if err != nil {
			return err
		}
		keys[s.Sender()] = pub
	}
	for ring := range signers {
		if err := ring.InstallRoster(Group, 1, keys); err != nil {
			return err
		}
	}
	return nil
}

// startSidecar starts a sidecar in this process and waits until it is
// connected upstream; it returns the URL its apps connect to. A sidecar it
// returns with an error still needs closing.
func startSidecar(ctx context.Context, mode proxy.Mode, upstream, clientID, dir string, rules []proxy.Rule, ring *keyclient.Ring, log *slog.Logger) (*proxy.Sidecar, string, error) {
	sc, err := proxy.New(proxy.Options{
		Mode:      mode,
		Listen:    []string{"tcp://127.0.0.1:0"},
		Upstream:  proxy.UpstreamOptions{URL: upstream, ClientID: clientID, MaxReconnectInterval: 200 * time.Millisecond},
		Rules:     rules,
		Keys:      ring,
		DataDir:   dir,
		Queue:     queue.Options{Sync: queue.SyncBatch},
		NoKeyWait: 5 * time.Second,
		Logger:    log,
	})
	if err != nil {
		return nil, "", err
	}
	if err := sc.Start(); err != nil {
		return sc, "", err
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = sc.WaitConnected(wctx)
	cancel()
	if err != nil {
		return sc, "", fmt.Errorf("connect %s: %w", upstream, err)
	}
	return sc, "tcp://" + sc.Addrs()[0].String(), nil
}

// probe publishes on the probe topic until every subscriber has one: then
// the whole path, subscriptions mirrored upstream and bridges included, is
// in place.
func (s *scenario) probe(ctx context.Context) error {
	deadline := time.Now().Add(15 * time.Second)
	for {
		all := true
		for _, sub := range s.subs {
			all = all && sub.probed()
		}
		if all {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no probe message reached the subscribers through %s within 15s", s.pubURL)
		}
		tok := s.pubs[0].Publish(s.prefix+"/probe", 1, false, []byte("probe"))
		select {
		case <-tok.Done():
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Second):
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (s *scenario) measure(ctx context.Context) Result {
	o := s.o
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	cpu0 := processCPU()
	sent := make([]int, len(s.pubs))
	var wg sync.WaitGroup
	for i, c := range s.pubs {
		wg.Go(func() { sent[i] = publish(ctx, c, i, s.prefix, o) })
	}
	pubDone := make(chan struct{})
	go func() { wg.Wait(); close(pubDone) }()

	expected := o.Publishers * spreadShare(o.Messages, o.Spread)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	lastProgress := time.Now()
	published := false
	var publishedAt time.Time
	timedOut := false
loop:
	for {
		select {
		case <-ctx.Done():
			timedOut = true
			break loop
		case <-pubDone:
			published, publishedAt = true, time.Now()
			pubDone = nil
			total := 0
			for _, n := range sent {
				total += n
			}
			expected = spreadShare(total, o.Spread)
		case <-tick.C:
		}
		complete, last := true, publishedAt
		got := 0
		for _, sub := range s.subs {
			n, l := sub.progress()
			got += n
			complete = complete && n >= expected
			if l.After(last) {
				last = l
			}
		}
		if published && (complete || time.Since(last) > o.Idle) {
			break loop
		}
		if o.Progress != nil && time.Since(lastProgress) >= time.Second {
			lastProgress = time.Now()
			fmt.Fprintf(o.Progress, "bench %s: received %d of %d\n", o.Name, got, o.Publishers*spreadShare(o.Messages, o.Spread)*o.Subscribers)
		}
	}
	cancel()
	wg.Wait()
	cpu := processCPU() - cpu0

	r := Result{Name: o.Name, Topology: o.Topology, QoS: o.QoS, Size: o.Size, TimedOut: timedOut, CPUSeconds: cpu}
	for _, n := range sent {
		r.Sent += n
	}
	var lat []time.Duration
	var first, last time.Time
	for _, sub := range s.subs {
		t := sub.stop()
		r.Received += t.received
		r.Dup += t.dup
		r.OOO += t.ooo
		lat = append(lat, t.lat...)
		if !t.first.IsZero() && (first.IsZero() || t.first.Before(first)) {
			first = t.first
		}
		if t.last.After(last) {
			last = t.last
		}
	}
	r.Lost = max(spreadShare(r.Sent, o.Spread)*o.Subscribers-r.Received, 0)
	if d := last.Sub(first).Seconds(); r.Received > 1 && d > 0 {
		r.MsgsPerS = float64(r.Received-1) / d
		r.DurationS = d
	}
	slices.Sort(lat)
	r.P50us, r.P90us, r.P99us = micros(percentile(lat, 0.50)), micros(percentile(lat, 0.90)), micros(percentile(lat, 0.99))
	if len(lat) > 0 {
		r.MaxUs = micros(lat[len(lat)-1])
	}
	if r.Received > 0 {
		r.CPUSPer1k = cpu / float64(r.Received) * 1000
	}
	r.RSSMiB = rssMiB()
	return r
}

func (s *scenario) close() {
	for _, c := range s.pubs {
		c.Disconnect(50)
	}
	for _, sub := range s.subs {
		sub.client.Disconnect(50)
	}
	for _, sc := range s.sidecars {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		sc.Close(ctx)
		cancel()
	}
	if s.tmp != "" {
		os.RemoveAll(s.tmp)
	}
}

// publish sends o.Messages messages and returns how many the client
// library accepted (for QoS 1/2: acknowledged). At most o.Window publishes
// are outstanding: when the window is full it waits for the oldest.
func publish(ctx context.Context, c paho.Client, id int, prefix string, o Options) int {
	topic := fmt.Sprintf("%s/p%d", prefix, id)
	topics := []string{topic}
	if o.Spread > 1 {
		topics = make([]string, o.Spread)
		for i := range topics {
			topics[i] = fmt.Sprintf("%s/%d", topic, i)
		}
	}
	window := make([]paho.Token, o.Window) // a ring: the oldest at seq % len
	sent := 0
	wait := func(t paho.Token) bool {
		if t == nil {
			return true
		}
		select {
		case <-t.Done():
			if t.Error() == nil {
				sent++
			}
			return true
		case <-ctx.Done():
			return false
		}
	}
	start := time.Now()
	for seq := range o.Messages {
		if o.Rate > 0 {
			due := start.Add(time.Duration(float64(seq) / o.Rate * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return sent
				}
			}
		}
		slot := &window[seq%len(window)]
		if !wait(*slot) || ctx.Err() != nil {
			return sent
		}
		*slot = c.Publish(topics[seq%len(topics)], o.QoS, false, payload(id, uint64(seq), o.Size))
	}
	for i := range len(window) {
		if !wait(window[(o.Messages+i)%len(window)]) {
			break
		}
	}
	return sent
}

// clock is this process's time origin; payloads carry time.Since(clock),
// which is monotonic.
var clock = time.Now()

func payload(pub int, seq uint64, size int) []byte {
	p := make([]byte, size)
	binary.BigEndian.PutUint32(p[0:4], uint32(pub))
	binary.BigEndian.PutUint64(p[4:12], seq)
	binary.BigEndian.PutUint64(p[12:20], uint64(time.Since(clock)))
	return p
}

// spreadShare is how many of n messages spread over spread topics a
// subscriber to one of them gets (sequence numbers 0, spread, 2·spread …).
// With several publishers it is exact per publisher; summed it is close.
func spreadShare(n, spread int) int { return (n + spread - 1) / spread }

// tally is what one subscriber saw.
type tally struct {
	received, dup, ooo int
	lat                []time.Duration
	first, last        time.Time
	probe              bool
	seen               [][]uint64 // per publisher: bitmap of sequence numbers
	high               []uint64   // per publisher: highest sequence seen + 1
	stopped            bool
}

type subscriber struct {
	client paho.Client
	mu     sync.Mutex
	t      tally
}

func newSubscriber(url, id, prefix string, o Options) (*subscriber, error) {
	s := &subscriber{}
	s.t.seen = make([][]uint64, o.Publishers)
	for i := range s.t.seen {
		s.t.seen[i] = make([]uint64, (o.Messages+63)/64)
	}
	s.t.high = make([]uint64, o.Publishers)
	s.t.lat = make([]time.Duration, 0, o.Messages*o.Publishers)
	probeTopic := prefix + "/probe"
	c, err := connect(url, id, !o.KeepSession, func(_ paho.Client, m paho.Message) {
		if m.Topic() == probeTopic {
			s.mu.Lock()
			s.t.probe = true
			s.mu.Unlock()
			return
		}
		s.add(m.Payload())
	})
	if err != nil {
		return nil, err
	}
	s.client = c
	filters := map[string]byte{prefix + "/#": o.QoS}
	if o.Spread > 1 {
		// One topic of each publisher's spread, and the probe.
		filters = map[string]byte{prefix + "/+/0": o.QoS, probeTopic: o.QoS}
	}
	tok := c.SubscribeMultiple(filters, nil)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		c.Disconnect(0)
		return nil, fmt.Errorf("subscribe %v at %s: %v", slices.Collect(maps.Keys(filters)), url, tok.Error())
	}
	return s, nil
}

func (s *subscriber) add(p []byte) {
	now := time.Now()
	lat := time.Since(clock)
	if len(p) < HeaderLen {
		return
	}
	pub := binary.BigEndian.Uint32(p[0:4])
	seq := binary.BigEndian.Uint64(p[4:12])
	lat -= time.Duration(binary.BigEndian.Uint64(p[12:20]))
	s.mu.Lock()
	defer s.mu.Unlock()
	t := &s.t
	if t.stopped || int(pub) >= len(t.seen) || seq/64 >= uint64(len(t.seen[pub])) {
		return
	}
	word, bit := &t.seen[pub][seq/64], uint64(1)<<(seq%64)
	if *word&bit != 0 {
		t.dup++
		return
	}
	*word |= bit
	t.received++
	if seq+1 < t.high[pub] {
		t.ooo++
	} else {
		t.high[pub] = seq + 1
	}
	t.lat = append(t.lat, lat)
	if t.first.IsZero() {
		t.first = now
	}
	t.last = now
}

func (s *subscriber) probed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.probe
}

func (s *subscriber) progress() (int, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.received, s.t.last
}

// stop freezes the tally: later deliveries are not counted.
func (s *subscriber) stop() tally {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.t.stopped = true
	return s.t
}

func connect(url, id string, clean bool, onMessage paho.MessageHandler) (paho.Client, error) {
	opts := paho.NewClientOptions().
		AddBroker(url).
		SetClientID(id).
		SetCleanSession(clean).
		SetAutoReconnect(false).
		SetOrderMatters(true).
		SetKeepAlive(30 * time.Second).
		SetConnectTimeout(5 * time.Second).
		SetMessageChannelDepth(10000)
	if bufferedScheme(url) {
		opts.SetCustomOpenConnectionFn(dialApp)
	}
	if onMessage != nil {
		opts.SetDefaultPublishHandler(onMessage)
	}
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return nil, fmt.Errorf("connect %s as %s: %v", url, id, tok.Error())
	}
	return c, nil
}

func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func micros(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// processCPU is the user and system CPU time of this process, in seconds.
func processCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

// rssMiB is this process's resident set size (VmRSS), in MiB; 0 where
// /proc is not there.
func rssMiB() float64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := bytes.CutPrefix(sc.Bytes(), []byte("VmRSS:"))
		if !ok {
			continue
		}
		fields := strings.Fields(string(rest))
		if len(fields) >= 1 {
			kb, err := strconv.ParseFloat(fields[0], 64)
			if err == nil {
				return kb / 1024
			}
		}
	}
	return 0
}
