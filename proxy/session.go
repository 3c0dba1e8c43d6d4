package proxy

// Session mode: every local app connection gets an upstream connection of
// its own, and the sidecar relays packets between the two, sealing and
// opening payloads on the way.
//
// A connection travels through these files in this order:
//
//  1. session.go: accept; the app's CONNECT (local authentication, client
//     id mapping, upstream credentials, the Will sealed on a protected
//     topic); dial upstream and relay the handshake (AUTH included); the
//     broker's CONNACK back to the app (maximum packet size lowered by what
//     sealing adds). Then the two directions run until either side ends.
//  2. sessionout.go: the app's packets to upstream. PUBLISH: topic alias
//     resolved, policy, sealed (confidential MQTT 5 properties inside).
//     The app's PUBACK/PUBREC of a delivery first marks the session's
//     replay state. Everything else passes as it came.
//  3. sessionin.go: upstream's packets to the app. PUBLISH: opened, replay
//     check against the session's state (sessionstate.go), properties
//     restored. Everything else passes as it came.
//
// Acknowledgements are end to end: the app's publish is acknowledged by the
// broker's PUBACK, relayed; the broker's delivery by the app's PUBACK,
// relayed. The sidecar holds no message, so whichever process dies, the one
// that did not get an acknowledgement sends again. Sessions, subscriptions,
// retained messages, Wills, shared subscriptions and message expiry are the
// broker's. The sidecar answers for itself only what it refuses or drops (a
// denied topic, an envelope that fails to open, a replay).
//
// When the app's connection ends without DISCONNECT, the upstream one is
// closed without DISCONNECT too, so the broker publishes the app's Will; when
// the sidecar dies, the kernel closes both, with the same effect.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smqtt/smqtt/envelope"
)

const (
	// connectWait bounds the wait for an app's CONNECT after it connects.
	connectWait = 10 * time.Second
	// sessionReadBuffer is the largest read buffer of each side of a
	// relayed connection; it starts small (growingReader), so an idle
	// app connection holds little.
	sessionReadBuffer = 32 << 10
	// sealGrowthMax is the most sealing can add to a PUBLISH: the envelope's
	// 38 bytes, up to 4 for the sealed properties' length, up to 3 for a
	// longer remaining length. The app is told the broker's maximum packet
	// size less this, so a publish it may send still fits once sealed.
	sealGrowthMax = envelope.Overhead + 4 + 3
)

// Credentials are what an app's upstream session logs in with.
type Credentials struct {
	Username string
	Password string
}

// relay is the sidecar's session mode.
type relay struct {
	sc  *Sidecar
	log *slog.Logger
	url *url.URL
	lns []net.Listener

	mu     sync.Mutex
	conns  map[*appConn]struct{}
	closed bool
	wg     sync.WaitGroup

	upOK     atomic.Bool  // the last upstream dial succeeded
	upProbed atomic.Int64 // UnixNano of the last probe
	sessions atomic.Int64 // connections relayed now
}

func newRelay(sc *Sidecar, lns []net.Listener) (*relay, error) {
	u, err := url.Parse(sc.opts.Upstream.URL)
	if err != nil {
		return nil, fmt.Errorf("proxy: upstream URL %q: %w", sc.opts.Upstream.URL, err)
	}
	return &relay{sc: sc, log: sc.log, url: u, lns: lns, conns: make(map[*appConn]struct{})}, nil
}

func (r *relay) start() {
	for _, ln := range r.lns {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.accept(ln)
		}()
	}
}

func (r *relay) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			r.mu.Lock()
			closed := r.closed
			r.mu.Unlock()
			if closed {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			r.log.Warn("accepting a local connection failed", "addr", ln.Addr().String(), "error", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.serve(c)
		}()
	}
}

// close stops accepting and ends every relayed connection the way the host
// dying would: the broker publishes the apps' Wills.
func (r *relay) close() {
	r.mu.Lock()
	r.closed = true
	conns := make([]*appConn, 0, len(r.conns))
	for a := range r.conns {
		conns = append(conns, a)
	}
	r.mu.Unlock()
	for _, ln := range r.lns {
		ln.Close()
	}
	for _, a := range conns {
		a.abort()
	}
	r.wg.Wait()
}

