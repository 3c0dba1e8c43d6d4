package proxy

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/proxy/queue"
)

// Keys is the sidecar's view of its key ring (package keyclient).
type Keys interface {
	// Sealer returns the sealer for a group's current sending epoch, or an
	// error when there is none (the message is then not sent at all).
	Sealer(group string) (*envelope.Sealer, error)
	envelope.KeyLookup

	// Sender authentication (senderauth.go): whether a group's envelopes
	// carry proofs, what signs this process's, whether any group needs
	// them, and the key that signs for each sender (the group's roster).
	SenderAuth(group string) bool
	ProofSigner(group string) (envelope.ProofSigner, error)
	AnySenderAuth() bool
	envelope.SenderKeys
}

// Mode is how a sidecar relays its apps to upstream.
type Mode string

const (
	// ModeSession gives every local app connection its own upstream
	// session (same client id, protocol version, Will, credentials):
	// sessions, acknowledgements and MQTT 5 features are the broker's.
	ModeSession Mode = "session"
	// ModeBridge relays every app over one shared upstream connection,
	// with a local broker and a durable store-and-forward queue.
	ModeBridge Mode = "bridge"
)

// Options configure a Sidecar.
type Options struct {
	// Mode selects the relay (ModeBridge when empty, for now).
	Mode      Mode
	Listen    []string    // tcp://host:port, ssl://host:port, ws://host:port, wss://host:port, unix:///path
	ListenTLS *tls.Config // for ssl:// and wss:// listeners
	Users     map[string]string
	Upstream  UpstreamOptions
	Rules     []Rule
	Deny      bool // unmatched: deny
	Keys      Keys
	DataDir   string
	Queue     queue.Options // Dir defaults to DataDir/queue
	Logger    *slog.Logger
	Registry  prometheus.Registerer // nil: metrics are kept but not registered
	// NoKeyWait is how long a QoS 1/2 publish on a protected topic may wait
	// for a key (a join in progress) before it is refused; 0 refuses at once.
	NoKeyWait time.Duration

	// Session mode: ClientIDPrefix is put before every app's client id
	// upstream; UpstreamCredentials maps a local username (Users) to the
	// credentials its sessions log in upstream with (else the app's own).
	ClientIDPrefix      string
	UpstreamCredentials map[string]Credentials
}

// Sidecar is one running sidecar.
type Sidecar struct {
	opts   Options
	log    *slog.Logger
	policy *Policy
	deny   atomic.Bool
	keys   Keys
	opener *envelope.Opener
	proofs *envelope.ProofChecker
	server *mqtt.Server // bridge mode
	bridge *bridge      // bridge mode
	relay  *relay       // session mode
	queue  *queue.Queue
	state  *replayState
	kept   *keptSessions // state's: the local persistent sessions (keptsessions.go)
	mirror *mirror
	direct directClients // deliver.go
	wills  *delayedWills

	pendingRetained pendingRetained
	wantsRetained   sync.Map // subKey -> the Retain Handling a SUBSCRIBE asked for

	// exclude holds, while the inbound worker delivers a live message on
	// excludeTopic, the local clients that already had it as a retained
	// message; the ACL hook keeps it from them.
	excludeMu    sync.Mutex
	exclude      map[string]bool
	excludeTopic string
	subscribing  sync.Map // client id -> true between OnSubscribe and OnSubscribed
	metrics      *Metrics
	inbound      chan paho.Message
	commitReq    chan chan error // to the inbound worker: write what is pending, and say when it is written
	addrs        []net.Addr

	mOutProtected, mOutPlain, mInProtected, mInPlain prometheus.Counter

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	warnMu   sync.Mutex
	warnLast map[string]time.Time

	closeOnce sync.Once
	closeErr  error
}

