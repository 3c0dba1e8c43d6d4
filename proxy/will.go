package proxy

// Wills: a local client's connection ends without DISCONNECT, and its Will
// goes upstream.
//
// The local broker hands every Will to the hook (OnWill), which relays it
// upstream like any publish (sealed on a protected topic) and leaves the
// local broker a harmless stand-in. Since the sidecar relays the Will, it
// also keeps the MQTT 5 Will Delay Interval (§3.1.3.2.2) itself:
//
//  1. The delay is the Will Delay Interval capped at the Session Expiry
//     Interval (the Will goes when the delay has passed or the session
//     ends, whichever is first); always 0 for MQTT 3.1.1.
//  2. Delay 0: relayed at once.
//  3. Delay > 0: held, and relayed when the delay has passed.
//  4. A new connection with the same client id before then: one that
//     continues the session (Clean Start 0) cancels the Will
//     [MQTT-3.1.3-9]; one with Clean Start 1 ends the session, and the
//     Will is relayed at once. The same holds when the new connection
//     takes over one that is still open and whose Will comes after it.
//  5. The session expires (OnClientExpired), or the sidecar stops: a
//     held Will is relayed then, before the outbound queue drains (a QoS
//     1/2 Will that cannot reach upstream before the stop is sent after the
//     next start). The sessions themselves outlive the stop
//     (keptsessions.go); their held Wills, kept in memory, do not.

import (
	"context"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// willRelayTimeout bounds how long relaying one Will may wait for room in
// the outbound queue.
const willRelayTimeout = 5 * time.Second

// delayedWills holds the Wills whose delay has not passed yet, and the
// newest connection of every connected client id, to tell a Will that
// arrives after a takeover from one that does not.
type delayedWills struct {
	relay func(clientID string, w mqtt.Will)

	mu      sync.Mutex
	newest  map[string]newestConn   // client id -> its newest established connection
	pending map[string]*pendingWill // client id -> its held Will
	closed  bool                    // the sidecar is stopping: nothing is held any more
	relays  sync.WaitGroup          // relays started by a delay that passed
}

type newestConn struct {
	cl    *mqtt.Client
	clean bool // it asked for Clean Start
}

type pendingWill struct {
	will  mqtt.Will
	timer *time.Timer
}

func newDelayedWills(relay func(clientID string, w mqtt.Will)) *delayedWills {
	return &delayedWills{
		relay:   relay,
		newest:  make(map[string]newestConn),
		pending: make(map[string]*pendingWill),
	}
}

// willDelay is how long the Will of cl waits (step 1).
func willDelay(cl *mqtt.Client, w mqtt.Will) time.Duration {
	if cl.Properties.ProtocolVersion < 5 {
		return 0
	}
	d := min(w.WillDelayInterval, cl.Properties.Props.SessionExpiryInterval)
	return time.Duration(d) * time.Second
}

// will takes the Will of cl, whose connection ended, and relays it now,
// later, or never.
func (dw *delayedWills) will(cl *mqtt.Client, w mqtt.Will) {
	delay := willDelay(cl, w)
	dw.mu.Lock()
	if n, ok := dw.newest[cl.ID]; ok && n.cl != cl && delay > 0 {
		// A newer connection took over before this one's Will came.
		dw.mu.Unlock()
		if n.clean {
			dw.relay(cl.ID, w)
		}
		return
	}
	if delay == 0 || dw.closed {
		dw.mu.Unlock()
		dw.relay(cl.ID, w)
		return
	}
	if old := dw.pending[cl.ID]; old != nil {
		old.timer.Stop()
	}
	p := &pendingWill{will: w}
	p.timer = time.AfterFunc(delay, func() { dw.delayPassed(cl.ID, p) })
	dw.pending[cl.ID] = p
	dw.mu.Unlock()
}

func (dw *delayedWills) delayPassed(id string, p *pendingWill) {
	dw.mu.Lock()
	if dw.pending[id] != p || dw.closed {
		dw.mu.Unlock() // cancelled, replaced, or relayed by close
		return
	}
	delete(dw.pending, id)
	dw.relays.Add(1)
	dw.mu.Unlock()
	defer dw.relays.Done()
	dw.relay(id, p.will)
}

// connected records a new connection (after its CONNACK) and settles a
// Will its client id left behind (step 4).
func (dw *delayedWills) connected(cl *mqtt.Client, cleanStart bool) {
	dw.mu.Lock()
	dw.newest[cl.ID] = newestConn{cl: cl, clean: cleanStart}
	p := dw.pending[cl.ID]
	if p != nil {
		p.timer.Stop()
		delete(dw.pending, cl.ID)
	}
	dw.mu.Unlock()
	if p != nil && cleanStart {
		dw.relay(cl.ID, p.will)
	}
}

// disconnected forgets a connection that ended (after its Will, if any).
func (dw *delayedWills) disconnected(cl *mqtt.Client) {
	dw.mu.Lock()
	if n, ok := dw.newest[cl.ID]; ok && n.cl == cl {
		delete(dw.newest, cl.ID)
	}
	dw.mu.Unlock()
}

// sessionEnded relays the held Will of a session that expired.
func (dw *delayedWills) sessionEnded(id string) {
	dw.mu.Lock()
	p := dw.pending[id]
	if p != nil {
		p.timer.Stop()
		delete(dw.pending, id)
	}
	dw.mu.Unlock()
	if p != nil {
		dw.relay(id, p.will)
	}
}

// close relays every held Will at once, and waits for relays in progress;
// a Will that comes later is relayed at once.
func (dw *delayedWills) close() {
	dw.mu.Lock()
	dw.closed = true
	held := dw.pending
	dw.pending = make(map[string]*pendingWill)
	dw.mu.Unlock()
	for id, p := range held {
		p.timer.Stop()
		dw.relay(id, p.will)
	}
	dw.relays.Wait()
}

// relayWill sends one Will upstream, protected like any publish.
func (sc *Sidecar) relayWill(clientID string, w mqtt.Will) {
	m, err := sc.sealOutbound(w.TopicName, w.Qos, w.Retain, w.Payload)
	if err == nil {
		ctx, cancel := context.WithTimeout(sc.ctx, willRelayTimeout)
		err = sc.sendOutbound(ctx, m)
		cancel()
	}
	if err != nil {
		sc.log.Warn("local client's Will not relayed", "client", clientID, "topic", w.TopicName, "error", err)
	}
}