// connected reports whether upstream is reachable: a relayed connection is
// up, or a dial succeeded within the last second.
func (r *relay) connected() bool {
	if r.sessions.Load() > 0 && r.upOK.Load() {
		return true
	}
	if time.Since(time.Unix(0, r.upProbed.Load())) < time.Second {
		return r.upOK.Load()
	}
	r.upProbed.Store(time.Now().UnixNano())
	err := r.probe()
	if err != nil {
		r.log.Debug("upstream probe failed", "url", r.url.Redacted(), "error", err)
	}
	r.setUp(err == nil)
	return err == nil
}

// probe connects to upstream as the sidecar itself (upstream.client_id, a
// clean session) and disconnects: upstream is reachable if it answers with
// a CONNACK, whatever the CONNACK says (apps log in with their own
// credentials).
func (r *relay) probe() error {
	o := r.sc.opts.Upstream
	po := o.Paho(o.ClientID)
	c, err := dialBridge(r.url, po, 0)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(po.ConnectTimeout))
	cp := appConnect{protoName: []byte("MQTT"), version: 4, flags: connectClean, keepAlive: 30, clientID: o.ClientID}
	if o.Username != "" {
		cp.username = []byte(o.Username)
	}
	if o.Password != "" {
		cp.password = []byte(o.Password)
	}
	if _, err := c.Write(cp.append(nil)); err != nil {
		return err
	}
	var scratch []byte
	first, _, err := readPacket(c, &scratch, false)
	if err != nil {
		return err
	}
	if first>>4 != typeConnack {
		return fmt.Errorf("%w: upstream answered CONNECT with a packet of type %d", errMalformed, first>>4)
	}
	_, err = c.Write(disconnectFor(false, 0))
	return err
}

// setUp records whether upstream was reachable at the last dial.
func (r *relay) setUp(ok bool) {
	r.upOK.Store(ok)
	if ok {
		r.sc.metrics.Connected.Set(1)
	} else {
		r.sc.metrics.Connected.Set(0)
	}
}

// appConn is one relayed app connection and its upstream connection.
type appConn struct {
	r       *relay
	sc      *Sidecar
	local   *batchedConn
	up      *batchedConn
	v5      bool
	version byte
	appID   string // the client id the app connected with (or was assigned)
	upID    string // the upstream client id
	conn    uint64 // the state's connection number
	sess    *sessionState
	expiry  uint32 // session expiry interval when the connection ends

	// Limits: the most the app takes in one packet (0: no limit), and
	// the most upstream takes.
	appMaxPacket uint32
	upMaxPacket  uint32
	toldMax      uint32 // the maximum packet size the app was told (0: none)
	aliasMax     uint16 // topic aliases the app may use (the broker's)

	// outbound (the app's reader)
	outAliases map[uint16]string
	ownedOut2  map[uint16]bool // refused QoS 2 publishes of an MQTT 3.1.1 app: their PUBREL is answered here
	sealBuf    []byte
	plainBuf   []byte
	outBuf     []byte
	batch      proofBatch // sender_auth: sealed publishes waiting for their proof

	// inbound (upstream's reader)
	inAliases map[uint16]string
	ownedIn2  map[uint16]bool // QoS 2 deliveries the sidecar dropped and acknowledged: their PUBREL is answered here
	openBuf   []byte
	inBuf     []byte

	mu      sync.Mutex
	pending map[uint16]sessionMark // deliveries the app has not acknowledged, by packet id
	marks   map[sessionMark]int
	subReqs map[uint16][]string // SUBSCRIBE and UNSUBSCRIBE in flight, by packet id
	unsubs  map[uint16]bool     // which of them are UNSUBSCRIBEs

	closeOnce sync.Once
	cleanEnd  atomic.Bool // the app sent DISCONNECT
}

