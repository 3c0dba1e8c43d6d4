package keyclient

// Client: the sidecar's member side of key distribution.
//
//  1. Connect to upstream on a connection of its own, with a fresh random
//     connection id and a Will that is this member's signed leave for it.
//  2. Register the connection id, subscribe to its unicast topic, its
//     groups' broadcast topics and the key server's policy topic.
//  3. Join every group (a fresh nonce each time; only a response echoing it
//     installs key material), and from then on accept rekeys and heartbeats
//     only with strictly increasing per-group counters.
//  4. Rekeys install the new epoch for opening at once and switch sealing at
//     activate_at; the previous epoch is retired at prev_open_until. In an
//     lkh group the rekey is a signed multicast of wrapped keys (GroupRekey,
//     in one or more chunks sharing a counter) that the member unwraps with
//     the path keys it got on joining; a missed rekey means a rejoin.
//  5. No verified heartbeat for max_staleness: sealing stops (fail closed).
//  6. Connection lost: start again at 1 with a new connection id.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/mqttconn"
)

// ClientOptions configure a key Client.
type ClientOptions struct {
	Identity     *gkd.Identity
	Server       *gkd.PublicKey // the pinned key server
	Upstream     mqttconn.Options
	TopicPrefix  string        // default smqtt/v1
	Groups       []string      // the groups to join
	MaxStaleness time.Duration // default 60s
	JoinRetry    time.Duration // resend an unanswered join after this (default 3s)
	Ring         *Ring
	Logger       *slog.Logger
	// OnPolicy receives each newer verified topic policy.
	OnPolicy func(gkd.Policy)
	// PolicyVersionFile, when set, keeps the newest policy version seen, so
	// that a restarted sidecar refuses an older signed policy.
	PolicyVersionFile string
}

// ErrRefused wraps a key server's signed refusal.
var ErrRefused = errors.New("refused by the key server")

// GroupStatus is what the client knows of one group.
type GroupStatus struct {
	Group     string
	Joined    bool
	Epoch     uint32
	Sender    uint64
	LastRekey time.Time
	LastBeat  time.Time
	Refused   string // the reason of the key server's last refusal, until a join succeeds
	// Revoked: the key server refused this member as not (or no longer)
	// allowed in the group. Joins are still retried, slowly and at every new
	// topic policy (a reload of the key server), so that a re-admitted member
	// comes back by itself.
	Revoked bool
	// JoinLatency is the time from the last answered join request to its
	// response (it includes the key server's rekey batching for newcomers).
	JoinLatency time.Duration
}

