package keyserver

// Several key servers on one etcd prefix (docs/RELIABILITY.md, "Key server
// high availability"). Each campaigns in an etcd election on a lease of
// LeaseTTL; the winner begins a term: it loads the whole state from etcd,
// connects to the broker (under the shared client id, which takes over the
// broker session of any earlier leader still connected) and serves; the
// others wait in the election, connected to etcd only. A term ends when
// the lease lapses (the session ends), when a commit fails (the guard
// refused it: another key server leads; or etcd did not answer in time:
// the outcome is unknown), or when a publish finds the lease possibly
// lapsed (the process was paused). The server then stops at once (timers,
// heartbeats, MQTT), gives its lease up, and the process campaigns again
// with a fresh session, as a standby.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

// errLeaseLapsed: the lease was last renewed too long ago to be sure it is
// still held (the process was paused, or etcd unreachable).
var errLeaseLapsed = errors.New("keyserver: the leader's lease may have lapsed (not renewed in time)")

// term is one leadership term: what its server needs to know whether it
// still leads.
type term struct {
	lost chan error // the term ends: the first reason

	mu         sync.Mutex
	validUntil time.Time // the lease is surely held until then
	check      func() error
}

func (t *term) end(err error) {
	select {
	case t.lost <- err:
	default:
	}
}

func (t *term) leaseValid() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return time.Now().Before(t.validUntil)
}

// renewed records a renewal of the lease sent at sent for ttl: etcd
// extended it after sent, so it holds at least until sent + ttl (less a
// margin for clock rate differences).
func (t *term) renewed(sent time.Time, ttl time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if u := sent.Add(ttl - ttl/5); u.After(t.validUntil) {
		t.validUntil = u
	}
}

// HA is a key server that is one of several on an etcd prefix: a standby,
// or the leader serving.
type HA struct {
	cli  *clientv3.Client
	etcd EtcdOptions
	m    *metrics
	log  *slog.Logger
	name string // this instance in the election: host/pid

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	opts   Options
	srv    *Server // while leading
	leader string  // the leader's name, as last observed
}

// NewHA connects to etcd; Start campaigns.
func NewHA(opts Options) (*HA, error) {
	if opts.Identity == nil {
		return nil, errors.New("keyserver: no identity")
	}
	if opts.Etcd == nil || len(opts.Etcd.Endpoints) == 0 {
		return nil, errors.New("keyserver: store.etcd.endpoints: none")
	}
	eo := *opts.Etcd
	eo.setDefaults()
	opts.Etcd = &eo
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: eo.Endpoints, DialTimeout: eo.DialTimeout, TLS: eo.TLS,
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("keyserver: store.etcd: %w", err)
	}
	host, _ := os.Hostname()
	h := &HA{
		cli: cli, etcd: eo, m: newMetrics(opts.Registry), log: opts.Logger, opts: opts,
		name: fmt.Sprintf("%s/%d", host, os.Getpid()),
		done: make(chan struct{}),
	}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	return h, nil
}

// Start begins campaigning in the background.
func (h *HA) Start() error {
	go h.run()
	return nil
}

// Close ends the term if leading (giving the lead up at once, so that a
// standby takes over without waiting for the lease) and stops campaigning.
func (h *HA) Close() error {
	h.cancel()
	<-h.done
	return h.cli.Close()
}

// Reload applies a new configuration: at once if leading (Server.Reload),
// else from the next term on.
func (h *HA) Reload(opts Options) error {
	h.mu.Lock()
	opts.Identity, opts.Upstream, opts.Etcd, opts.Logger, opts.Registry = h.opts.Identity, h.opts.Upstream, h.opts.Etcd, h.opts.Logger, h.opts.Registry
	srv := h.srv
	h.mu.Unlock()
	if srv != nil {
		if err := srv.Reload(opts); err != nil {
			return err
		}
	}
	h.mu.Lock()
	h.opts.Members, h.opts.Groups = opts.Members, opts.Groups
	h.mu.Unlock()
	return nil
}

// Leading reports whether this key server leads now.
func (h *HA) Leading() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.srv != nil
}

// Health says what this key server is doing: an error if it leads but is
// not connected to the broker, else a line for /healthz.
func (h *HA) Health() (string, error) {
	h.mu.Lock()
	srv, leader := h.srv, h.leader
	h.mu.Unlock()
	if srv == nil {
		if leader == "" {
			leader = "none yet"
		}
		return "ok: standby (leader: " + leader + ")", nil
	}
	if !srv.Connected() {
		return "", errors.New("leader, but the upstream broker is not connected")
	}
	return "ok: leader", nil
}

// Server returns the serving server while leading, else nil.
func (h *HA) Server() *Server {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.srv
}

