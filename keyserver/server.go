// Package keyserver is the smqtt key server: it admits members to groups by
// their identities and its configuration, hands out group keys, and rekeys
// groups when members join, leave, crash or are revoked. Every message
// travels over MQTT through the (untrusted) upstream broker, signed by its
// sender and, when it carries key material, sealed to its recipient with
// HPKE (docs/PROTOCOL.md, section 2).
//
// Schemes: static (one key for the group's life), update (a new epoch key
// on every batched change, sent to each remaining member: forward and
// backward secrecy) and lkh (a logical key hierarchy per group, [gkd.LKHTree]:
// the same secrecy, but a batch of changes costs one signed multicast of
// about degree·log n wrapped keys, [gkd.GroupRekey], instead of one sealed
// message per member; the epoch is the version of the tree's root key).
package keyserver

import (
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/mqttconn"
)

// GroupConfig is one group of the configuration.
type GroupConfig struct {
	Name             string
	Topics           []string
	Scheme           string // "static", "update", "slotted" or "lkh"
	Members          []string
	RekeyBatch       time.Duration // gather changes this long, then rekey once
	RekeyLead        time.Duration // activate_at = now + RekeyLead
	SendGrace        time.Duration
	ReceiveRetention time.Duration
	Degree           int // lkh: the key tree's degree, default 4
	MaxMessageSize   int // bound of one GroupRekey (lkh) or Roster message, default 256 KiB
	// SenderAuth: members sign what they seal; the key server tells them
	// which member signs as which sender id in signed rosters (roster.go).
	SenderAuth bool

	// slotted (see slotted.go); zero values take the defaults.
	Slot           time.Duration // slot length, whole milliseconds
	SlotDepth      int           // each slot tree covers 2^SlotDepth slots
	MemberInterval time.Duration // how far ahead a join's grant reaches
	SkewSlots      int           // slots receivers accept either side of now
}

// Defaults of the lkh settings of a GroupConfig.
const (
	DefaultDegree         = 4
	DefaultMaxMessageSize = 256 << 10

	// groupRekeyOverhead is what a GroupRekey message adds to its chunk:
	// header, signature and the body's other fields, rounded up.
	groupRekeyOverhead = 256
)

// Options configure a Server.
type Options struct {
	Identity    *gkd.Identity
	Upstream    mqttconn.Options
	TopicPrefix string
	StorePath   string                    // the bbolt file (New)
	Etcd        *EtcdOptions              // etcd, several key servers (NewHA)
	Members     map[string]*gkd.PublicKey // name -> identity
	Groups      []GroupConfig
	Heartbeat   time.Duration // default 10s
	LeaveDelay  time.Duration // suspension after a Will, default 30s
	// RequestWindow is how far a request's timestamp may be from the
	// server's clock (default 2 min); requests are remembered that long.
	RequestWindow time.Duration
	Logger        *slog.Logger
	Registry      prometheus.Registerer // nil: metrics kept but not exported
}

// Server is a running key server.
type Server struct {
	opts  Options
	log   *slog.Logger
	m     *metrics
	id    [8]byte
	store stateStore
	// term is the leadership term this server serves on etcd (ha.go); nil
	// for a key server alone on bbolt.
	term *term
	// fenced: a commit failed on etcd, so this server may no longer be the
	// leader, and its state may differ from the store's: it publishes
	// nothing more and its term ends.
	fenced bool

	mu        sync.Mutex
	client    paho.Client
	members   map[[8]byte]*member
	byName    map[string]*member
	groups    map[[8]byte]*group
	replay    *gkd.ReplayCache
	policyV   uint64
	limits    map[[8]byte]*tokenBucket
	willsSeen map[[16]byte]bool   // connection ids whose Will was acted on
	connIDs   map[string][16]byte // member -> current connection id, as stored
	warned    map[string]time.Time
	closed    bool
	timers    sync.WaitGroup
	stopBeat  chan struct{}
	beatDone  chan struct{}

	// afterRekeySend is a test seam, nil in production: called with mu
	// held after each member's Rekey is handed to the broker; when it
	// returns false the fan-out stops there, as if the process had died.
	afterRekeySend func(member string) bool

	// sink, when set, receives what would be published instead of the
	// broker (Cost measures the schemes with it).
	sink func(topic string, msg []byte)
}

type member struct {
	name   string
	pk     *gkd.PublicKey
	id     [8]byte
	connID [16]byte
}

