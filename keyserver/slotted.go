package keyserver

// The slotted scheme (Veltri et al. 2013, with revocation): time is cut into
// slots from an origin the store keeps; slot s's key is leaf s of a one-way
// hash tree mixed with the group's K2 ([gkd.SlotKey]). The record's Key is
// K2 and its Epoch K2's generation.
//
//   - A join is answered at once, with no rekey: the member gets K2 and the
//     covers of the slots from now to now + member_interval
//     ([gkd.SlotGrant]). It can read nothing before the current slot
//     (backward secrecy at slot granularity) and nothing after its grant.
//     Members renew their grant before it runs out by joining again.
//   - A member whose grant runs out without renewal simply expires: no
//     message at all.
//   - A leave before the grant's end (shutdown, Will, revocation) is a
//     revocation: K2 is refreshed for the remaining members (batched by
//     rekey_batch, one sealed Rekey each, as in update), so the leaver's
//     tree covers are useless for later slots.
//   - While a revoked member's covers reach past now, every expiry of a K2
//     holder refreshes K2 too: otherwise the expired member (holding K2) and
//     the revoked one (holding later leaves) could combine what they hold.
//   - Trees are 2^depth slots long; a grant that reaches past the current
//     tree carries covers in the next one, whose root the store already
//     keeps: the next tree is announced by every grant that needs it.

import (
	"crypto/rand"
	"fmt"
	"time"

	"github.com/smqtt/smqtt/gkd"
)

// Defaults of a slotted group's settings.
const (
	DefaultSlot           = 10 * time.Second
	DefaultSlotDepth      = 16
	DefaultMemberInterval = time.Hour
)

// checkSlotted validates and completes a slotted group's settings.
func checkSlotted(gc *GroupConfig) error {
	if gc.Slot == 0 {
		gc.Slot = DefaultSlot
	}
	if gc.SlotDepth == 0 {
		gc.SlotDepth = DefaultSlotDepth
	}
	if gc.MemberInterval == 0 {
		gc.MemberInterval = DefaultMemberInterval
	}
	switch {
	case gc.Slot < time.Millisecond || gc.Slot%time.Millisecond != 0:
		return fmt.Errorf("keyserver: group %q: slot %v is not a whole number of milliseconds", gc.Name, gc.Slot)
	case gc.SlotDepth < 1 || gc.SlotDepth > 32:
		return fmt.Errorf("keyserver: group %q: slot_depth %d, want 1 to 32", gc.Name, gc.SlotDepth)
	case gc.SkewSlots < 0 || gc.SkewSlots > 255:
		return fmt.Errorf("keyserver: group %q: skew_slots %d, want 0 to 255", gc.Name, gc.SkewSlots)
	case gc.MemberInterval < 0 || uint64(gc.MemberInterval/gc.Slot)>>gc.SlotDepth >= 254:
		return fmt.Errorf("keyserver: group %q: member_interval %v spans more than 254 trees of 2^%d slots of %v", gc.Name, gc.MemberInterval, gc.SlotDepth, gc.Slot)
	}
	return nil
}

// loadSlotted prepares a slotted group's record: its clock is kept across
// restarts; a changed slot length or depth starts a new clock and a new K2
// generation (members see it in the next heartbeat and join again).
func loadSlotted(gc GroupConfig, rec *groupRecord) error {
	if rec.Scheme != "" && rec.Scheme != "slotted" {
		return fmt.Errorf("keyserver: group %q: stored with scheme %s, cannot switch to slotted (rename the group)", gc.Name, rec.Scheme)
	}
	rec.Scheme = "slotted"
	slotMS := gc.Slot.Milliseconds()
	if rec.SlotOrigin != 0 && rec.SlotMS == slotMS && rec.SlotDepth == gc.SlotDepth {
		return nil
	}
	if rec.SlotOrigin != 0 {
		rec.Epoch++
		rec.Key = randomKey()
	}
	rec.SlotOrigin, rec.SlotMS, rec.SlotDepth = time.Now().UnixMilli(), slotMS, gc.SlotDepth
	rec.SlotRoots = map[uint32][]byte{}
	return nil
}

// clock returns the group's slot clock: a grant of no slots yet.
func (g *group) clock() gkd.SlotGrant {
	return gkd.SlotGrant{
		Origin: time.UnixMilli(g.rec.SlotOrigin), Slot: time.Duration(g.rec.SlotMS) * time.Millisecond,
		Depth: uint8(g.rec.SlotDepth), Skew: uint8(g.cfg.SkewSlots),
	}
}

