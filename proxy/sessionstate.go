package proxy

// Replay state in session mode: one set of replay windows per app session.
//
// Every app session has its own upstream session, so an envelope reaches
// the sidecar once for every app subscribed to its topic, and each app must
// get it once. The rules, per session:
//
//   - A live message is delivered if its (group, epoch, sender, seq) is new
//     in the session's window. The window is marked when the app has the
//     message: on its PUBACK (QoS 1) or PUBREC (QoS 2), or on delivery (QoS
//     0). A message delivered and not yet acknowledged is held as pending by
//     the connection; a copy arriving meanwhile is refused. So a redelivery
//     after a crash or a cut (the broker resends what the app never
//     acknowledged) gets through once, and a replay of anything the app
//     acknowledged never does.
//   - A session begins with a floor: the host-wide windows (state.go) as they
//     were when the session began, which hold every envelope that reached
//     this host. A broker cannot replay to a new session (a clean one after a
//     restart, say) what this host received before the session existed: the
//     broker processed it before the session subscribed, so it was never the
//     session's to receive.
//   - An MQTT 5 broker delivers one copy per matching subscription (Mosquitto
//     does): a session may take a message once per subscription of its that
//     matches the topic ("slots"), each slot with its own window.
//   - Wills (FlagWill) were sealed when their app connected, so their seq is
//     older than everything their sender sealed since: they go through a
//     register of triples instead of the windows, with the same floor rule
//     (a Will this host saw before the session began is refused).
//   - Retained deliveries go through a register per session and topic, with
//     the same floor rule: a value older than one this session had, or than
//     the one this host knew when the session began, is refused (a broker
//     cannot roll a topic back). Per session because the relayed
//     connections run side by side: a session may legitimately be offered
//     the value that was current when it subscribed after another session
//     already had a newer one.
//
// A persistent session's state is logged in inbound.log and survives a
// restart; a clean session's lives in memory and ends with its connection.
// Log frames (inboundlog.go has the framing; integers little endian):
//
//	 5 session begin   sid u64 ‖ gen u64 ‖ nameLen u16 ‖ name
//	 6 session end     sid u64
//	 7 session floor   sid u64 ‖ key ‖ window
//	 8 session window  sid u64 ‖ slot u8 ‖ key ‖ window
//	 9 session accept  sid u64 ‖ slot u8 ‖ key ‖ n u16 ‖ n × seq u64
//	10 session sub     sid u64 ‖ add u8 ‖ filterLen u16 ‖ filter
//	11 session left    sid u64 ‖ expiry u32 ‖ at i64 (unix seconds; 0: connected)
//	12 will seen       epoch u32 ‖ sender u64 ‖ seq u64 ‖ gen u64
//	13 session will    sid u64 ‖ epoch u32 ‖ sender u64 ‖ seq u64
//	14 session forget  sid u64 ‖ slot u8 ‖ key

import (
	"encoding/binary"
	"fmt"
	"strings"
	"time"

	"github.com/smqtt/smqtt/config"
	"github.com/smqtt/smqtt/envelope"
)

const (
	frameKindSessionBegin  = 5
	frameKindSessionEnd    = 6
	frameKindSessionFloor  = 7
	frameKindSessionWindow = 8
	frameKindSessionAccept = 9
	frameKindSessionSub    = 10
	frameKindSessionLeft   = 11
	frameKindWillSeen      = 12
	frameKindSessionWill   = 13
	frameKindSessionForget = 14

	// maxSlots bounds the copies of one message a session may take (one
	// per matching subscription).
	maxSlots = 16
	// maxSessionFilters bounds the filters a session's state records for
	// counting slots; past it, further ones count as none.
	maxSessionFilters = 4096
	// maxWillsSeen bounds the host-wide register of Wills.
	maxWillsSeen = 1 << 16
	// retainedHistory is how many of a topic's latest retained values the
	// host keeps with the generation they came in, to find a session's
	// floor; a session older than all of them gets the oldest (stricter).
	retainedHistory = 8
	// maxSessionRetained bounds the topics a session's retained register
	// holds; past it, one is forgotten (its floor applies again).
	maxSessionRetained = 1 << 16
	// noExpiry is MQTT 5's session expiry that never ends (and MQTT 3.1.1's
	// persistent session).
	noExpiry = 0xffffffff
)