// serve runs one app connection from its CONNECT to its end.
func (r *relay) serve(c net.Conn) {
	local := newBatchedConn(c, -sessionReadBuffer, localWriteTimeout)
	a := &appConn{r: r, sc: r.sc, local: local}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		local.Close()
		return
	}
	r.conns[a] = struct{}{}
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.conns, a)
		r.mu.Unlock()
	}()
	if err := a.handshake(); err != nil {
		r.log.Debug("local connection ended before its session began", "remote", c.RemoteAddr().String(), "error", err)
		a.abort()
		return
	}
	r.sessions.Add(1)
	r.sc.metrics.Sessions.Inc()
	defer func() {
		r.sessions.Add(-1)
		r.sc.metrics.Sessions.Dec()
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.runIn()
	}()
	a.runOut()
	<-done
	a.sc.state.closeSession(a.sess, a.conn, a.expiry)
}

// abort closes both connections without DISCONNECT.
func (a *appConn) abort() {
	a.closeOnce.Do(func() {
		if a.up != nil {
			a.up.Close()
		}
		a.local.Close()
	})
}

// handshake reads the app's CONNECT, opens its upstream session and answers
// the app with upstream's CONNACK.
func (a *appConn) handshake() error {
	var scratch []byte
	_ = a.local.SetReadDeadline(time.Now().Add(connectWait))
	first, body, err := readPacket(a.local, &scratch, true)
	if err != nil {
		return err
	}
	if first != typeConnect<<4 {
		return fmt.Errorf("%w: first packet of type %d, not CONNECT", errMalformed, first>>4)
	}
	cp, err := parseConnect(body)
	if errors.Is(err, errUnsupportedVersion) {
		// What a 3.1.1 broker answers a version it does not speak.
		a.local.Write(appConnack{code: 1}.append(nil, false))
		return err
	}
	if err != nil {
		return err
	}
	a.v5, a.version = cp.v5(), cp.version
	if code, ok := a.authenticate(cp); !ok {
		a.refuse(code)
		return errors.New("local authentication failed")
	}
	up, code, err := a.upstreamConnect(cp)
	if err != nil {
		a.refuse(code)
		return err
	}

	a.r.upProbed.Store(time.Now().UnixNano())
	conn, err := dialBridge(a.r.url, a.sc.opts.Upstream.Paho(a.upID), -sessionReadBuffer)
	a.r.setUp(err == nil)
	if err != nil {
		a.sc.limitedWarn("session-dial", "upstream unreachable: refusing a local app", "url", a.r.url.Redacted(), "client", a.appID, "error", err)
		a.refuse(codeServerUnavailable)
		return err
	}
	a.up = conn.(*batchedConn)
	_ = a.up.SetReadDeadline(time.Now().Add(a.sc.opts.Upstream.Paho("").ConnectTimeout))
	if _, err := a.up.Write(up.append(nil)); err != nil {
		a.refuse(codeServerUnavailable)
		return err
	}
	ack, err := a.relayAuth(&scratch)
	if err != nil {
		a.refuse(codeServerUnavailable)
		return err
	}
	if ack.refused() {
		a.local.Write(ack.append(nil, a.v5))
		return fmt.Errorf("upstream refused the session: code 0x%02x", ack.code)
	}
	a.begin(cp, up, &ack)
	_ = a.up.SetReadDeadline(time.Time{})
	_ = a.local.SetReadDeadline(time.Time{})
	if _, err := a.local.Write(ack.append(nil, a.v5)); err != nil {
		return err
	}
	return nil
}

// CONNACK codes the sidecar answers with itself.
const (
	codeServerUnavailable = 0x88 // 3.1.1: 3
	codeBadCredentials    = 0x86 // 3.1.1: 4
	codeNotAuthorized     = 0x87 // 3.1.1: 5
)

// refuse answers the app's CONNECT with a refusal (MQTT 5 reason code,
// mapped to 3.1.1's return codes).
func (a *appConn) refuse(code byte) {
	if code == 0 {
		return
	}
	if !a.v5 {
		switch code {
		case codeBadCredentials:
			code = 4
		case codeNotAuthorized:
			code = 5
		default:
			code = 3
		}
	}
	a.local.Write(appConnack{code: code}.append(nil, a.v5))
}