func (h *HA) run() {
	defer close(h.done)
	ttl := int(h.etcd.LeaseTTL.Round(time.Second) / time.Second)
	for h.ctx.Err() == nil {
		sess, err := concurrency.NewSession(h.cli, concurrency.WithTTL(ttl), concurrency.WithContext(h.ctx))
		if err != nil {
			h.log.Warn("etcd: no session; retrying", "error", err)
			h.sleep(time.Second)
			continue
		}
		el := concurrency.NewElection(sess, h.etcd.Prefix+"election")
		watch, stopWatch := context.WithCancel(h.ctx)
		go h.observe(watch, el)
		err = el.Campaign(h.ctx, h.name)
		stopWatch()
		if err != nil {
			sess.Close()
			continue
		}
		h.lead(sess, el)
		sess.Close() // gives the lease up: the next leader need not wait for it
	}
}

// observe logs every change of leader while standing by.
func (h *HA) observe(ctx context.Context, el *concurrency.Election) {
	for resp := range el.Observe(ctx) {
		if len(resp.Kvs) == 0 {
			continue
		}
		name := string(resp.Kvs[0].Value)
		h.mu.Lock()
		changed := name != h.leader
		h.leader = name
		h.mu.Unlock()
		if changed && name != h.name {
			h.log.Info("key server leader changed; standing by", "leader", name, "self", h.name)
		}
	}
}

// lead serves one term.
func (h *HA) lead(sess *concurrency.Session, el *concurrency.Election) {
	guard := clientv3.Compare(clientv3.CreateRevision(el.Key()), "=", el.Rev())
	t := &term{lost: make(chan error, 1)}
	t.check = func() error {
		ctx, cancel := context.WithTimeout(h.ctx, h.etcd.Timeout)
		defer cancel()
		resp, err := h.cli.Txn(ctx).If(guard).Commit()
		if err != nil {
			return err
		}
		if !resp.Succeeded {
			return errNotLeader
		}
		return nil
	}
	termCtx, endTerm := context.WithCancel(h.ctx)
	defer endTerm()
	if err := h.renew(termCtx, t, sess.Lease()); err != nil {
		h.log.Warn("won the election but could not renew the lease; campaigning again", "error", err)
		return
	}
	go func() {
		tick := time.NewTicker(h.etcd.LeaseTTL / 4)
		defer tick.Stop()
		for {
			select {
			case <-termCtx.Done():
				return
			case <-tick.C:
			}
			if err := h.renew(termCtx, t, sess.Lease()); err != nil && termCtx.Err() == nil {
				h.log.Warn("renewing the leader's lease failed", "error", err)
			}
		}
	}()

	ctx, cancel := context.WithTimeout(h.ctx, h.etcd.Timeout)
	prior, err := h.cli.Get(ctx, h.etcd.Prefix+"group/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	cancel()
	if err != nil {
		h.log.Warn("won the election but etcd did not answer; campaigning again", "error", err)
		return
	}
	st, err := newEtcdStore(h.cli, h.opts.Identity, h.etcd.Prefix, h.etcd.Timeout, guard)
	if err != nil {
		h.log.Error("etcd store", "error", err)
		return
	}
	h.mu.Lock()
	opts := h.opts
	h.mu.Unlock()
	start := time.Now()
	srv, err := newServer(opts, st, h.m, t)
	if err != nil {
		h.log.Error("won the election but could not load the state; giving the lead up", "error", err)
		h.sleep(time.Second)
		return
	}
	if err := srv.Start(); err != nil {
		srv.Close()
		return
	}
	h.mu.Lock()
	h.srv, h.leader = srv, h.name
	h.mu.Unlock()
	h.m.leader.Set(1)
	if prior.Count > 0 {
		h.m.failovers.Inc()
	}
	h.log.Info("key server leader: this instance leads", "self", h.name, "groups", len(opts.Groups), "load", time.Since(start).Round(time.Millisecond))

	var why error
	select {
	case <-sess.Done():
		why = errors.New("the lease lapsed")
	case why = <-t.lost:
	case <-h.ctx.Done():
		why = errors.New("shutting down")
	}
	srv.mu.Lock()
	srv.fenced = true // from here on nothing leaves it, even before Close
	srv.mu.Unlock()
	h.m.leader.Set(0)
	h.mu.Lock()
	h.srv = nil
	h.mu.Unlock()
	srv.Close()
	if h.ctx.Err() == nil {
		h.log.Warn("key server leader: this instance no longer leads; standing by", "self", h.name, "reason", why)
	} else {
		rctx, cancel := context.WithTimeout(context.Background(), time.Second)
		el.Resign(rctx)
		cancel()
	}
}

// renew renews the lease once and records how long it surely holds.
func (h *HA) renew(ctx context.Context, t *term, id clientv3.LeaseID) error {
	ctx, cancel := context.WithTimeout(ctx, h.etcd.LeaseTTL/2)
	defer cancel()
	sent := time.Now()
	resp, err := h.cli.KeepAliveOnce(ctx, id)
	if err != nil {
		return err
	}
	t.renewed(sent, time.Duration(resp.TTL)*time.Second)
	return nil
}

func (h *HA) sleep(d time.Duration) {
	select {
	case <-h.ctx.Done():
	case <-time.After(d):
	}
}