// sessionState is the replay state of one app session, named by its
// upstream client id. Its fields are guarded by the replayState's mu.
type sessionState struct {
	id         uint64 // in the log
	name       string
	logged     bool   // persistent: its state is in the log
	gen        uint64 // the host generation it began in
	expiry     uint32 // session expiry interval, seconds
	leftAt     int64  // unix seconds its last connection ended; 0 while connected
	floor      map[senderKey]*envelope.ReplayWindow
	windows    map[slotKey]*sessionWindow
	perGroup   map[string]int
	wills      map[retainedTriple]uint8  // Wills the app has had, and how many copies
	subs       map[string]bool           // filters subscribed ($share/… ones included)
	retained   map[string]retainedTriple // the newest retained value of each topic it had
	connection uint64                    // the connection that holds it now
}

type slotKey struct {
	senderKey
	slot uint8
}

type sessionWindow struct {
	envelope.ReplayWindow
	lastUse uint64
}

// sessionMark is what one delivery marks once the app has it.
type sessionMark struct {
	will   bool
	slot   uint8
	key    senderKey
	seq    uint64
	triple retainedTriple // Wills
}

// openSession returns the state of the app session name for a connection
// that upstream just accepted: the session it resumes when upstream says
// one is present and this host holds it, else a new one (replacing any
// other of that name). logged says whether it must survive a restart.
func (st *replayState) openSession(name string, present, logged bool, expiry uint32) *sessionState {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.expireSessionsLocked(time.Now())
	st.connections++
	if s := st.sessions[name]; s != nil && present {
		s.connection = st.connections
		s.expiry, s.leftAt = expiry, 0
		if logged && !s.logged {
			st.logSessionLocked(s) // a session that was clean on its last connection
		} else if s.logged {
			st.pend = appendSessionLeft(st.closeRun(), s.id, expiry, 0)
		}
		return s
	}
	if old := st.sessions[name]; old != nil {
		st.dropSessionLocked(old)
	}
	st.gen++
	st.lastSID++
	s := &sessionState{
		id: st.lastSID, name: name, gen: st.gen, expiry: expiry,
		floor:      make(map[senderKey]*envelope.ReplayWindow, len(st.windows)),
		windows:    make(map[slotKey]*sessionWindow),
		perGroup:   make(map[string]int),
		wills:      make(map[retainedTriple]uint8),
		subs:       make(map[string]bool),
		retained:   make(map[string]retainedTriple),
		connection: st.connections,
	}
	for k, w := range st.windows {
		if w.highest() > 0 {
			w.shared = true
			s.floor[k] = w.ReplayWindow
		}
	}
	st.sessions[name] = s
	st.sessionsByID[s.id] = s
	if logged {
		st.logSessionLocked(s)
	}
	return s
}

func (w *senderWindow) highest() uint64 { return w.Highest() }

// logSessionLocked writes a session's whole state to the log and marks it
// logged.
func (st *replayState) logSessionLocked(s *sessionState) {
	s.logged = true
	st.pend = appendSessionFrames(st.closeRun(), s)
}

// closeRun closes the open accepted frame and returns the pending frames,
// for a caller that appends one.
func (st *replayState) closeRun() []byte {
	st.closeRunLocked()
	return st.pend
}

// closeSession records that the connection holding s ended. A session the
// broker keeps (expiry > 0) is kept until it expires; any other is gone.
func (st *replayState) closeSession(s *sessionState, connection uint64, expiry uint32) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.sessions[s.name] != s || s.connection != connection {
		return // taken over: the newer connection holds it
	}
	if expiry == 0 {
		st.dropSessionLocked(s)
		return
	}
	s.expiry, s.leftAt = expiry, time.Now().Unix()
	if s.logged {
		st.pend = appendSessionLeft(st.closeRun(), s.id, s.expiry, s.leftAt)
	}
}

func (st *replayState) dropSessionLocked(s *sessionState) {
	delete(st.sessions, s.name)
	delete(st.sessionsByID, s.id)
	if s.logged {
		st.pend = appendSessionEnd(st.closeRun(), s.id)
	}
}

// expireSessionsLocked forgets the sessions whose expiry has passed since
// their connection ended (the broker has forgotten them too).
func (st *replayState) expireSessionsLocked(now time.Time) {
	if now.Sub(st.lastExpiry) < time.Second {
		return
	}
	st.lastExpiry = now
	for _, s := range st.sessions {
		if s.leftAt != 0 && s.expiry != noExpiry && now.Unix() > s.leftAt+int64(s.expiry) {
			st.dropSessionLocked(s)
		}
	}
}