// authenticate checks the app against sidecar.auth.users, when there are
// any.
func (a *appConn) authenticate(cp *appConnect) (byte, bool) {
	users := a.sc.opts.Users
	if len(users) == 0 {
		return 0, true
	}
	pw, ok := users[string(cp.username)]
	if !ok || !constantTimeEqual(pw, string(cp.password)) {
		a.sc.limitedWarn("auth", "local client refused: bad username or password", "client", cp.clientID, "remote", a.local.RemoteAddr().String())
		return codeBadCredentials, false
	}
	return 0, true
}

// upstreamConnect derives the upstream CONNECT from the app's: client id
// mapped, credentials mapped, the Will sealed, the properties adjusted. On
// a refusal it returns the CONNACK code to answer the app with.
func (a *appConn) upstreamConnect(cp *appConnect) (*appConnect, byte, error) {
	up := *cp
	a.appID = cp.clientID
	prefix := a.sc.opts.ClientIDPrefix
	switch {
	case cp.clientID == "" && prefix != "":
		// The app asks the server to name it. Named here, so that the
		// name it is told maps to the same upstream id when it comes back.
		var b [8]byte
		rand.Read(b[:])
		a.appID = "smqtt-" + hex.EncodeToString(b[:])
		up.clientID = prefix + a.appID
	case cp.clientID != "":
		up.clientID = prefix + cp.clientID
	}
	a.upID = up.clientID
	if creds, ok := a.sc.opts.UpstreamCredentials[string(cp.username)]; ok {
		up.username, up.password = []byte(creds.Username), []byte(creds.Password)
		if creds.Username == "" {
			up.username = nil
		}
		if creds.Password == "" {
			up.password = nil
		}
	}
	if a.v5 {
		// The broker sends whole topics: the sidecar must read the topic
		// of every message it opens. A larger maximum packet size leaves
		// room for what sealing added to what the app can take.
		up.props = withoutProps(nil, cp.props, func(id byte) bool { return id == propTopicAliasMaximum })
		if v, ok := propU32(cp.props, propMaximumPacketSize); ok {
			a.appMaxPacket = v
			up.props = setU32Prop(up.props, propMaximumPacketSize, uint32(min(uint64(v)+uint64(a.sc.sealGrowth()), 1<<32-1)))
		}
		a.expiry, _ = propU32(cp.props, propSessionExpiry)
	} else if !cp.clean() {
		a.expiry = noExpiry
	}
	if cp.hasWill() {
		if code, err := a.sealWill(&up); err != nil {
			return nil, code, err
		}
	}
	return &up, 0, nil
}

// sealWill seals the Will of a CONNECT on a protected topic, so that the
// broker holds only its envelope; a Will on a topic the policy refuses
// refuses the connection.
func (a *appConn) sealWill(up *appConnect) (byte, error) {
	topic := up.willTopic
	group, protected := a.sc.policy.Group(topic)
	if !protected {
		if a.sc.deny.Load() {
			a.sc.metrics.drop("out", DropDenied)
			return codeNotAuthorized, fmt.Errorf("will topic %q: %w", topic, errDenied)
		}
		return 0, nil
	}
	sealer, err := a.sc.sealerFor(group)
	if err != nil && a.sc.opts.NoKeyWait > 0 {
		sealer, err = a.sc.waitSealer(group)
	}
	if err != nil {
		a.sc.metrics.drop("out", DropNoKey)
		a.sc.log.Warn("no key for a Will's protected topic: connection refused", "client", a.appID, "topic", topic, "group", group, "error", err)
		return codeServerUnavailable, errNoKey
	}
	flags := envelope.FlagWill
	if up.willRetain() {
		flags |= envelope.FlagRetain
	}
	inner, outer := splitSealedProps(up.willProps)
	plain := up.willPayload
	if len(inner) > 0 {
		flags |= envelope.FlagProps
		plain = envelope.AppendProps(nil, inner, up.willPayload)
	}
	sealed, err := a.sc.sealAlone(nil, sealer, topic, flags, plain)
	if err != nil {
		return codeServerUnavailable, fmt.Errorf("seal the Will on %q: %w", topic, err)
	}
	up.willProps, up.willPayload = outer, sealed
	a.sc.countOut(true)
	return 0, nil
}