type group struct {
	cfg     GroupConfig
	id      [8]byte
	rec     *groupRecord
	allowed map[string]bool
	tree    *gkd.LKHTree // lkh only; its root is rec.Epoch and rec.Key

	pending   []pendingJoin   // waiting for the next rekey (update)
	leaving   map[string]bool // to be removed at the next rekey
	rekeyAt   *time.Timer
	expiry    *time.Timer            // slotted: the earliest end of a member's grant
	suspended map[string]*time.Timer // Will received: leave unless the member answers
	challenge map[string][16]byte

	// sender_auth (roster.go): the roster of version rec.RosterVersion
	// (valid once rosterSet), and the timer that drops retired senders
	roster      []rosterItem
	rosterSet   bool
	rosterTimer *time.Timer
}

type pendingJoin struct {
	m     *member
	nonce [16]byte
}

// New opens the bbolt store and prepares the server; Start connects it.
// (Several key servers on etcd: NewHA.)
func New(opts Options) (*Server, error) {
	if opts.Identity == nil {
		return nil, errors.New("keyserver: no identity")
	}
	st, err := openStore(opts.StorePath)
	if err != nil {
		return nil, err
	}
	m := newMetrics(opts.Registry)
	m.leader.Set(1)
	return newServer(opts, st, m, nil)
}

// newServer prepares a server on st, loading its state. term is nil for a
// key server alone (bbolt), else the leadership term it serves (ha.go).
// On error st is closed.
func newServer(opts Options, st stateStore, m *metrics, term *term) (*Server, error) {
	if opts.TopicPrefix == "" {
		opts.TopicPrefix = "smqtt/v1"
	}
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = 10 * time.Second
	}
	if opts.RequestWindow <= 0 {
		opts.RequestWindow = 2 * time.Minute
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		opts: opts, log: log, term: term,
		id:        opts.Identity.Public().RawID(),
		limits:    make(map[[8]byte]*tokenBucket),
		willsSeen: make(map[[16]byte]bool),
		warned:    make(map[string]time.Time),
		replay:    gkd.NewReplayCache(opts.RequestWindow, 1<<20),
		m:         m,
	}
	s.store = &meteredStore{stateStore: st, s: s}
	blob, err := st.getMeta(keyReplay)
	if err != nil {
		st.close()
		return nil, err
	}
	if len(blob) > 0 {
		if err := s.replay.UnmarshalBinary(blob); err != nil {
			log.Warn("stored anti-replay cache unreadable; starting empty", "error", err)
		}
	}
	v, err := st.getMeta(keyPolicy)
	if err != nil {
		st.close()
		return nil, err
	}
	if len(v) == 8 {
		s.policyV = beUint64(v)
	}
	if err := s.loadConnIDs(); err != nil {
		st.close()
		return nil, err
	}
	if err := s.configure(opts); err != nil {
		st.close()
		return nil, err
	}
	s.mu.Lock() // the roster's timers may fire from here on
	defer s.mu.Unlock()
	for _, g := range s.groups {
		// A new version for what the store holds: whatever was broadcast
		// before the restart, versions go on increasing from there.
		if err := s.commitRosterLocked(g, false); err != nil {
			st.close()
			return nil, fmt.Errorf("keyserver: group %q: %w", g.cfg.Name, err)
		}
	}
	return s, nil
}

