package keyclient

// Slotted groups. The join response carries K2 (Key), its generation
// (Epoch) and a grant (Ext, [gkd.SlotGrant]): the group's clock and the
// covers of the slots this member may read. The client keeps in the ring the
// keys of the slots within skew of the current one, under every K2
// generation still open, seals under the current slot of the newest
// generation in force, and moves on at every slot boundary:
//
//   - time: the key server's clock is the join response's header time. The
//     sample is taken as the server's time half a round trip before arrival,
//     and refused when the round trip exceeds half the skew window
//     (max(skew_slots, 1) slots): an uncertain offset installs nothing (fail
//     closed) and the join is retried;
//   - renewal: before its grant runs out (a quarter of its length ahead) the
//     client joins again for a fresh grant; a grant that runs out leaves
//     nothing to seal with;
//   - a K2 refresh (Rekey) adds a generation that senders switch to at
//     activate_at; the previous one stays open until prev_open_until.

import (
	"fmt"
	"sync/atomic"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
)

type slotGen struct {
	gen       uint32
	k2        [32]byte
	sendFrom  time.Time // seal under this generation from then on
	openUntil time.Time // zero: open until a newer generation says otherwise
}

type slotState struct {
	grant     gkd.SlotGrant
	offset    time.Duration // the key server's clock minus ours
	gens      []slotGen     // oldest first
	installed map[uint32]bool
	tick      *time.Timer // the next slot boundary or generation change
	renew     *time.Timer
}

func (ss *slotState) stop() {
	if ss.tick != nil {
		ss.tick.Stop()
	}
	if ss.renew != nil {
		ss.renew.Stop()
	}
}

// now returns the key server's clock.
func (ss *slotState) now() time.Time { return time.Now().Add(ss.offset) }

// local converts a key-server time to our clock.
func (ss *slotState) local(t time.Time) time.Time { return t.Add(-ss.offset) }

// maxRoundTrip is the longest round trip a time sample may take: half the
// skew window.
func maxRoundTrip(g *gkd.SlotGrant) time.Duration {
	return time.Duration(max(int(g.Skew), 1)) * g.Slot / 2
}

// onSlotJoinLocked installs a slotted join response. It reports false when
// the response is unusable (the caller keeps the request outstanding and
// the join is retried).
func (c *Client) onSlotJoinLocked(st *groupState, group string, msg *gkd.Message, r gkd.JoinResponse, sentAt time.Time) bool {
	g, err := gkd.ParseSlotGrant(r.Ext)
	if err != nil {
		c.log.Warn("dropped a slotted join response with an unusable grant", "group", group, "error", err)
		return false
	}
	rtt := time.Since(sentAt)
	if limit := maxRoundTrip(&g); rtt > limit {
		c.log.Warn("time sample refused: the join's round trip exceeds half the skew window; retrying", "group", group, "round_trip", rtt, "limit", limit)
		return false
	}
	offset := msg.Time.Add(rtt / 2).Sub(time.Now())
	ss := st.slot
	if ss == nil {
		ss = &slotState{installed: map[uint32]bool{}}
		st.slot = ss
		// A flood of envelopes for unknown slots must not contend for the
		// client's lock: at most one explanation a second gets that far.
		var last atomic.Int64
		c.opts.Ring.OnMiss(group, func(epoch uint32) {
			now := time.Now().UnixNano()
			if prev := last.Load(); now-prev >= int64(time.Second) && last.CompareAndSwap(prev, now) {
				c.slotMiss(group, epoch)
			}
		})
	}
	renewal := st.joined && len(ss.gens) > 0 && ss.gens[len(ss.gens)-1].gen == r.Epoch
	previousLast := ss.grant.Last
	ss.grant, ss.offset = g, offset
	if !renewal {
		ss.gens = []slotGen{{gen: r.Epoch, k2: r.Key}}
	}
	st.sender, st.epoch, st.counter = r.Sender, r.Epoch, r.Counter
	c.refreshSlotsLocked(st, group)
	c.armRenewalLocked(st, group, renewal && g.Last <= previousLast)
	c.log.Info("slot grant", "group", group, "generation", r.Epoch, "slots", fmt.Sprintf("%d-%d", g.First, g.Last), "until", ss.local(g.SlotStart(g.Last+1)), "clock_offset", offset, "round_trip", rtt)
	return true
}

// onSlotRekeyLocked applies a K2 refresh.
func (c *Client) onSlotRekeyLocked(st *groupState, group string, r gkd.Rekey) {
	ss := st.slot
	for i := range ss.gens {
		if ss.gens[i].openUntil.IsZero() {
			ss.gens[i].openUntil = r.PrevOpenUntil
		}
	}
	ss.gens = append(ss.gens, slotGen{gen: r.Epoch, k2: r.Key, sendFrom: r.ActivateAt})
	st.counter, st.epoch, st.lastRekey = r.Counter, r.Epoch, time.Now()
	c.refreshSlotsLocked(st, group)
	c.freshLocked(st, group)
	c.log.Info("K2 refreshed", "group", group, "generation", r.Epoch, "activate_at", r.ActivateAt)
}