// grant returns the slot grant of a member joining now, creating the roots
// of the trees it reaches (the caller commits the record).
func (g *group) grant(now time.Time) (gkd.SlotGrant, error) {
	rec := g.rec
	sg := g.clock()
	first, ok := sg.SlotAt(now)
	if !ok {
		return gkd.SlotGrant{}, fmt.Errorf("clock is before the group's origin %v", sg.Origin)
	}
	last, _ := sg.SlotAt(now.Add(g.cfg.MemberInterval))
	if rec.SlotRoots == nil {
		rec.SlotRoots = map[uint32][]byte{}
	}
	covers, err := gkd.SlotCovers(rec.SlotDepth, first, last, func(tree uint32) ([32]byte, error) {
		var r [32]byte
		if len(rec.SlotRoots[tree]) != 32 {
			rand.Read(r[:])
			rec.SlotRoots[tree] = r[:]
		}
		copy(r[:], rec.SlotRoots[tree])
		return r, nil
	})
	if err != nil {
		return gkd.SlotGrant{}, err
	}
	for tree := range rec.SlotRoots {
		if uint64(tree) < first>>rec.SlotDepth {
			delete(rec.SlotRoots, tree) // no grant reaches back into a past tree
		}
	}
	sg.First, sg.Last, sg.Covers = first, last, covers
	return sg, nil
}

// joinSlottedLocked answers a slotted join at once with a fresh grant and
// sender id. A pending leave of the same member is cancelled: it is allowed
// in the group and asks to be in it.
func (s *Server) joinSlottedLocked(g *group, m *member, nonce [16]byte) {
	rec := g.rec
	now := time.Now()
	sg, err := g.grant(now)
	if err != nil {
		s.log.Error("no slot grant for a joining member; not answering", "group", g.cfg.Name, "member", m.name, "error", err)
		return
	}
	if g.leaving[m.name] {
		delete(g.leaving, m.name)
		s.storeLeavingLocked(g, m.name)
	}
	ext, err := sg.MarshalBinary()
	if err != nil {
		s.log.Error("encoding a slot grant failed; not answering", "group", g.cfg.Name, "member", m.name, "error", err)
		return
	}
	until := sg.SlotStart(sg.Last + 1)
	sender, err := s.admitLocked(g, m, until)
	if err != nil {
		return
	}
	s.sendJoinResponseExtLocked(g, m, nonce, sender, time.Time{}, ext)
	s.armExpiryLocked(g)
	s.log.Info("member joined", "group", g.cfg.Name, "member", m.name, "generation", rec.Epoch, "sender", sender, "slots", fmt.Sprintf("%d-%d", sg.First, sg.Last), "until", until)
}

// noteRevokedLocked records how far the covers of members about to be
// rekeyed out reach: until then, expiries refresh K2 too.
func (s *Server) noteRevokedLocked(g *group) {
	for name := range g.leaving {
		if jm := g.rec.Joined[name]; jm != nil && jm.Until.UnixMilli() > g.rec.RevokedUntil {
			g.rec.RevokedUntil = jm.Until.UnixMilli()
		}
	}
	g.rec.Revoking = true // the old K2 stays open only for send_grace
}

// armExpiryLocked sets the group's timer to the earliest end of a grant.
func (s *Server) armExpiryLocked(g *group) {
	var next time.Time
	for _, jm := range g.rec.Joined {
		if next.IsZero() || jm.Until.Before(next) {
			next = jm.Until
		}
	}
	if g.expiry != nil {
		g.expiry.Stop()
		g.expiry = nil
	}
	if next.IsZero() {
		return
	}
	g.expiry = time.AfterFunc(time.Until(next), func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if !s.closed && s.groups[g.id] == g {
			s.expireLocked(g, time.Now())
		}
	})
}

// expireLocked drops the members whose grant ran out. If a revoked member's
// covers still reach past now, K2 is refreshed (batched).
func (s *Server) expireLocked(g *group, now time.Time) {
	expired := 0
	for name, jm := range g.rec.Joined {
		if !jm.Until.After(now) {
			g.rec.drop(name)
			expired++
			s.log.Info("member's slot grant ran out", "group", g.cfg.Name, "member", name)
		}
	}
	if expired > 0 {
		if err := s.commitRosterLocked(g, true); err != nil {
			s.log.Error("storing an expiry failed", "group", g.cfg.Name, "error", err)
		}
		s.m.members.WithLabelValues(g.cfg.Name).Set(float64(len(g.rec.Joined)))
		if now.UnixMilli() < g.rec.RevokedUntil {
			s.log.Info("a revoked member's slots outlast an expired one's: refreshing K2", "group", g.cfg.Name)
			g.rec.Revoking = true
			s.scheduleRekeyLocked(g)
		}
	}
	s.armExpiryLocked(g)
}