// configure (re)builds members and groups from opts, loading or creating
// each group's state. Called with s.mu held, or before Start.
func (s *Server) configure(opts Options) error {
	members := make(map[[8]byte]*member, len(opts.Members))
	byName := make(map[string]*member, len(opts.Members))
	for name, pk := range opts.Members {
		m := &member{name: name, pk: pk, id: pk.RawID()}
		if old := s.byName[name]; old != nil && old.pk.Equal(pk) {
			m.connID = old.connID
		} else if old == nil {
			m.connID = s.connIDs[name]
		}
		members[m.id] = m
		byName[name] = m
	}
	groups := make(map[[8]byte]*group, len(opts.Groups))
	for _, gc := range opts.Groups {
		gid := gkd.GroupID(s.id, gc.Name)
		g := s.groups[gid]
		if g == nil {
			rec, err := s.store.loadGroup(gc.Name)
			if err != nil {
				return err
			}
			if rec == nil {
				rec = &groupRecord{Scheme: gc.Scheme, Epoch: 1, NextSender: 1, Joined: map[string]*joinedMember{}}
				rec.Key = randomKey()
				if err := s.store.saveGroup(gc.Name, rec); err != nil {
					return fmt.Errorf("keyserver: group %q: %w", gc.Name, err)
				}
			}
			if rec.Joined == nil {
				rec.Joined = map[string]*joinedMember{}
			}
			g = &group{id: gid, rec: rec, leaving: map[string]bool{}, suspended: map[string]*time.Timer{}, challenge: map[string][16]byte{}}
			for _, name := range rec.Leaving {
				g.leaving[name] = true // accepted before a restart: still to be rekeyed out
			}
		}
		if gc.Degree == 0 {
			gc.Degree = DefaultDegree
		}
		if gc.MaxMessageSize == 0 {
			gc.MaxMessageSize = DefaultMaxMessageSize
		}
		if gc.Scheme == "lkh" && g.tree == nil {
			tree, err := loadTree(gc, g.rec)
			if err != nil {
				return err
			}
			g.tree = tree
		}
		if gc.Scheme != "lkh" {
			g.tree = nil
		}
		if gc.Scheme == "slotted" {
			if err := checkSlotted(&gc); err != nil {
				return err
			}
			origin := g.rec.SlotOrigin
			if err := loadSlotted(gc, g.rec); err != nil {
				return err
			}
			if g.rec.SlotOrigin != origin {
				if err := s.store.saveGroup(gc.Name, g.rec); err != nil {
					return fmt.Errorf("keyserver: group %q: %w", gc.Name, err)
				}
			}
		}
		g.cfg = gc
		g.setAllowed()
		groups[gid] = g
	}
	s.members, s.byName, s.groups = members, byName, groups
	return nil
}

// Start connects to the upstream broker and serves requests.
func (s *Server) Start() error {
	o := s.opts.Upstream.Paho(s.opts.Upstream.ClientID).
		SetCleanSession(true).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(250 * time.Millisecond).
		SetOrderMatters(true).
		SetOnConnectHandler(func(c paho.Client) {
			tok := c.Subscribe(gkd.RequestFilter(s.opts.TopicPrefix, s.id), 1, func(_ paho.Client, m paho.Message) {
				s.onRequest(m.Payload())
			})
			if tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
				s.log.Info("key server connected", "url", s.opts.Upstream.URL, "id", fmt.Sprintf("%x", s.id), "groups", len(s.groups))
			} else {
				s.log.Error("subscribing to requests failed", "error", tok.Error())
			}
			s.mu.Lock()
			s.publishPolicyLocked()
			for _, g := range s.groups {
				s.sendRosterLocked(g, nil)
			}
			if s.term != nil {
				// a new leader's first heartbeat: members see the takeover now
				s.beatLocked()
			}
			s.mu.Unlock()
		}).
		SetConnectionLostHandler(func(c paho.Client, err error) {
			s.log.Warn("key server lost the upstream connection; reconnecting", "error", err)
			if s.term != nil {
				go s.reconnectLeading(c)
			}
		})
	if s.term != nil {
		// A leader reconnects only after checking that it still leads: under
		// the shared client id, a reconnecting ex-leader would take the
		// broker session over from the new one.
		o.SetAutoReconnect(false)
	}
	s.mu.Lock()
	s.client = paho.NewClient(o)
	s.stopBeat, s.beatDone = make(chan struct{}), make(chan struct{})
	for _, g := range s.groups {
		if len(g.leaving) > 0 {
			s.scheduleRekeyLocked(g)
		}
		if g.cfg.Scheme == "slotted" {
			s.armExpiryLocked(g) // grants that ran out while the server was down expire now
		}
	}
	s.mu.Unlock()
	s.client.Connect()
	go s.heartbeats()
	return nil
}

// Connected reports whether the upstream connection is up.
func (s *Server) Connected() bool {
	s.mu.Lock()
	c := s.client
	s.mu.Unlock()
	return c != nil && c.IsConnectionOpen()
}

// GroupEpoch returns a group's current epoch (the newest, which members may
// not have activated yet).
func (s *Server) GroupEpoch(name string) (uint32, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.groups {
		if g.cfg.Name == name {
			return g.rec.Epoch, true
		}
	}
	return 0, false
}

// Close stops the server and closes its store.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for _, g := range s.groups {
		if g.rekeyAt != nil {
			g.rekeyAt.Stop()
		}
		if g.expiry != nil {
			g.expiry.Stop()
		}
		for _, t := range g.suspended {
			t.Stop()
		}
		if g.rosterTimer != nil {
			g.rosterTimer.Stop()
		}
	}
	c := s.client
	stop := s.stopBeat
	s.mu.Unlock()
	if stop != nil {
		close(stop)
		<-s.beatDone
	}
	if c != nil {
		c.Disconnect(100)
	}
	s.mu.Lock()
	s.saveReplayLocked()
	s.mu.Unlock()
	return s.store.close()
}