// sessionSubscribed records a subscription the broker granted (add) or one
// the app unsubscribed from. Subscribing to a filter again replaces the
// subscription: the set of filters is what counts.
func (st *replayState) sessionSubscribed(s *sessionState, filter string, add bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if s.subs[filter] == add || add && len(s.subs) >= maxSessionFilters {
		return
	}
	if add {
		s.subs[filter] = true
	} else {
		delete(s.subs, filter)
	}
	if s.logged {
		st.pend = appendSessionSub(st.closeRun(), s.id, filter, add)
	}
}

// subscribedFilter names a subscription by what it matches: a shared
// subscription ($share/group/filter) by its filter.
func subscribedFilter(filter string) string {
	if rest, ok := strings.CutPrefix(filter, "$share/"); ok {
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			return rest[i+1:]
		}
	}
	return filter
}

// slotsLocked is how many copies of a message on topic the session may
// take: one per subscription of its that matches (at least one).
func (s *sessionState) slotsLocked(topic string, perSubscription bool) int {
	if !perSubscription {
		return 1
	}
	n := 0
	for f := range s.subs {
		if config.MatchFilter(subscribedFilter(f), topic) {
			n++
		}
	}
	return min(max(n, 1), maxSlots)
}

// judgeSession decides whether the session takes an opened live message or
// Will, and which slot it fills; pending reports the marks its connection
// delivered and the app has not acknowledged yet. It also marks the host-wide
// state (the floor of sessions to come). perSubscription says whether the
// broker delivers a copy per matching subscription (MQTT 5).
func (st *replayState) judgeSession(s *sessionState, group, topic string, h envelope.Header, perSubscription bool, pending func(sessionMark) bool) (sessionMark, bool) {
	k := senderKey{group, h.Epoch, h.Sender}
	if h.Flags.Will() {
		return st.judgeWill(s, topic, k, h, perSubscription, pending)
	}
	st.accept(group, h.Epoch, h.Sender, h.Seq) // host-wide: it reached this host
	st.mu.Lock()
	defer st.mu.Unlock()
	slots := s.slotsLocked(topic, perSubscription)
	for slot := range slots {
		m := sessionMark{slot: uint8(slot), key: k, seq: h.Seq}
		if s.checkLocked(st, slotKey{k, uint8(slot)}, h.Seq) && !pending(m) {
			return m, true
		}
	}
	return sessionMark{}, false
}

// checkLocked is the window check of one slot: against the slot's window,
// or its floor while it has none.
func (s *sessionState) checkLocked(st *replayState, k slotKey, seq uint64) bool {
	if w := st.sessionWindowLocked(s, k, false); w != nil {
		return w.Check(seq)
	}
	f := s.floor[k.senderKey]
	return f == nil || f.Check(seq)
}

func (st *replayState) judgeWill(s *sessionState, topic string, k senderKey, h envelope.Header, perSubscription bool, pending func(sessionMark) bool) (sessionMark, bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	t := retainedTriple{Epoch: h.Epoch, Sender: h.Sender, Seq: h.Seq}
	seenAt, seen := st.willsSeen[t]
	if !seen {
		if len(st.willsSeen) >= maxWillsSeen {
			st.forgetOldestWillLocked()
		}
		st.willsSeen[t] = st.gen
		st.pend = appendWillSeen(st.closeRun(), t, st.gen)
	}
	if seen && seenAt < s.gen {
		return sessionMark{}, false // this host had it before the session began
	}
	slots := s.slotsLocked(topic, perSubscription)
	for slot := int(s.wills[t]); slot < slots; slot++ {
		m := sessionMark{will: true, slot: uint8(slot), key: k, triple: t}
		if !pending(m) {
			return m, true
		}
	}
	return sessionMark{}, false
}

func (st *replayState) forgetOldestWillLocked() {
	var oldest retainedTriple
	gen := ^uint64(0)
	for t, g := range st.willsSeen {
		if g < gen {
			oldest, gen = t, g
		}
	}
	delete(st.willsSeen, oldest) // not logged: a reload keeps it, which only refuses more
}

// sessionWindowLocked returns the session's window of k, created from its
// floor when create is set (nil when it has none and create is not set).
func (st *replayState) sessionWindowLocked(s *sessionState, k slotKey, create bool) *sessionWindow {
	w := s.windows[k]
	if w == nil && create {
		if s.perGroup[k.group] >= maxSendersPerGroup {
			st.evictSessionWindowLocked(s, k.group)
		}
		w = &sessionWindow{}
		if f := s.floor[k.senderKey]; f != nil {
			w.ReplayWindow = *f
		}
		s.windows[k] = w
		s.perGroup[k.group]++
	}
	if w != nil {
		st.clock++
		w.lastUse = st.clock
	}
	return w
}