// splitSealedProps splits MQTT 5 properties into those that travel sealed
// and the others (a topic alias dropped: the relay resolves it).
func splitSealedProps(props []byte) (inner, outer []byte) {
	forEachProp(props, func(id byte, p []byte) {
		switch {
		case envelope.SealedProperty(id):
			inner = append(inner, p...)
		case id == propTopicAlias:
		default:
			outer = append(outer, p...)
		}
	})
	return inner, outer
}

// relayAuth relays MQTT 5 enhanced authentication (AUTH packets) between
// the app and upstream until upstream answers with a CONNACK.
func (a *appConn) relayAuth(scratch *[]byte) (appConnack, error) {
	for {
		first, body, err := readPacket(a.up, scratch, true)
		if err != nil {
			return appConnack{}, fmt.Errorf("upstream %s: waiting for CONNACK: %w", a.r.url.Redacted(), err)
		}
		switch first >> 4 {
		case typeConnack:
			return parseConnack(body, a.v5)
		case typeAuth:
			if !a.v5 {
				break
			}
			if _, err := a.local.Write(appendPacket(nil, first, body)); err != nil {
				return appConnack{}, err
			}
			lf, lb, err := readPacket(a.local, scratch, true)
			if err != nil {
				return appConnack{}, err
			}
			if _, err := a.up.Write(appendPacket(nil, lf, lb)); err != nil {
				return appConnack{}, err
			}
			continue
		}
		return appConnack{}, fmt.Errorf("%w: upstream answered CONNECT with a packet of type %d", errMalformed, first>>4)
	}
}

// begin takes upstream's CONNACK: the session's replay state, the limits,
// and the CONNACK the app gets.
func (a *appConn) begin(cp, up *appConnect, ack *appConnack) {
	name := a.upID
	if a.v5 {
		if v, ok := propU32(ack.props, propSessionExpiry); ok {
			a.expiry = v // the broker's word
		}
		if v, ok := findProp(ack.props, propAssignedClientID); ok && name == "" && len(v) >= 2 {
			name = string(v[2:])
		}
		if v, ok := propU32(ack.props, propMaximumPacketSize); ok {
			a.upMaxPacket = v
			a.toldMax = uint32(max(int64(v)-a.sc.sealGrowth(), 1))
			ack.props = setU32Prop(ack.props, propMaximumPacketSize, a.toldMax)
		}
		if v, ok := findProp(ack.props, propTopicAliasMaximum); ok && len(v) == 2 {
			a.aliasMax = uint16(v[0])<<8 | uint16(v[1])
		}
		if a.appID != cp.clientID { // named here: the app is told its name
			ack.props = append(append(ack.props, propAssignedClientID), appendString(nil, a.appID)...)
		}
	}
	if name == "" { // an anonymous clean session: nothing to resume, ever
		var b [8]byte
		rand.Read(b[:])
		name = "\x00anonymous-" + hex.EncodeToString(b[:])
	}
	a.sess = a.sc.state.openSession(name, ack.sessionPresent, a.expiry > 0, a.expiry)
	a.conn = a.sess.connection
	a.outAliases = make(map[uint16]string)
	a.inAliases = make(map[uint16]string)
	a.ownedOut2 = make(map[uint16]bool)
	a.ownedIn2 = make(map[uint16]bool)
	a.pending = make(map[uint16]sessionMark)
	a.marks = make(map[sessionMark]int)
	a.subReqs = make(map[uint16][]string)
	a.unsubs = make(map[uint16]bool)
	// Replay marks reach the log before the packets that depend on them
	// reach either socket: a delivery's host-wide mark before the app has
	// it, an acknowledgement's session mark before the broker does.
	commit := a.sc.state.commit
	a.local.barrier.Store(&commit)
	a.up.barrier.Store(&commit)
}

// isPending reports whether the connection delivered m and awaits the
// app's acknowledgement.
func (a *appConn) isPending(m sessionMark) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.marks[m] > 0
}

// sessionContext is a context ended with the sidecar.
func (a *appConn) ctx() context.Context { return a.sc.ctx }