// Reload applies a new configuration: members removed from a group are
// revoked (the group is rekeyed at once), new members and groups appear.
func (s *Server) Reload(opts Options) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	opts.Identity, opts.StorePath, opts.Upstream, opts.Etcd = s.opts.Identity, s.opts.StorePath, s.opts.Upstream, s.opts.Etcd
	before := map[string]map[string]bool{} // group -> members its running configuration names
	for _, gc := range s.opts.Groups {
		before[gc.Name] = map[string]bool{}
		for _, n := range gc.Members {
			if s.byName[n] != nil {
				before[gc.Name][n] = true
			}
		}
	}
	if err := s.configure(opts); err != nil {
		return err
	}
	s.opts.Members, s.opts.Groups = opts.Members, opts.Groups
	for _, g := range s.groups {
		changed := s.recordRevocationsLocked(g, before[g.cfg.Name])
		revoked := false
		for name := range g.rec.Joined {
			if !g.allowed[name] || s.byName[name] == nil {
				g.rec.Revoking = true
				s.markLeavingLocked(g, name)
				revoked = true
				s.log.Warn("member revoked: rekeying", "group", g.cfg.Name, "member", name)
			}
		}
		kept := g.pending[:0]
		for _, p := range g.pending {
			if g.allowed[p.m.name] {
				kept = append(kept, p)
			}
		}
		g.pending = kept
		if revoked {
			s.rekeyNowLocked(g)
		}
		// A revoked member's retired sender ids go at once too, and a group
		// may have switched sender_auth on or off.
		s.commitRosterLocked(g, changed && !revoked)
	}
	s.policyV++
	s.store.putMeta(keyPolicy, beBytes(s.policyV))
	s.publishPolicyLocked()
	return nil
}