// Client joins groups and keeps their keys in a Ring.
type Client struct {
	opts   ClientOptions
	log    *slog.Logger
	me     [8]byte
	server [8]byte
	gids   map[[8]byte]string

	mu         sync.Mutex
	cond       *sync.Cond
	conn       paho.Client
	connID     [16]byte
	joins      map[[16]byte]string    // outstanding join nonce -> group
	sentAt     map[[16]byte]time.Time // when each outstanding join was sent
	state      map[string]*groupState
	policyV    uint64
	policySeen bool
	policy     *gkd.Policy // the newest verified policy
	closed     bool

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

type groupState struct {
	joined    bool
	counter   uint64
	epoch     uint32
	sender    uint64
	lastRekey time.Time
	lastBeat  time.Time
	refused   string
	revoked   bool // refused as not allowed in the group
	timers    []*time.Timer

	// lkh groups only: the member's path keys, and the counter of the last
	// GroupRekey accepted (its further chunks carry the same counter).
	lkh          *gkd.LKHMember
	rekeyCounter uint64

	slot *slotState // slotted groups only

	// sender_auth groups (roster.go): set by the last JoinResponse, with the
	// roster version it named; the roster being collected
	senderAuth     bool
	rosterMin      uint64
	rosterParts    rosterParts
	rostersIgnored int

	joinLatency time.Duration
}

// NewClient prepares a client; Start runs it.
func NewClient(o ClientOptions) (*Client, error) {
	if o.Identity == nil || o.Server == nil || o.Ring == nil {
		return nil, errors.New("keyclient: identity, key server public key and ring are required")
	}
	if o.TopicPrefix == "" {
		o.TopicPrefix = "smqtt/v1"
	}
	if o.MaxStaleness <= 0 {
		o.MaxStaleness = 60 * time.Second
	}
	if o.JoinRetry <= 0 {
		o.JoinRetry = 3 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Client{
		opts: o, log: o.Logger,
		me:     o.Identity.Public().RawID(),
		server: o.Server.RawID(),
		gids:   map[[8]byte]string{},
		joins:  map[[16]byte]string{},
		sentAt: map[[16]byte]time.Time{},
		state:  map[string]*groupState{},
		done:   make(chan struct{}),
	}
	c.cond = sync.NewCond(&c.mu)
	o.Ring.SetProofSigner(o.Identity) // what signs this process's envelopes in sender_auth groups
	if o.PolicyVersionFile != "" {
		if b, err := os.ReadFile(o.PolicyVersionFile); err == nil {
			c.policyV, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		}
	}
	for _, g := range o.Groups {
		c.gids[gkd.GroupID(c.server, g)] = g
		c.state[g] = &groupState{}
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c, nil
}

// Start runs the client in the background until Close.
func (c *Client) Start() { go c.run() }

func (c *Client) run() {
	defer close(c.done)
	backoff := 100 * time.Millisecond
	for c.ctx.Err() == nil {
		lost := make(chan struct{})
		if err := c.connect(lost); err != nil {
			c.log.Warn("key client: connecting upstream failed", "error", err)
			select {
			case <-time.After(backoff):
			case <-c.ctx.Done():
				return
			}
			backoff = min(2*backoff, c.opts.Upstream.Backoff())
			continue
		}
		backoff = 100 * time.Millisecond
		c.joinAll(lost)
		select {
		case <-lost:
		case <-c.ctx.Done():
			return
		}
	}
}

// connect opens one upstream connection with a fresh connection id and the
// matching signed Will.
func (c *Client) connect(lost chan struct{}) error {
	var connID [16]byte
	rand.Read(connID[:])
	will, err := gkd.PlainMessage(c.opts.Identity, c.server, gkd.TypeLeave, gkd.Leave{ConnID: connID, Reason: gkd.LeaveWill})
	if err != nil {
		return err
	}
	reqTopic := gkd.RequestTopic(c.opts.TopicPrefix, c.server, c.me)
	var once sync.Once
	o := c.opts.Upstream.Paho(c.opts.Upstream.ClientID).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetOrderMatters(true).
		SetBinaryWill(reqTopic, will, 1, false).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			c.log.Warn("key client lost the upstream connection", "error", err)
			once.Do(func() { close(lost) })
		})
	conn := paho.NewClient(o)
	tok := conn.Connect()
	if !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		return fmt.Errorf("connect %s: %v", c.opts.Upstream.URL, tok.Error())
	}
	subs := map[string]byte{
		gkd.MemberTopic(c.opts.TopicPrefix, c.me):     1,
		gkd.PolicyTopic(c.opts.TopicPrefix, c.server): 1,
	}
	c.mu.Lock()
	for gid := range c.gids {
		subs[gkd.GroupTopic(c.opts.TopicPrefix, gid)] = 1
	}
	c.mu.Unlock()
	st := conn.SubscribeMultiple(subs, func(_ paho.Client, m paho.Message) { c.onMessage(m.Payload()) })
	if !st.WaitTimeout(10*time.Second) || st.Error() != nil {
		conn.Disconnect(0)
		return fmt.Errorf("subscribe: %v", st.Error())
	}
	c.mu.Lock()
	c.conn, c.connID = conn, connID
	c.mu.Unlock()
	c.send(gkd.TypeRegister, gkd.Register{ConnID: connID})
	return nil
}

// joinAll sends a join for every group and resends unanswered ones.
func (c *Client) joinAll(lost chan struct{}) {
	go func() {
		first := true
		// A refused group is asked again every refusedRetries rounds: a
		// reload of the key server may have admitted it (a new policy asks
		// at once, see onMessage).
		const refusedRetries = 10
		for round := 1; ; round++ {
			c.mu.Lock()
			var todo []string
			for g, st := range c.state {
				if first || !c.readyLocked(g, st) && (st.refused == "" || round%refusedRetries == 0) {
					todo = append(todo, g)
				}
			}
			c.mu.Unlock()
			for _, g := range todo {
				c.join(g)
			}
			first = false
			select {
			case <-lost:
				return
			case <-c.ctx.Done():
				return
			case <-time.After(c.opts.JoinRetry):
			}
		}
	}()
}