// New prepares a sidecar: it opens the data directory and the local
// listeners, but connects nowhere until Start.
func New(opts Options) (*Sidecar, error) {
	if opts.Keys == nil {
		return nil, errors.New("proxy: no key ring")
	}
	if opts.DataDir == "" {
		return nil, errors.New("proxy: no data directory")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	policy, err := NewPolicy(opts.Rules)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("proxy: data directory: %w", err)
	}
	switch opts.Mode {
	case "":
		opts.Mode = ModeSession
	case ModeBridge, ModeSession:
	default:
		return nil, fmt.Errorf("proxy: unknown mode %q (want session or bridge)", opts.Mode)
	}
	qo := opts.Queue
	if qo.Dir == "" {
		qo.Dir = filepath.Join(opts.DataDir, "queue")
	}
	qo.WriteBehind = true // acknowledgements to apps wait for it (holdAcks)
	q, err := queue.Open(qo)
	if err != nil {
		return nil, fmt.Errorf("proxy: outbound queue: %w", err)
	}
	if opts.Mode == ModeSession && q.Len() > 0 {
		n := q.Len()
		q.Close()
		return nil, fmt.Errorf("proxy: %s holds %d messages queued in bridge mode and not sent yet; run once more with sidecar.mode: bridge until they are sent", qo.Dir, n)
	}
	st, err := openReplayState(opts.DataDir, qo.Sync)
	if err != nil {
		q.Close()
		return nil, err
	}
	if st.torn > 0 {
		log.Warn("the inbound state log ended in an incomplete or damaged frame (a crash mid-write, or a damaged disk); cut off there", "file", filepath.Join(opts.DataDir, inboundLogName), "bytes", st.torn)
	}
	if n := st.kept.messagesHeld(); opts.Mode == ModeSession && n > 0 {
		st.close()
		q.Close()
		return nil, fmt.Errorf("proxy: %s holds %d messages that bridge mode keeps for apps with persistent sessions, not delivered yet; run once more with sidecar.mode: bridge until the apps have them", filepath.Join(opts.DataDir, inboundLogName), n)
	}
	sc := &Sidecar{
		opts:      opts,
		log:       log,
		policy:    policy,
		keys:      opts.Keys,
		opener:    envelope.NewOpener(opts.Keys, 4096),
		proofs:    envelope.NewProofChecker(opts.Keys, 0),
		queue:     q,
		state:     st,
		kept:      st.kept,
		mirror:    newMirror(),
		inbound:   make(chan paho.Message, 4096),
		commitReq: make(chan chan error),
		warnLast:  make(map[string]time.Time),
	}
	sc.deny.Store(opts.Deny)
	sc.ctx, sc.cancel = context.WithCancel(context.Background())
	sc.wills = newDelayedWills(sc.relayWill)
	sc.metrics = newMetrics(opts.Registry, func() float64 { return float64(q.Len()) })
	sc.mOutProtected = sc.metrics.Messages.WithLabelValues("out", "protected")
	sc.mOutPlain = sc.metrics.Messages.WithLabelValues("out", "plain")
	sc.mInProtected = sc.metrics.Messages.WithLabelValues("in", "protected")
	sc.mInPlain = sc.metrics.Messages.WithLabelValues("in", "plain")

	if opts.Mode == ModeSession {
		var lns []net.Listener
		for i, l := range opts.Listen {
			ln, err := listenNet(i, l, opts.ListenTLS)
			if err != nil {
				for _, ln := range lns {
					ln.Close()
				}
				sc.closeStores()
				return nil, err
			}
			lns = append(lns, ln)
			sc.addrs = append(sc.addrs, ln.Addr())
		}
		if sc.relay, err = newRelay(sc, lns); err != nil {
			for _, ln := range lns {
				ln.Close()
			}
			sc.closeStores()
			return nil, err
		}
		return sc, nil
	}

	sc.server = mqtt.New(&mqtt.Options{
		InlineClient: true,
		Logger:       slog.New(levelFilter{log.Handler(), slog.LevelWarn}),
		Capabilities: localCapabilities(),
	})
	if err := sc.server.AddHook(&hook{sc: sc}, nil); err != nil {
		sc.closeStores()
		return nil, fmt.Errorf("proxy: local broker hook: %w", err)
	}
	for i, l := range opts.Listen {
		ln, addr, err := listen(i, l, opts.ListenTLS)
		if err == nil {
			if err = sc.server.AddListener(ln); err != nil {
				ln.Close(func(string) {})
				err = fmt.Errorf("proxy: listen[%d] %s: %w", i, l, err)
			}
		}
		if err != nil {
			sc.server.Listeners.CloseAll(func(string) {}) // the listeners opened before it
			sc.closeStores()
			return nil, err
		}
		sc.addrs = append(sc.addrs, addr)
	}
	sc.bridge = newBridge(opts.Upstream, log, sc.onUpstreamAck, sc.onUpstreamConnect, sc.onUpstreamLost, sc.onUpstreamMessage)
	return sc, nil
}