// onRequest handles one message on the request topics. The signature is
// checked before anything else, in particular before any decryption.
func (s *Server) onRequest(raw []byte) {
	msg, err := gkd.Parse(raw)
	if err != nil {
		s.m.dropped.WithLabelValues("malformed").Inc()
		s.warn("malformed", "dropped a malformed key-distribution message", "error", err)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	m := s.members[msg.Sender]
	if m == nil {
		s.m.dropped.WithLabelValues("unknown").Inc()
		s.warn("unknown:"+fmt.Sprintf("%x", msg.Sender), "dropped a request from an identity the configuration does not name", "id", fmt.Sprintf("%x", msg.Sender))
		return
	}
	if msg.Recipient != s.id {
		s.warn("recipient", "dropped a request addressed to another server", "member", m.name)
		return
	}
	if !s.allow(m.id) {
		s.m.dropped.WithLabelValues("rate").Inc()
		s.warn("rate:"+m.name, "rate limit: dropped a request", "member", m.name)
		return
	}
	if err := msg.Verify(m.pk); err != nil {
		s.m.dropped.WithLabelValues("forged").Inc()
		s.warn("forged:"+m.name, "dropped a request with a bad signature", "member", m.name, "error", err)
		return
	}
	if will, ok := s.willLeave(msg); ok {
		// A Will is signed when the connection opens and published by the
		// broker whenever it ends, so its age says nothing: it is acted on
		// only for the member's current connection id, and once.
		if will.ConnID != m.connID || s.willsSeen[will.ConnID] {
			s.warn("oldwill:"+m.name, "ignored a Will for an earlier or already handled connection", "member", m.name)
			return
		}
		s.willsSeen[will.ConnID] = true
		s.leaveLocked(m, will)
		return
	}
	if err := s.replay.Check(msg.Sender, msg.Nonce, msg.Time, time.Now()); err != nil {
		s.m.dropped.WithLabelValues("replay").Inc()
		s.warn("replay:"+m.name, "dropped a replayed or stale request", "member", m.name, "error", err)
		return
	}
	s.saveReplayLocked()
	switch msg.Type {
	case gkd.TypeJoinRequest:
		req, err := gkd.ParseJoinRequest(msg.Body)
		if err != nil {
			s.warn("bad:"+m.name, "bad join request", "member", m.name, "error", err)
			return
		}
		s.joinLocked(m, msg.Nonce, req)
	case gkd.TypeLeave:
		lv, err := gkd.ParseLeave(msg.Body)
		if err != nil || lv.Reason == gkd.LeaveWill {
			return
		}
		s.leaveLocked(m, lv)
	case gkd.TypeRegister:
		rg, err := gkd.ParseRegister(msg.Body)
		if err != nil {
			return
		}
		s.setConnIDLocked(m, rg.ConnID)
	case gkd.TypeChallengeResponse:
		cr, err := gkd.ParseChallengeResponse(msg.Body)
		if err != nil {
			return
		}
		for _, g := range s.groups {
			if c, ok := g.challenge[m.name]; ok && c == cr.Value {
				s.cancelSuspensionLocked(g, m.name, "answered the challenge")
			}
		}
	case gkd.TypeRekeyAck:
		// Acknowledgements are informative: activation never waits for them.
	default:
		s.warn("type:"+m.name, "dropped a request of an unexpected type", "member", m.name, "type", msg.Type)
	}
}

// willLeave returns the body of a Leave sent as a Will.
func (s *Server) willLeave(msg *gkd.Message) (gkd.Leave, bool) {
	if msg.Type != gkd.TypeLeave {
		return gkd.Leave{}, false
	}
	lv, err := gkd.ParseLeave(msg.Body)
	return lv, err == nil && lv.Reason == gkd.LeaveWill
}

func (s *Server) joinLocked(m *member, nonce [16]byte, req gkd.JoinRequest) {
	g := s.groups[req.Group]
	if g == nil {
		s.refuseLocked(m, req.Group, nonce, gkd.RefusalUnknownGroup, "unknown group")
		return
	}
	if !g.allowed[m.name] {
		s.warn("acl:"+m.name+g.cfg.Name, "refused a join: member not allowed in group", "member", m.name, "group", g.cfg.Name)
		s.refuseLocked(m, g.id, nonce, gkd.RefusalNotAuthorised, "not a member of this group")
		return
	}
	s.setConnIDLocked(m, req.ConnID)
	s.cancelSuspensionLocked(g, m.name, "rejoined")
	if g.cfg.Scheme == "slotted" {
		s.joinSlottedLocked(g, m, nonce)
		return
	}
	rec := g.rec
	_, joined := rec.Joined[m.name]
	if g.tree != nil && joined {
		_, err := g.tree.Path(m.name)
		joined = err == nil
	}
	if joined && !g.leaving[m.name] || g.cfg.Scheme == "static" {
		// A member that holds the current key (a restarted sidecar, or any
		// static-group member) gets it again with a fresh sender id.
		var until time.Time
		if old := rec.Joined[m.name]; old != nil {
			until = old.Until
		}
		sender, err := s.admitLocked(g, m, until)
		if err != nil {
			return
		}
		s.sendJoinResponseLocked(g, m, nonce, sender, time.Time{})
		s.log.Info("member joined", "group", g.cfg.Name, "member", m.name, "epoch", rec.Epoch, "sender", sender)
		return
	}
	for _, p := range g.pending {
		if p.m == m {
			return // already waiting; its first request's nonce is answered
		}
	}
	g.pending = append(g.pending, pendingJoin{m: m, nonce: nonce})
	s.scheduleRekeyLocked(g)
}

// admitLocked gives a member that joins at once (without a rekey) a fresh
// sender id and the grant end until, and commits them before any answer.
func (s *Server) admitLocked(g *group, m *member, until time.Time) (sender uint64, err error) {
	rec := g.rec
	since := time.Now()
	if old := rec.Joined[m.name]; old != nil {
		since = old.Since
	}
	sender = rec.enter(m, since, until)
	// committed, and the others told of the new sender, before any answer
	if err := s.commitRosterLocked(g, true); err != nil {
		s.log.Error("storing a join failed; not answering", "group", g.cfg.Name, "member", m.name, "error", err)
		return 0, err
	}
	return sender, nil
}

func (s *Server) leaveLocked(m *member, lv gkd.Leave) {
	for _, g := range s.groups {
		if lv.Group != ([8]byte{}) && lv.Group != g.id {
			continue
		}
		if _, joined := g.rec.Joined[m.name]; !joined {
			continue
		}
		switch lv.Reason {
		case gkd.LeaveWill:
			s.suspendLocked(g, m)
		default:
			s.markLeavingLocked(g, m.name)
			s.log.Info("member leaves", "group", g.cfg.Name, "member", m.name)
			s.scheduleRekeyLocked(g)
		}
	}
}

// markLeavingLocked accepts a member's leave: stored at once, so that the
// rekey that removes it happens even across a key-server restart.
func (s *Server) markLeavingLocked(g *group, name string) {
	g.leaving[name] = true
	s.storeLeavingLocked(g, name)
}

// storeLeavingLocked commits the group's leaving members.
func (s *Server) storeLeavingLocked(g *group, name string) {
	g.rec.Leaving = g.rec.Leaving[:0]
	for n := range g.leaving {
		g.rec.Leaving = append(g.rec.Leaving, n)
	}
	sort.Strings(g.rec.Leaving)
	if err := s.store.saveGroup(g.cfg.Name, g.rec); err != nil {
		s.log.Error("storing a leave failed", "group", g.cfg.Name, "member", name, "error", err)
	}
}

// suspendLocked acts on a Will: the member is challenged and removed after
// LeaveDelay unless it answers or rejoins first. A Will is acted on once.
func (s *Server) suspendLocked(g *group, m *member) {
	if _, already := g.suspended[m.name]; already {
		return
	}
	var c [16]byte
	rand.Read(c[:])
	g.challenge[m.name] = c
	s.sendLocked(gkd.MemberTopic(s.opts.TopicPrefix, m.id), mustPlain(s.opts.Identity, m.id, gkd.TypeChallenge, gkd.Challenge{Value: c}))
	name := m.name
	s.log.Info("member's Will received: suspended, challenging", "group", g.cfg.Name, "member", name, "delay", s.opts.LeaveDelay)
	g.suspended[name] = time.AfterFunc(s.opts.LeaveDelay, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closed || g.suspended[name] == nil {
			return
		}
		delete(g.suspended, name)
		delete(g.challenge, name)
		s.markLeavingLocked(g, name)
		s.log.Info("member did not answer after its Will: removing", "group", g.cfg.Name, "member", name)
		s.scheduleRekeyLocked(g)
	})
}