func (st *replayState) evictSessionWindowLocked(s *sessionState, group string) {
	var oldest slotKey
	min := ^uint64(0)
	for k, w := range s.windows {
		if k.group == group && w.lastUse < min {
			oldest, min = k, w.lastUse
		}
	}
	delete(s.windows, oldest)
	s.perGroup[group]--
	if s.logged {
		st.pend = appendSessionForget(st.closeRun(), s.id, oldest)
	}
}

// retainedVersion is one retained value of a topic and the host generation
// it came in.
type retainedVersion struct {
	triple retainedTriple
	gen    uint64
}

// olderRetained reports whether retained value t is older than cur: a lower
// epoch, or the same sender's lower seq (values of different senders in one
// epoch cannot be ordered).
func olderRetained(t, cur retainedTriple) bool {
	return t.Epoch < cur.Epoch || t.Epoch == cur.Epoch && t.Sender == cur.Sender && t.Seq < cur.Seq
}

// sessionRetained runs a retained value offered to session s through its
// register: refused when older than the newest the session had on topic,
// or (for a topic it has not had) than the newest this host had when the
// session began. An accepted value is recorded, for the session and the
// host.
func (st *replayState) sessionRetained(s *sessionState, topic string, t retainedTriple) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	cur, ok := s.retained[topic]
	if !ok {
		cur, ok = st.retainedFloorLocked(topic, s.gen)
	}
	if ok && cur != t && olderRetained(t, cur) {
		return false
	}
	if _, had := s.retained[topic]; !had && len(s.retained) >= maxSessionRetained {
		for k := range s.retained {
			delete(s.retained, k)
			break
		}
	}
	s.retained[topic] = t
	if host, ok := st.retained[topic]; !ok || host != t && !olderRetained(t, host) {
		st.retained[topic] = t
		st.pend = appendRetainedFrame(st.closeRun(), topic, t)
		h := append(st.retainedHist[topic], retainedVersion{t, st.gen})
		if len(h) > retainedHistory {
			h = h[len(h)-retainedHistory:]
			st.retainedTrimmed[topic] = true
		}
		st.retainedHist[topic] = h
	}
	return true
}

// retainedFloorLocked is the newest retained value of topic this host had
// when generation gen began.
func (st *replayState) retainedFloorLocked(topic string, gen uint64) (retainedTriple, bool) {
	h := st.retainedHist[topic]
	if len(h) == 0 {
		t, ok := st.retained[topic] // known before this process started
		return t, ok
	}
	for i := len(h) - 1; i >= 0; i-- {
		if h[i].gen < gen {
			return h[i].triple, true
		}
	}
	if st.retainedTrimmed[topic] {
		return h[0].triple, true
	}
	if t, ok := st.retainedLoaded[topic]; ok {
		return t, true
	}
	return retainedTriple{}, false
}

// commitSession marks that the app has the delivery m: its copy of the
// message is never delivered to this session again.
func (st *replayState) commitSession(s *sessionState, m sessionMark) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.sessions[s.name] != s {
		return // the session ended meanwhile
	}
	if m.will {
		if s.wills[m.triple] <= m.slot {
			s.wills[m.triple] = m.slot + 1
			if s.logged {
				st.pend = appendSessionWill(st.closeRun(), s.id, m.triple)
			}
		}
		return
	}
	w := st.sessionWindowLocked(s, slotKey{m.key, m.slot}, true)
	if !w.Accept(m.seq) {
		return
	}
	if s.logged {
		st.pend = appendSessionAccept(st.closeRun(), s.id, slotKey{m.key, m.slot}, m.seq)
	}
}

// Log encoding of the session frames.

func appendSessionFrames(b []byte, s *sessionState) []byte {
	start := len(b)
	b = beginFrame(b, frameKindSessionBegin)
	b = binary.LittleEndian.AppendUint64(b, s.id)
	b = binary.LittleEndian.AppendUint64(b, s.gen)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(s.name)))
	b = append(b, s.name...)
	endFrame(b, start)
	b = appendSessionLeft(b, s.id, s.expiry, s.leftAt)
	for k, w := range s.floor {
		start := len(b)
		b = appendKey(binary.LittleEndian.AppendUint64(beginFrame(b, frameKindSessionFloor), s.id), k)
		b, _ = w.AppendBinary(b)
		endFrame(b, start)
	}
	for k, w := range s.windows {
		start := len(b)
		b = binary.LittleEndian.AppendUint64(beginFrame(b, frameKindSessionWindow), s.id)
		b = appendKey(append(b, k.slot), k.senderKey)
		b, _ = w.AppendBinary(b)
		endFrame(b, start)
	}
	for f := range s.subs {
		b = appendSessionSub(b, s.id, f, true)
	}
	for t, n := range s.wills {
		for range n {
			b = appendSessionWill(b, s.id, t)
		}
	}
	return b
}