// localCapabilities sizes the local broker so that it applies backpressure
// rather than dropping: mochi's defaults drop QoS ≥ 1 messages once 8192 are
// in flight or pending for one client.
//
// Pending writes: mochi gives every connection a queue of this many
// packets, allocated when it connects (8 bytes a slot), and drops (counted
// as local_write_full) what does not fit. A subscriber that stops keeping
// up does not fill it: mochi holds the client's lock while a write to it
// waits, so delivery to everyone waits with it (backpressure), until
// localWriteTimeout cuts a connection that takes no byte. The queue fills
// in the burst that follows such a wait: a fast reader on a loaded test
// machine was measured at up to about 9,000 packets behind, and lost
// messages with 1,024 slots. 16,384 keeps twice that margin at a quarter of
// the memory of 65,536 (128 KiB a connection).
func localCapabilities() *mqtt.Capabilities {
	c := mqtt.NewDefaultServerCapabilities()
	c.MaximumInflight = 65535
	c.MaximumClientWritesPending = 16384
	c.ReceiveMaximum = 1024
	c.MaximumSessionExpiryInterval = 24 * 60 * 60
	return c
}

func listen(i int, raw string, tlsConf *tls.Config) (listeners.Listener, net.Addr, error) {
	nl, err := listenNet(i, raw, tlsConf)
	if err != nil {
		return nil, nil, err
	}
	// Every listener hands the local broker batched connections with a
	// write timeout (batchedListener): one application that stops reading
	// is cut off, whichever way it connected.
	return listeners.NewNet(fmt.Sprintf("listen-%d", i), batchedListener{nl}), nl.Addr(), nil
}

// listenNet opens one local listener: TCP, TLS, WebSocket (over TCP or
// TLS), or a Unix socket.
func listenNet(i int, raw string, tlsConf *tls.Config) (net.Listener, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("proxy: listen[%d] %q: %w", i, raw, err)
	}
	switch u.Scheme {
	case "tcp", "mqtt", "ssl", "tls", "mqtts", "ws", "wss":
		nl, err := net.Listen("tcp", u.Host)
		if err != nil {
			return nil, fmt.Errorf("proxy: listen[%d] %s: %w", i, raw, err)
		}
		switch u.Scheme {
		case "ssl", "tls", "mqtts", "wss":
			if tlsConf == nil {
				nl.Close()
				return nil, fmt.Errorf("proxy: listen[%d] %s: TLS listener without a certificate (sidecar.listen_tls)", i, raw)
			}
			nl = tls.NewListener(nl, tlsConf)
		}
		if u.Scheme == "ws" || u.Scheme == "wss" {
			nl = newWSListener(nl)
		}
		return nl, nil
	case "unix":
		path := u.Path
		if path == "" {
			path = u.Opaque
		}
		// A socket file left by an earlier run that did not stop cleanly
		// is removed; any other file is left alone and listening fails.
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			_ = os.Remove(path)
		}
		nl, err := net.Listen("unix", path)
		if err != nil {
			return nil, fmt.Errorf("proxy: listen[%d] %s: %w", i, raw, err)
		}
		return nl, nil
	}
	return nil, fmt.Errorf("proxy: listen[%d] %q: unsupported scheme %q (want tcp, ssl, ws, wss or unix)", i, raw, u.Scheme)
}