func (s *Server) cancelSuspensionLocked(g *group, name, why string) {
	if t := g.suspended[name]; t != nil {
		t.Stop()
		delete(g.suspended, name)
		delete(g.challenge, name)
		s.log.Info("suspension cancelled", "group", g.cfg.Name, "member", name, "reason", why)
	}
}

func (s *Server) scheduleRekeyLocked(g *group) {
	if g.rekeyAt != nil {
		return
	}
	if g.cfg.Scheme == "static" {
		// Static keys never change: leaving members are forgotten at once.
		for name := range g.leaving {
			g.rec.drop(name)
		}
		clear(g.leaving)
		g.rec.Leaving = nil
		s.commitRosterLocked(g, true)
		return
	}
	g.rekeyAt = time.AfterFunc(g.cfg.RekeyBatch, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		g.rekeyAt = nil
		if !s.closed {
			s.rekeyNowLocked(g)
		}
	})
}

// beginRekeyLocked does what every rekey does once its new epoch is stored:
// counts it, and says when members switch to it and how long the previous
// epoch stays open: receive_retention, so that queued messages sealed under
// it are read; after a revocation only send_grace, so that the revoked
// member cannot go on injecting.
func (s *Server) beginRekeyLocked(g *group) (now, activate time.Time, retention time.Duration) {
	now = time.Now()
	s.m.rekeys.WithLabelValues(g.cfg.Name).Inc()
	s.m.members.WithLabelValues(g.cfg.Name).Set(float64(len(g.rec.Joined)))
	s.m.epoch.WithLabelValues(g.cfg.Name).Set(float64(g.rec.Epoch))
	activate = now.Add(g.cfg.RekeyLead)
	retention = g.cfg.ReceiveRetention
	if g.rec.Revoking {
		retention = g.cfg.SendGrace
		g.rec.Revoking = false
	}
	return now, activate, retention
}