// refreshSlotsLocked makes the ring hold exactly the keys of the slots
// within skew of now under every open generation, seal under the current
// slot, and arms the next refresh.
func (c *Client) refreshSlotsLocked(st *groupState, group string) {
	ss, ring := st.slot, c.opts.Ring
	g := &ss.grant
	now := time.Now()
	cur, inClock := g.SlotAt(ss.now())
	skew := uint64(g.Skew)
	want := map[uint32][32]byte{}
	var send *slotGen
	open := ss.gens[:0]
	for _, gen := range ss.gens {
		if !gen.openUntil.IsZero() && !now.Before(gen.openUntil) {
			continue // closed for good
		}
		open = append(open, gen)
	}
	ss.gens = open
	for i := range ss.gens {
		gen := &ss.gens[i]
		if !now.Before(gen.sendFrom) {
			send = gen
		}
		if !inClock {
			continue
		}
		for s := max(cur-min(cur, skew), g.First); s <= min(cur+skew, g.Last); s++ {
			if k, ok := g.Key(gen.k2, group, gen.gen, s); ok {
				want[gkd.SlotEpoch(gen.gen, s)] = k
			}
		}
	}
	for e := range ss.installed {
		if _, ok := want[e]; !ok {
			ring.Retire(group, e)
			delete(ss.installed, e)
		}
	}
	for e, k := range want {
		if ss.installed[e] {
			continue
		}
		if err := ring.Install(group, e, envelope.GroupKey(k), st.sender, false); err != nil {
			c.log.Error("installing a slot key failed", "group", group, "epoch", e, "error", err)
			continue
		}
		ss.installed[e] = true
		// Receivers accept up to skew slots after this one.
		ring.SetSendUntil(group, e, ss.local(g.SlotStart(uint64(e&(1<<gkd.SlotEpochBits-1))+skew+1)))
	}
	sealing := false
	if send != nil && inClock && cur >= g.First && cur <= g.Last {
		e := gkd.SlotEpoch(send.gen, cur)
		if ss.installed[e] {
			sealing = ring.Activate(group, e) == nil
		}
	}
	if !sealing {
		ring.StopSealing(group)
	}
	st.joined = sealing || st.joined && inClock && cur <= g.Last
	// Next: the slot boundary, or a generation's switch or end.
	next := ss.local(g.SlotStart(cur + 1))
	if !inClock {
		next = ss.local(g.Origin)
	}
	for _, gen := range ss.gens {
		for _, t := range []time.Time{gen.sendFrom, gen.openUntil} {
			if t.After(now) && t.Before(next) {
				next = t
			}
		}
	}
	if ss.tick != nil {
		ss.tick.Stop()
	}
	ss.tick = time.AfterFunc(time.Until(next)+time.Millisecond, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if !c.closed && st.slot == ss {
			c.refreshSlotsLocked(st, group)
		}
	})
}

// armRenewalLocked joins again a quarter of the grant's length before it
// runs out (not before its last slot starts: a grant made then reaches
// further). A renewal that did not reach further waits for the grant's end.
func (c *Client) armRenewalLocked(st *groupState, group string, stuck bool) {
	ss := st.slot
	g := &ss.grant
	end := g.SlotStart(g.Last + 1)
	at := end.Add(-end.Sub(g.SlotStart(g.First)) / 4)
	if last := g.SlotStart(g.Last); at.Before(last) {
		at = last
	}
	if stuck {
		at = end
	}
	if ss.renew != nil {
		ss.renew.Stop()
	}
	ss.renew = time.AfterFunc(time.Until(ss.local(at)), func() {
		c.mu.Lock()
		closed := c.closed || st.slot != ss
		c.mu.Unlock()
		if !closed {
			c.join(group)
		}
	})
}

// slotMiss explains a message of a slotted group whose key the ring lacks
// (rate-limited by its caller).
func (c *Client) slotMiss(group string, epoch uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.state[group]
	if st == nil || st.slot == nil {
		return
	}
	ss := st.slot
	cur, _ := ss.grant.SlotAt(ss.now())
	mask := uint64(1)<<gkd.SlotEpochBits - 1
	slot := cur&^mask | uint64(epoch)&mask // the nearest slot with these low bits
	if slot > cur+mask/2 && slot > mask {
		slot -= mask + 1
	}
	c.log.Warn("dropped a message outside this sidecar's slot window", "group", group,
		"slot", slot, "generation_mod_256", epoch>>gkd.SlotEpochBits, "current_slot", cur,
		"accepted", fmt.Sprintf("%d-%d", cur-min(cur, uint64(ss.grant.Skew)), cur+uint64(ss.grant.Skew)),
		"granted", fmt.Sprintf("%d-%d", ss.grant.First, ss.grant.Last))
}