func (c *Client) join(group string) {
	msg, nonce, err := c.build(gkd.TypeJoinRequest, gkd.JoinRequest{Group: gkd.GroupID(c.server, group), ConnID: c.currentConnID()})
	if err != nil {
		c.log.Error("building a join request failed", "group", group, "error", err)
		return
	}
	c.mu.Lock()
	c.joins[nonce] = group
	c.sentAt[nonce] = time.Now()
	conn := c.conn
	c.mu.Unlock()
	if conn != nil {
		conn.Publish(gkd.RequestTopic(c.opts.TopicPrefix, c.server, c.me), 1, false, msg)
	}
}

func (c *Client) currentConnID() [16]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connID
}

func (c *Client) build(typ gkd.MsgType, body interface{ MarshalBinary() ([]byte, error) }) ([]byte, [16]byte, error) {
	msg, err := gkd.PlainMessage(c.opts.Identity, c.server, typ, body)
	if err != nil {
		return nil, [16]byte{}, err
	}
	parsed, err := gkd.Parse(msg)
	if err != nil {
		return nil, [16]byte{}, err
	}
	return msg, parsed.Nonce, nil
}

func (c *Client) send(typ gkd.MsgType, body interface{ MarshalBinary() ([]byte, error) }) {
	msg, _, err := c.build(typ, body)
	if err != nil {
		return
	}
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	if conn != nil {
		conn.Publish(gkd.RequestTopic(c.opts.TopicPrefix, c.server, c.me), 1, false, msg)
	}
}

// onMessage handles one message from the key server. Only messages signed
// by the pinned key server are looked at further.
func (c *Client) onMessage(raw []byte) {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return // closed or abandoned: a crashed process acts on nothing
	}
	msg, err := gkd.Parse(raw)
	if err != nil {
		c.log.Warn("dropped a malformed key-distribution message", "error", err)
		return
	}
	if msg.Sender != c.server {
		c.log.Warn("dropped a key-distribution message not from the pinned key server", "sender", fmt.Sprintf("%x", msg.Sender))
		return
	}
	if err := msg.Verify(c.opts.Server); err != nil {
		c.log.Warn("dropped a forged key-distribution message", "type", msg.Type, "error", err)
		return
	}
	if msg.Recipient != c.me && msg.Recipient != ([8]byte{}) {
		return
	}
	switch msg.Type {
	case gkd.TypeJoinResponse:
		c.onJoinResponse(msg)
	case gkd.TypeRefusal:
		c.onRefusal(msg)
	case gkd.TypeRekey:
		c.onRekey(msg)
	case gkd.TypeHeartbeat:
		c.onHeartbeat(msg)
	case gkd.TypeGroupRekey:
		c.onGroupRekey(msg)
	case gkd.TypeRoster:
		c.onRoster(msg)
	case gkd.TypeChallenge:
		ch, err := gkd.ParseChallenge(msg.Body)
		if err == nil {
			c.send(gkd.TypeChallengeResponse, gkd.ChallengeResponse{Value: ch.Value})
		}
	case gkd.TypePolicy:
		p, err := gkd.ParsePolicy(msg.Body)
		if err != nil {
			return
		}
		c.mu.Lock()
		newer := p.Version > c.policyV || c.policyV == 0 && !c.policySeen
		if newer {
			c.policyV, c.policySeen, c.policy = p.Version, true, &p
			if f := c.opts.PolicyVersionFile; f != "" {
				if err := os.WriteFile(f, []byte(strconv.FormatUint(p.Version, 10)+"\n"), 0o600); err != nil {
					c.log.Error("storing the policy version failed", "file", f, "error", err)
				}
			}
		}
		var refused []string
		if newer {
			for g, st := range c.state {
				if st.refused != "" {
					refused = append(refused, g)
				}
			}
		}
		c.mu.Unlock()
		for _, g := range refused {
			go c.join(g) // a new policy means a reload, which may re-admit us
		}
		if newer && c.opts.OnPolicy != nil {
			c.opts.OnPolicy(p)
		}
	}
}