func appendSessionEnd(b []byte, sid uint64) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint64(beginFrame(b, frameKindSessionEnd), sid)
	endFrame(b, start)
	return b
}

func appendSessionLeft(b []byte, sid uint64, expiry uint32, at int64) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint64(beginFrame(b, frameKindSessionLeft), sid)
	b = binary.LittleEndian.AppendUint32(b, expiry)
	b = binary.LittleEndian.AppendUint64(b, uint64(at))
	endFrame(b, start)
	return b
}

func appendSessionSub(b []byte, sid uint64, filter string, add bool) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint64(beginFrame(b, frameKindSessionSub), sid)
	var a byte
	if add {
		a = 1
	}
	b = binary.LittleEndian.AppendUint16(append(b, a), uint16(len(filter)))
	b = append(b, filter...)
	endFrame(b, start)
	return b
}

func appendTriple(b []byte, t retainedTriple) []byte {
	b = binary.LittleEndian.AppendUint32(b, t.Epoch)
	b = binary.LittleEndian.AppendUint64(b, t.Sender)
	return binary.LittleEndian.AppendUint64(b, t.Seq)
}

func appendWillSeen(b []byte, t retainedTriple, gen uint64) []byte {
	start := len(b)
	b = appendTriple(beginFrame(b, frameKindWillSeen), t)
	b = binary.LittleEndian.AppendUint64(b, gen)
	endFrame(b, start)
	return b
}

func appendSessionWill(b []byte, sid uint64, t retainedTriple) []byte {
	start := len(b)
	b = appendTriple(binary.LittleEndian.AppendUint64(beginFrame(b, frameKindSessionWill), sid), t)
	endFrame(b, start)
	return b
}

func appendSessionAccept(b []byte, sid uint64, k slotKey, seq uint64) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint64(beginFrame(b, frameKindSessionAccept), sid)
	b = appendKey(append(b, k.slot), k.senderKey)
	b = binary.LittleEndian.AppendUint16(b, 1)
	b = binary.LittleEndian.AppendUint64(b, seq)
	endFrame(b, start)
	return b
}

func appendSessionForget(b []byte, sid uint64, k slotKey) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint64(beginFrame(b, frameKindSessionForget), sid)
	b = appendKey(append(b, k.slot), k.senderKey)
	endFrame(b, start)
	return b
}

// sessionRecord is a decoded session frame.
type sessionRecord struct {
	sid    uint64
	gen    uint64
	name   []byte
	slot   uint8
	window []byte
	seqs   []byte
	add    bool
	expiry uint32
	at     int64
}

// parseSessionFrame decodes the body (after the kind byte) of a session
// frame into r.
func parseSessionFrame(kind byte, rest []byte, r *inboundRecord) bool {
	le := binary.LittleEndian
	if kind == frameKindWillSeen {
		if len(rest) != 28 {
			return false
		}
		r.triple = retainedTriple{Epoch: le.Uint32(rest), Sender: le.Uint64(rest[4:]), Seq: le.Uint64(rest[12:])}
		r.session.gen = le.Uint64(rest[20:])
		return true
	}
	if len(rest) < 8 {
		return false
	}
	r.session.sid, rest = le.Uint64(rest), rest[8:]
	var ok bool
	switch kind {
	case frameKindSessionBegin:
		if len(rest) < 10 {
			return false
		}
		r.session.gen = le.Uint64(rest)
		n := int(le.Uint16(rest[8:]))
		r.session.name = rest[10:]
		return len(r.session.name) == n
	case frameKindSessionEnd:
		return len(rest) == 0
	case frameKindSessionLeft:
		if len(rest) != 12 {
			return false
		}
		r.session.expiry, r.session.at = le.Uint32(rest), int64(le.Uint64(rest[4:]))
		return true
	case frameKindSessionSub:
		if len(rest) < 3 || rest[0] > 1 {
			return false
		}
		r.session.add = rest[0] == 1
		n := int(le.Uint16(rest[1:]))
		r.topic = rest[3:]
		return len(r.topic) == n
	case frameKindSessionWill:
		if len(rest) != 20 {
			return false
		}
		r.triple = retainedTriple{Epoch: le.Uint32(rest), Sender: le.Uint64(rest[4:]), Seq: le.Uint64(rest[12:])}
		return true
	case frameKindSessionFloor:
		if r.key, rest, ok = parseKey(rest); !ok {
			return false
		}
		r.session.window = rest
		return true
	}
	// window, accept, forget: slot ‖ key ‖ ...
	if len(rest) < 1 {
		return false
	}
	r.session.slot = rest[0]
	if r.key, rest, ok = parseKey(rest[1:]); !ok {
		return false
	}
	switch kind {
	case frameKindSessionWindow:
		r.session.window = rest
		return true
	case frameKindSessionAccept:
		if len(rest) < 2 {
			return false
		}
		n := int(le.Uint16(rest))
		r.session.seqs = rest[2:]
		return n > 0 && len(r.session.seqs) == 8*n
	case frameKindSessionForget:
		return len(rest) == 0
	}
	return false
}