// rekeyNowLocked moves a group to a new epoch: leavers are dropped, waiting
// joiners admitted, the new key committed to the store, then sent to every
// member, each sealed to its own identity.
func (s *Server) rekeyNowLocked(g *group) {
	if g.rekeyAt != nil {
		g.rekeyAt.Stop()
		g.rekeyAt = nil
	}
	if g.cfg.Scheme == "static" {
		s.scheduleRekeyLocked(g)
		return
	}
	if g.tree != nil {
		s.rekeyLKHLocked(g)
		return
	}
	rec := g.rec
	if g.cfg.Scheme == "slotted" {
		s.noteRevokedLocked(g)
		defer s.armExpiryLocked(g)
	}
	for name := range g.leaving {
		rec.drop(name)
	}
	clear(g.leaving)
	rec.Leaving = nil
	newcomers := g.pending
	g.pending = nil
	for _, p := range newcomers {
		rec.enter(p.m, time.Now(), time.Time{})
	}
	rec.Epoch++
	rec.Key = randomKey()
	rec.Counter++
	// The new roster goes out before the joiners' responses and the rekey
	// (which a revocation causes).
	if err := s.commitRosterLocked(g, true); err != nil {
		s.log.Error("storing a rekey failed; group keeps its epoch", "group", g.cfg.Name, "error", err)
		rec.Epoch--
		return
	}
	now, activate, retention := s.beginRekeyLocked(g)
	defer func() { s.m.rekeyDur.Observe(time.Since(now).Seconds()) }()
	isNew := map[string]bool{}
	for _, p := range newcomers {
		isNew[p.m.name] = true
		s.sendJoinResponseLocked(g, p.m, p.nonce, rec.Joined[p.m.name].Sender, activate)
	}
	sent := 0
	for name := range rec.Joined {
		m := s.byName[name]
		if m == nil || isNew[name] {
			continue
		}
		body := gkd.Rekey{
			Group: g.id, Epoch: rec.Epoch, Counter: rec.Counter,
			ActivateAt:    activate,
			PrevSendUntil: activate.Add(g.cfg.SendGrace),
			PrevOpenUntil: activate.Add(retention),
		}
		copy(body.Key[:], rec.Key)
		msg, err := gkd.SealedMessage(s.opts.Identity, m.pk, gkd.TypeRekey, body)
		if err != nil {
			s.log.Error("sealing a rekey failed", "member", name, "error", err)
			continue
		}
		s.sendLocked(gkd.MemberTopic(s.opts.TopicPrefix, m.id), msg)
		sent++
		if s.afterRekeySend != nil && !s.afterRekeySend(name) {
			return
		}
	}
	s.log.Info("group rekeyed", "group", g.cfg.Name, "epoch", rec.Epoch, "members", len(rec.Joined), "rekeys_sent", sent, "joined", len(newcomers))
}

func (s *Server) sendJoinResponseLocked(g *group, m *member, nonce [16]byte, sender uint64, activateAt time.Time) {
	s.sendJoinResponseExtLocked(g, m, nonce, sender, activateAt, nil)
}

func (s *Server) sendJoinResponseExtLocked(g *group, m *member, nonce [16]byte, sender uint64, activateAt time.Time, ext []byte) {
	body := gkd.JoinResponse{
		Group: g.id, RequestNonce: nonce, Scheme: schemeCode(g.cfg.Scheme),
		Epoch: g.rec.Epoch, Sender: sender, Counter: g.rec.Counter, ActivateAt: activateAt, Ext: ext,
		Roster: g.rosterVersion(),
	}
	if g.cfg.SenderAuth {
		body.Flags = gkd.FlagSenderAuth
	}
	copy(body.Key[:], g.rec.Key)
	if g.tree != nil {
		// The member's path keys, the root (body.Key) last.
		p, err := g.tree.Path(m.name)
		if err == nil {
			body.Ext, err = p.MarshalBinary()
		}
		if err != nil {
			s.log.Error("no key-tree path for a joining member; not answering", "group", g.cfg.Name, "member", m.name, "error", err)
			return
		}
	}
	msg, err := gkd.SealedMessage(s.opts.Identity, m.pk, gkd.TypeJoinResponse, body)
	if err != nil {
		s.log.Error("sealing a join response failed", "member", m.name, "error", err)
		return
	}
	s.sendLocked(gkd.MemberTopic(s.opts.TopicPrefix, m.id), msg)
	s.sendRosterLocked(g, m) // the version the response names, right after it
	s.m.joins.WithLabelValues(g.cfg.Name).Inc()
	s.m.members.WithLabelValues(g.cfg.Name).Set(float64(len(g.rec.Joined)))
	s.m.epoch.WithLabelValues(g.cfg.Name).Set(float64(g.rec.Epoch))
}

func (s *Server) refuseLocked(m *member, gid [8]byte, nonce [16]byte, code gkd.RefusalCode, reason string) {
	name := "unknown"
	if g := s.groups[gid]; g != nil {
		name = g.cfg.Name
	}
	s.m.refused.WithLabelValues(name, code.String()).Inc()
	s.sendLocked(gkd.MemberTopic(s.opts.TopicPrefix, m.id),
		mustPlain(s.opts.Identity, m.id, gkd.TypeRefusal, gkd.Refusal{Group: gid, RequestNonce: nonce, Code: code, Reason: reason}))
}

// heartbeats signs a heartbeat per group every Heartbeat.
func (s *Server) heartbeats() {
	defer close(s.beatDone)
	t := time.NewTicker(s.opts.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-s.stopBeat:
			return
		case <-t.C:
		}
		s.mu.Lock()
		s.beatLocked()
		s.mu.Unlock()
	}
}