// Start serves local clients, connects upstream (retrying in the
// background) and starts the outbound sender and inbound worker. The local
// persistent sessions kept from an earlier run are loaded first, and their
// subscriptions mirrored upstream once it is connected.
func (sc *Sidecar) Start() error {
	if sc.relay != nil {
		sc.relay.start()
		return nil
	}
	if err := sc.server.Serve(); err != nil {
		return fmt.Errorf("proxy: local broker: %w", err)
	}
	if n := sc.kept.count.Load(); n > 0 {
		sc.log.Info("local persistent sessions restored", "sessions", n, "messages", sc.kept.messagesHeld(), "file", filepath.Join(sc.opts.DataDir, inboundLogName))
	}
	sc.wg.Add(2)
	go func() { defer sc.wg.Done(); sc.runSender(sc.ctx) }()
	go func() { defer sc.wg.Done(); sc.runInbound(sc.ctx) }()
	sc.bridge.connect()
	return nil
}

// Addrs are the local listeners' addresses, in the order of Options.Listen.
func (sc *Sidecar) Addrs() []net.Addr { return sc.addrs }

// Connected reports whether the upstream connection is up (session mode:
// whether upstream is reachable).
func (sc *Sidecar) Connected() bool {
	if sc.relay != nil {
		return sc.relay.connected()
	}
	return sc.bridge.connected()
}

// Mode is the relay the sidecar runs.
func (sc *Sidecar) Mode() Mode { return sc.opts.Mode }

// WaitConnected waits until upstream is connected (session mode:
// reachable).
func (sc *Sidecar) WaitConnected(ctx context.Context) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for !sc.Connected() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("upstream %s not connected: %w", sc.opts.Upstream.URL, ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// Metrics exposes the sidecar's counters.
func (sc *Sidecar) Metrics() *Metrics { return sc.metrics }

// QueueLen is the number of QoS 1/2 messages not yet acknowledged upstream.
func (sc *Sidecar) QueueLen() int { return sc.queue.Len() }

// MirroredFilters lists the filters subscribed upstream.
func (sc *Sidecar) MirroredFilters() []string {
	var out []string
	for _, c := range sc.mirror.all() {
		out = append(out, c.filter)
	}
	return out
}

// Close stops the sidecar: local clients are disconnected, the outbound
// queue is given up to drain (bounded by ctx), and the stores are closed.
// Whatever is still queued is sent after the next start.
func (sc *Sidecar) Close(ctx context.Context) error {
	sc.closeOnce.Do(func() {
		if sc.relay != nil {
			sc.relay.close()
			sc.cancel()
			sc.closeErr = sc.closeStores()
			return
		}
		sc.closeLocalBroker() // no new local publishes
		sc.wills.close()      // the local sessions ended: held Wills go now
		t := time.NewTicker(10 * time.Millisecond)
	drain:
		for sc.queue.Len() > 0 && sc.bridge.connected() {
			select {
			case <-ctx.Done():
				break drain
			case <-t.C:
			}
		}
		t.Stop()
		sc.cancel()
		sc.bridge.disconnect(100 * time.Millisecond)
		sc.wg.Wait()
		sc.closeErr = sc.closeStores()
	})
	return sc.closeErr
}

// closeLocalBroker closes the local broker, bounded: mochi 2.7.9's Close
// can deadlock when a client disconnects at that very moment (a recursive
// read lock in Clients.GetByListener meets the disconnecting client's write
// lock). The broker is going away either way; a stuck close must not keep
// the sidecar from draining its queue and closing its stores.
func (sc *Sidecar) closeLocalBroker() {
	done := make(chan struct{})
	go func() {
		_ = sc.server.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		sc.log.Warn("the local broker did not close within 2 s; going on")
	}
}

func (sc *Sidecar) closeStores() error {
	err := sc.queue.Close()
	if e := sc.state.close(); err == nil {
		err = e
	}
	return err
}

func (sc *Sidecar) onUpstreamConnect() {
	sc.metrics.Connected.Set(1)
	sc.metrics.Reconnects.Inc()
	sc.log.Info("upstream connected", "url", sc.opts.Upstream.URL, "filters", sc.mirror.len())
	go func() {
		for _, c := range sc.mirror.all() {
			// A filter that fails is tried again while the connection
			// lasts: a lost subscription would lose messages silently.
			for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 2*time.Second) {
				err := sc.bridge.subscribe(c.filter, c.qos)
				if err == nil || !sc.bridge.connected() || sc.ctx.Err() != nil {
					break
				}
				sc.log.Warn("re-subscribing upstream failed; retrying", "filter", c.filter, "error", err)
				select {
				case <-time.After(backoff):
				case <-sc.ctx.Done():
					return
				}
			}
		}
	}()
}