// openSealed opens a sealed message addressed to this member and parses
// its body; anything that fails is dropped (and logged when it does not
// open).
func openSealed[T any](c *Client, msg *gkd.Message, parse func([]byte) (T, error)) (T, bool) {
	var zero T
	if msg.Recipient != c.me {
		return zero, false
	}
	plain, err := c.opts.Identity.OpenBody(msg)
	if err != nil {
		c.log.Warn("dropped a sealed key-distribution message that does not open", "type", msg.Type, "error", err)
		return zero, false
	}
	v, err := parse(plain)
	if err != nil {
		c.log.Warn("dropped a malformed key-distribution message", "type", msg.Type, "error", err)
		return zero, false
	}
	return v, true
}

func (c *Client) onJoinResponse(msg *gkd.Message) {
	r, ok := openSealed(c, msg, gkd.ParseJoinResponse)
	if !ok {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	group, ok := c.joins[r.RequestNonce]
	if !ok || c.gids[r.Group] != group {
		c.log.Warn("dropped a join response that answers no request of this process", "group", c.gids[r.Group])
		return
	}
	st := c.state[group]
	c.senderAuthLocked(st, group, r)
	if r.Scheme == gkd.SchemeSlotted {
		if !c.onSlotJoinLocked(st, group, msg, r, c.sentAt[r.RequestNonce]) {
			return
		}
		st.joinLatency = time.Since(c.sentAt[r.RequestNonce])
		c.forgetJoinsLocked(group)
		c.admittedLocked(st, group)
		st.joined, st.lkh = true, nil
		st.lastRekey = time.Now()
		c.freshLocked(st, group)
		c.cond.Broadcast()
		return
	}
	var lkh *gkd.LKHMember
	if r.Scheme == gkd.SchemeLKH {
		var err error
		if lkh, err = lkhMember(r); err != nil {
			c.log.Warn("dropped a join response with unusable path keys", "group", group, "error", err)
			return
		}
	}
	st.joinLatency = time.Since(c.sentAt[r.RequestNonce])
	c.forgetJoinsLocked(group)
	if st.slot != nil {
		st.slot.stop() // the group is no longer slotted
		st.slot = nil
	}
	if err := c.opts.Ring.Install(group, r.Epoch, envelope.GroupKey(r.Key), r.Sender, !time.Now().Before(r.ActivateAt)); err != nil {
		c.log.Error("installing a group key failed", "group", group, "error", err)
		return
	}
	if !r.ActivateAt.IsZero() {
		c.activateAtLocked(st, group, r.Epoch, r.ActivateAt)
	}
	c.retireSupersededLocked(st, group, r.Epoch)
	c.admittedLocked(st, group)
	st.joined = true
	st.counter, st.epoch, st.sender = r.Counter, r.Epoch, r.Sender
	st.lkh, st.rekeyCounter = lkh, 0
	st.lastRekey = time.Now()
	c.freshLocked(st, group)
	c.cond.Broadcast()
	c.log.Info("joined group", "group", group, "epoch", r.Epoch, "sender", r.Sender)
}

// forgetJoinsLocked drops the outstanding join requests of a group.
func (c *Client) forgetJoinsLocked(group string) {
	for n, g := range c.joins {
		if g == group {
			delete(c.joins, n)
			delete(c.sentAt, n)
		}
	}
}

func (c *Client) onRefusal(msg *gkd.Message) {
	r, err := gkd.ParseRefusal(msg.Body)
	if err != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	group, ok := c.joins[r.RequestNonce]
	if !ok {
		return
	}
	delete(c.joins, r.RequestNonce)
	delete(c.sentAt, r.RequestNonce)
	st := c.state[group]
	revoked := r.Code == gkd.RefusalNotAuthorised || r.Code == gkd.RefusalRevoked
	changed := st.refused == "" || st.revoked != revoked
	st.refused, st.revoked = r.Reason, revoked
	if st.joined {
		// Revoked while holding keys: stop sealing at once.
		st.joined, st.senderAuth, st.rosterMin = false, false, 0
		c.opts.Ring.Forget(group)
	}
	if st.slot != nil {
		st.slot.stop()
		st.slot = nil
	}
	c.cond.Broadcast()
	if !changed {
		return // said once, when the state changed
	}
	if revoked {
		c.log.Error(fmt.Sprintf("revoked from group %q: the key server no longer admits this sidecar; its messages are neither sealed nor opened here until it is re-admitted", group),
			"group", group, "reason", r.Reason)
		return
	}
	c.log.Error("the key server refused to admit this sidecar to a group", "group", group, "code", r.Code.String(), "reason", r.Reason)
}

// admittedLocked clears a refusal on a successful join, and says so when the
// member had been refused.
func (c *Client) admittedLocked(st *groupState, group string) {
	if st.refused != "" {
		c.log.Info(fmt.Sprintf("admitted to group %q again by the key server", group), "group", group, "was", st.refused)
	}
	st.refused, st.revoked = "", false
}

func (c *Client) onRekey(msg *gkd.Message) {
	r, ok := openSealed(c, msg, gkd.ParseRekey)
	if !ok {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	group, ok := c.gids[r.Group]
	if !ok {
		return
	}
	st := c.state[group]
	if !st.joined || r.Counter <= st.counter {
		c.log.Warn("dropped an old or replayed rekey", "group", group, "counter", r.Counter, "have", st.counter)
		return
	}
	if st.slot != nil {
		c.onSlotRekeyLocked(st, group, r)
		return
	}
	prev := st.epoch
	if err := c.opts.Ring.Install(group, r.Epoch, envelope.GroupKey(r.Key), st.sender, false); err != nil {
		c.log.Error("installing a rekey failed", "group", group, "error", err)
		return
	}
	st.counter, st.epoch, st.lastRekey = r.Counter, r.Epoch, time.Now()
	c.activateAtLocked(st, group, r.Epoch, r.ActivateAt)
	if prev != 0 && prev != r.Epoch {
		c.opts.Ring.SetSendUntil(group, prev, r.PrevSendUntil)
		ring := c.opts.Ring
		st.timers = append(st.timers, time.AfterFunc(time.Until(r.PrevOpenUntil), func() { ring.Retire(group, prev) }))
	}
	c.freshLocked(st, group)
	c.log.Info("rekeyed", "group", group, "epoch", r.Epoch, "activate_at", r.ActivateAt)
}

// retireSupersededLocked bounds the life of the epochs a join response
// supersedes. A member that rejoins to catch up (it missed a rekey, or an
// lkh rekey's gap) never got that rekey's prev_open_until, and the rekey may
// have been a revocation: the older epochs it holds are retired after
// max_staleness (long enough to read what the broker queued under them), so
// that a revoked member cannot go on injecting under them.
func (c *Client) retireSupersededLocked(st *groupState, group string, current uint32) {
	ring := c.opts.Ring
	for _, e := range ring.Epochs(group) {
		if e == current {
			continue
		}
		ring.SetSendUntil(group, e, time.Now())
		c.log.Info("an epoch superseded by a join is retired after max_staleness", "group", group, "epoch", e, "current", current, "after", c.opts.MaxStaleness)
		st.timers = append(st.timers, time.AfterFunc(c.opts.MaxStaleness, func() { ring.Retire(group, e) }))
	}
}

// lkhMember builds an lkh member from the path keys of a join response,
// whose root must be the key and epoch the response hands out.
func lkhMember(r gkd.JoinResponse) (*gkd.LKHMember, error) {
	p, err := gkd.ParseLKHPath(r.Ext)
	if err != nil {
		return nil, err
	}
	m, err := gkd.NewLKHMember(p)
	if err != nil {
		return nil, err
	}
	if v, k := m.GroupKey(); v != r.Epoch || k != r.Key {
		return nil, fmt.Errorf("path root is epoch %d, the response's epoch %d or key differs", v, r.Epoch)
	}
	return m, nil
}

// onGroupRekey applies one chunk of an lkh rekey. The chunks of one rekey
// share a counter: the first must be newer than anything seen, the others
// may repeat it.
func (c *Client) onGroupRekey(msg *gkd.Message) {
	r, err := gkd.ParseGroupRekey(msg.Body)
	if err != nil {
		c.log.Warn("dropped a malformed group rekey", "error", err)
		return
	}
	h, err := gkd.ParseLKHChunkHeader(r.Chunk)
	if err != nil {
		c.log.Warn("dropped a group rekey with a malformed chunk", "error", err)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	group, ok := c.gids[r.Group]
	if !ok {
		return
	}
	st := c.state[group]
	if !st.joined || st.lkh == nil {
		return
	}
	if r.Counter <= st.counter && (st.rekeyCounter == 0 || r.Counter != st.rekeyCounter) {
		if r.Counter == st.counter {
			return // the rekey that admitted this member: its join response covered it
		}
		c.log.Warn("dropped an old or replayed group rekey", "group", group, "counter", r.Counter, "have", st.counter)
		return
	}
	st.counter, st.rekeyCounter = max(st.counter, r.Counter), r.Counter
	prev, _ := st.lkh.GroupKey()
	if h.Counter <= prev {
		return // a rekey this member's join already covered
	}
	if h.Counter > prev+1 {
		// A rekey between this one and our keys never arrived: the wrapped
		// keys may be under keys we lack. Join again for the current path.
		c.log.Warn("group rekey skips one this sidecar lacks: rejoining", "group", group, "rekey", h.Counter, "have", prev)
		st.joined, st.lkh = false, nil
		go c.join(group)
		return
	}
	if _, err := st.lkh.Apply(r.Chunk); err != nil {
		c.log.Warn("a group rekey did not fully apply", "group", group, "rekey", h.Counter, "error", err)
	}
	epoch, key := st.lkh.GroupKey()
	if epoch == prev {
		return // a chunk for other members
	}
	if err := c.opts.Ring.Install(group, epoch, envelope.GroupKey(key), st.sender, false); err != nil {
		c.log.Error("installing a rekey failed", "group", group, "error", err)
		return
	}
	st.epoch, st.lastRekey = epoch, time.Now()
	c.activateAtLocked(st, group, epoch, r.ActivateAt)
	if prev != 0 {
		c.opts.Ring.SetSendUntil(group, prev, r.PrevSendUntil)
		ring := c.opts.Ring
		st.timers = append(st.timers, time.AfterFunc(time.Until(r.PrevOpenUntil), func() { ring.Retire(group, prev) }))
	}
	c.freshLocked(st, group)
	c.log.Info("rekeyed", "group", group, "epoch", epoch, "activate_at", r.ActivateAt)
}

// activateAtLocked switches sealing to epoch at the given time.
func (c *Client) activateAtLocked(st *groupState, group string, epoch uint32, at time.Time) {
	ring := c.opts.Ring
	st.timers = append(st.timers, time.AfterFunc(time.Until(at), func() {
		if err := ring.Activate(group, epoch); err != nil {
			c.log.Warn("activating an epoch failed", "group", group, "epoch", epoch, "error", err)
		}
	}))
}

func (c *Client) onHeartbeat(msg *gkd.Message) {
	h, err := gkd.ParseHeartbeat(msg.Body)
	if err != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	group, ok := c.gids[h.Group]
	if !ok {
		return
	}
	st := c.state[group]
	if !st.joined || h.Counter <= st.counter {
		return
	}
	st.counter = h.Counter
	st.lastBeat = time.Now()
	if h.Epoch == st.epoch {
		c.freshLocked(st, group)
	}
	if h.Epoch != st.epoch || c.rosterBehindLocked(st, group, h.Roster) {
		// A rekey or a roster this member never got (lost, or hidden by the
		// broker): join again for the current key and roster.
		c.log.Warn("heartbeat names an epoch or roster this sidecar lacks: rejoining", "group", group,
			"epoch", h.Epoch, "have", st.epoch, "roster", h.Roster, "sender_auth", st.senderAuth)
		st.joined = false
		go c.join(group)
	}
}

func (c *Client) freshLocked(st *groupState, group string) {
	c.opts.Ring.FreshUntil(group, time.Now().Add(c.opts.MaxStaleness))
}

// GroupName returns the name of a group this client joins, by its id.
func (c *Client) GroupName(id [8]byte) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	name, ok := c.gids[id]
	return name, ok
}

// AddGroups joins more groups while running (a reloaded configuration that
// protects a group it did not name before): their broadcast topics are
// subscribed on the current connection (and every later one) and they are
// joined; unanswered joins are resent like the others. The newest policy is
// handed to OnPolicy again, since it can now name those groups.
func (c *Client) AddGroups(groups ...string) {
	c.mu.Lock()
	var added []string
	for _, g := range groups {
		if _, ok := c.state[g]; ok {
			continue
		}
		c.gids[gkd.GroupID(c.server, g)] = g
		c.state[g] = &groupState{}
		c.opts.Groups = append(c.opts.Groups, g)
		added = append(added, g)
	}
	conn, policy := c.conn, c.policy
	c.mu.Unlock()
	if len(added) == 0 {
		return
	}
	c.log.Info("joining groups added by a reload", "groups", added)
	if conn != nil {
		subs := map[string]byte{}
		for _, g := range added {
			subs[gkd.GroupTopic(c.opts.TopicPrefix, gkd.GroupID(c.server, g))] = 1
		}
		tok := conn.SubscribeMultiple(subs, func(_ paho.Client, m paho.Message) { c.onMessage(m.Payload()) })
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			// The next connection subscribes them; joins are retried until then.
			c.log.Warn("subscribing to added groups failed; retrying with the next connection", "error", tok.Error())
		}
		for _, g := range added {
			c.join(g)
		}
	}
	if policy != nil && c.opts.OnPolicy != nil {
		c.opts.OnPolicy(*policy)
	}
}

// WaitJoined waits until every group is joined, or one was refused.
func (c *Client) WaitJoined(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		c.cond.Broadcast()
		c.mu.Unlock()
	})
	defer stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		all := true
		for g, st := range c.state {
			if st.refused != "" {
				return fmt.Errorf("group %q: %w: %s", g, ErrRefused, st.refused)
			}
			all = all && c.readyLocked(g, st)
		}
		if all {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("joining groups: %w", err)
		}
		c.cond.Wait()
	}
}