// applySession replays one session frame into the state.
func (st *replayState) applySession(r *inboundRecord) error {
	if r.kind == frameKindWillSeen {
		st.willsSeen[r.triple] = r.session.gen
		st.gen = max(st.gen, r.session.gen)
		return nil
	}
	if r.kind == frameKindSessionBegin {
		if old := st.sessionsByID[r.session.sid]; old != nil {
			delete(st.sessions, old.name)
		}
		s := &sessionState{
			id: r.session.sid, name: string(r.session.name), logged: true, gen: r.session.gen,
			floor:    make(map[senderKey]*envelope.ReplayWindow),
			windows:  make(map[slotKey]*sessionWindow),
			perGroup: make(map[string]int),
			wills:    make(map[retainedTriple]uint8),
			subs:     make(map[string]bool),
			retained: make(map[string]retainedTriple),
		}
		if old := st.sessions[s.name]; old != nil {
			delete(st.sessionsByID, old.id)
		}
		st.sessions[s.name] = s
		st.sessionsByID[s.id] = s
		st.gen = max(st.gen, s.gen)
		st.lastSID = max(st.lastSID, s.id)
		return nil
	}
	s := st.sessionsByID[r.session.sid]
	if s == nil {
		return fmt.Errorf("frame of kind %d for session %d, which has no begin frame", r.kind, r.session.sid)
	}
	switch r.kind {
	case frameKindSessionEnd:
		delete(st.sessionsByID, s.id)
		if st.sessions[s.name] == s {
			delete(st.sessions, s.name)
		}
	case frameKindSessionLeft:
		s.expiry, s.leftAt = r.session.expiry, r.session.at
	case frameKindSessionSub:
		if r.session.add {
			s.subs[string(r.topic)] = true
		} else {
			delete(s.subs, string(r.topic))
		}
	case frameKindSessionWill:
		s.wills[r.triple]++
	case frameKindSessionFloor:
		w := new(envelope.ReplayWindow)
		if err := w.UnmarshalBinary(r.session.window); err != nil {
			return fmt.Errorf("session %q floor of sender %016x: %w", s.name, r.key.sender, err)
		}
		s.floor[r.key] = w
	case frameKindSessionWindow:
		w := st.sessionWindowLocked(s, slotKey{r.key, r.session.slot}, true)
		if err := w.UnmarshalBinary(r.session.window); err != nil {
			return fmt.Errorf("session %q window of sender %016x: %w", s.name, r.key.sender, err)
		}
	case frameKindSessionAccept:
		w := st.sessionWindowLocked(s, slotKey{r.key, r.session.slot}, true)
		for i := 0; i < len(r.session.seqs); i += 8 {
			w.Accept(binary.LittleEndian.Uint64(r.session.seqs[i:]))
		}
	case frameKindSessionForget:
		k := slotKey{r.key, r.session.slot}
		if _, ok := s.windows[k]; ok {
			delete(s.windows, k)
			s.perGroup[k.group]--
		}
	}
	return nil
}

// snapshotSessions appends the logged sessions and the Wills seen to a
// snapshot of the log.
func (st *replayState) snapshotSessions(b []byte) []byte {
	for _, s := range st.sessions {
		if s.logged {
			b = appendSessionFrames(b, s)
		}
	}
	for t, gen := range st.willsSeen {
		b = appendWillSeen(b, t, gen)
	}
	return b
}