func (sc *Sidecar) onUpstreamLost(err error) {
	sc.metrics.Connected.Set(0)
	sc.log.Warn("upstream connection lost; reconnecting", "url", sc.opts.Upstream.URL, "error", err)
}

func (sc *Sidecar) mirrorAdd(client, filter string, qos byte) {
	if c, ok := sc.mirrorTrack(client, filter, qos); ok {
		sc.subscribeUpstream([]change{c})
	}
}

// mirrorTrack records a local subscription in the mirror and says what to
// subscribe upstream, if anything.
func (sc *Sidecar) mirrorTrack(client, filter string, qos byte) (change, bool) {
	sc.direct.subscriptionsChanged() // deliver.go
	c, changed := sc.mirror.add(client, filter, qos)
	sc.metrics.Subscribed.Set(float64(sc.mirror.len()))
	if !changed {
		if isShared(filter) {
			return change{}, false
		}
		// Subscribe again anyway: upstream then re-sends the filter's
		// retained messages for this new local subscription.
		c = sc.mirror.get(filter)
	}
	return c, true
}

// subscribeUpstream subscribes the filters upstream, all at once, and
// waits for every SUBACK: the local SUBACK then follows the upstream ones,
// so an application that subscribes and then expects messages published
// afterwards by others gets them. (One round trip per SUBSCRIBE packet, not
// per filter.)
func (sc *Sidecar) subscribeUpstream(subs []change) {
	var wg sync.WaitGroup
	for _, c := range subs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := sc.bridge.subscribe(c.filter, c.qos); err != nil {
				sc.log.Warn("subscribing upstream failed; will retry on reconnect", "filter", c.filter, "error", err)
			}
		}()
	}
	wg.Wait()
}

func (sc *Sidecar) mirrorRemove(client, filter string) {
	sc.direct.subscriptionsChanged() // deliver.go
	c, ok := sc.mirror.remove(client, filter)
	sc.metrics.Subscribed.Set(float64(sc.mirror.len()))
	if !ok {
		return
	}
	go func() {
		if err := sc.bridge.unsubscribe(c.filter); err != nil {
			sc.log.Debug("unsubscribing upstream failed", "filter", filter, "error", err)
		}
	}()
}

// limitedWarn logs a security or loss event at WARN at most once a second
// per kind, so a flood cannot fill a disk; the counters count every one.
func (sc *Sidecar) limitedWarn(kind, msg string, args ...any) {
	now := time.Now()
	sc.warnMu.Lock()
	last := sc.warnLast[kind]
	ok := now.Sub(last) >= time.Second
	if ok {
		sc.warnLast[kind] = now
	}
	sc.warnMu.Unlock()
	if ok {
		sc.log.Warn(msg, args...)
	}
}

func constantTimeEqual(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// levelFilter passes only records at or above min (mochi logs chatty INFO).
type levelFilter struct {
	slog.Handler
	min slog.Level
}

func (l levelFilter) Enabled(ctx context.Context, lv slog.Level) bool {
	return lv >= l.min && l.Handler.Enabled(ctx, lv)
}

// SetRules replaces the local protect rules and the unmatched policy
// without dropping any connection (SIGHUP). Keys for new groups must be in
// the key ring already.
func (sc *Sidecar) SetRules(rules []Rule, deny bool) error {
	for _, r := range rules {
		if _, err := sc.keys.Sealer(r.Group); err != nil && sc.opts.NoKeyWait == 0 {
			return fmt.Errorf("proxy: protect rule for group %q: %w", r.Group, err)
		}
	}
	if err := sc.policy.SetLocalRules(rules); err != nil {
		return err
	}
	sc.deny.Store(deny)
	return nil
}

// SetServerPolicy installs the key server's signed topic policy (see
// Policy.SetServerPolicy).
func (sc *Sidecar) SetServerPolicy(rules []Rule) error { return sc.policy.SetServerPolicy(rules) }