// Status reports each group's state, for logs and health checks.
func (c *Client) Status() []GroupStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []GroupStatus
	for _, g := range c.opts.Groups {
		st := c.state[g]
		out = append(out, GroupStatus{Group: g, Joined: c.readyLocked(g, st), Epoch: st.epoch, Sender: st.sender, LastRekey: st.lastRekey, LastBeat: st.lastBeat, Refused: st.refused, Revoked: st.revoked, JoinLatency: st.joinLatency})
	}
	return out
}

// Abandon stops the client as a crash would: no leave is sent, nothing
// reconnects, and the connection is left open, not closed cleanly (tests
// then cut it underneath, so the broker publishes the Will).
func (c *Client) Abandon() {
	c.mu.Lock()
	c.closed = true
	for _, st := range c.state {
		for _, t := range st.timers {
			t.Stop()
		}
		if st.slot != nil {
			st.slot.stop()
		}
	}
	c.mu.Unlock()
	c.cancel()
	<-c.done
}

// Close leaves every group (a clean shutdown is a leave) and disconnects.
func (c *Client) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	for _, st := range c.state {
		for _, t := range st.timers {
			t.Stop()
		}
		if st.slot != nil {
			st.slot.stop()
		}
	}
	conn := c.conn
	c.mu.Unlock()
	if conn != nil && conn.IsConnectionOpen() {
		msg, _, err := c.build(gkd.TypeLeave, gkd.Leave{ConnID: c.currentConnID(), Reason: gkd.LeaveShutdown})
		if err == nil {
			conn.Publish(gkd.RequestTopic(c.opts.TopicPrefix, c.server, c.me), 1, false, msg).WaitTimeout(2 * time.Second)
		}
	}
	c.cancel()
	if conn != nil {
		conn.Disconnect(100) // a clean DISCONNECT: the broker discards the Will
	}
	<-c.done
}