// beatLocked commits each group's next heartbeat counter, then sends its
// heartbeat.
func (s *Server) beatLocked() {
	for _, g := range s.groups {
		if s.closed || s.fenced {
			return
		}
		g.rec.Counter++
		if err := s.store.saveGroup(g.cfg.Name, g.rec); err != nil {
			s.log.Error("storing a heartbeat counter failed", "group", g.cfg.Name, "error", err)
			continue
		}
		s.sendLocked(gkd.GroupTopic(s.opts.TopicPrefix, g.id),
			mustPlain(s.opts.Identity, [8]byte{}, gkd.TypeHeartbeat, gkd.Heartbeat{Group: g.id, Epoch: g.rec.Epoch, Counter: g.rec.Counter, Roster: g.rosterVersion()}))
	}
}

// reconnectLeading reconnects a leader's lost broker connection once it has
// checked that it still leads.
func (s *Server) reconnectLeading(c paho.Client) {
	for {
		s.mu.Lock()
		stop := s.closed || s.fenced
		s.mu.Unlock()
		if stop {
			return
		}
		if err := s.term.check(); err != nil {
			s.mu.Lock()
			s.fenceLocked(err)
			s.mu.Unlock()
			return
		}
		tok := c.Connect()
		tok.Wait()
		if tok.Error() == nil {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// publishPolicyLocked sends the signed topic policy (retained).
func (s *Server) publishPolicyLocked() {
	if s.client == nil || !s.mayPublishLocked() {
		return
	}
	p := gkd.Policy{Version: s.policyV}
	for _, gc := range s.opts.Groups {
		gid := gkd.GroupID(s.id, gc.Name)
		for _, f := range gc.Topics {
			p.Entries = append(p.Entries, gkd.PolicyEntry{Group: gid, Filter: f})
		}
	}
	msg := mustPlain(s.opts.Identity, [8]byte{}, gkd.TypePolicy, p)
	s.client.Publish(gkd.PolicyTopic(s.opts.TopicPrefix, s.id), 1, true, msg)
}

func (s *Server) sendLocked(topic string, msg []byte) {
	if !s.mayPublishLocked() {
		return
	}
	if s.sink != nil && msg != nil {
		s.sink(topic, msg)
		return
	}
	if s.client == nil || msg == nil {
		return
	}
	s.client.Publish(topic, 1, false, msg)
}

func (s *Server) saveReplayLocked() {
	if b, err := s.replay.MarshalBinary(); err == nil {
		if err := s.store.putMeta(keyReplay, b); err != nil {
			s.log.Error("storing the anti-replay cache failed", "error", err)
		}
	}
}

// warn logs a security event at most once a minute per kind.
func (s *Server) warn(kind, msg string, args ...any) {
	now := time.Now()
	if now.Sub(s.warned[kind]) < time.Minute {
		return
	}
	s.warned[kind] = now
	s.log.Warn(msg, args...)
}

// allow is a per-identity token bucket: 20 requests burst, 5 per second.
func (s *Server) allow(id [8]byte) bool {
	b := s.limits[id]
	if b == nil {
		b = &tokenBucket{tokens: 20, last: time.Now()}
		s.limits[id] = b
	}
	return b.take(time.Now(), 20, 5)
}

type tokenBucket struct {
	tokens float64
	last   time.Time
}

func (b *tokenBucket) take(now time.Time, burst, rate float64) bool {
	b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

func mustPlain(id *gkd.Identity, to [8]byte, typ gkd.MsgType, body interface{ MarshalBinary() ([]byte, error) }) []byte {
	msg, err := gkd.PlainMessage(id, to, typ, body)
	if err != nil {
		return nil
	}
	return msg
}

func schemeCode(s string) gkd.Scheme {
	switch s {
	case "static":
		return gkd.SchemeStatic
	case "update":
		return gkd.SchemeUpdate
	case "slotted":
		return gkd.SchemeSlotted
	case "lkh":
		return gkd.SchemeLKH
	}
	return 0
}

func randomKey() []byte {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return k
}

func beBytes(v uint64) []byte {
	b := make([]byte, 8)
	for i := 7; i >= 0; i-- {
		b[i] = byte(v)
		v >>= 8
	}
	return b
}

func beUint64(b []byte) uint64 {
	var v uint64
	for _, c := range b {
		v = v<<8 | uint64(c)
	}
	return v
}
