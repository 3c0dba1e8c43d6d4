package keyserver

// Sender rosters (sender_auth groups, docs/PROTOCOL.md 2.5, Roster): which
// member signs as which sender id. The roster lists every sender id handed
// out in the group (recorded with the identity it was handed to, see
// groupRecord.enter) whose member is still allowed in the group, and keeps
// the ids of members that left (clean leave, Will, expiry, or a rejoin under
// a new id) for receive_retention, so that what they sealed before leaving
// still verifies where it is delivered late. A member no longer allowed
// (revoked, or configured with another key) loses every id at once.
//
// The roster is derived from the record (joined members, retired ids) and
// compared with the last version: any difference is a new version,
// committed with the change that caused it, then broadcast on the group
// topic before any answer that depends on it. A restarted key server starts
// a new version, so numbers are never reused.

import (
	"bytes"
	"cmp"
	"slices"
	"time"

	"github.com/smqtt/smqtt/gkd"
)

// retiredSender is a sender id whose member left the group: listed until
// Until (receive_retention after it left).
type retiredSender struct {
	Sender uint64    `json:"sender"`
	Member string    `json:"member"`
	ID     []byte    `json:"id"`
	Key    []byte    `json:"key"`
	Until  time.Time `json:"until"`
}

// rosterItem is a roster entry with the name of its member.
type rosterItem struct {
	name string
	gkd.RosterEntry
}

// rosterOverhead is what a Roster message adds to its entries: header,
// signature, and group, version, part, parts and count.
const rosterOverhead = gkd.HeaderSize + gkd.SignatureSize + 8 + 8 + 2 + 2 + 2

// rosterVersion is what Heartbeat and JoinResponse say of the roster.
func (g *group) rosterVersion() uint64 {
	if !g.cfg.SenderAuth {
		return 0
	}
	return g.rec.RosterVersion
}

// certifiedLocked returns the roster entry of a sender id handed to the
// identity (id, key) under the member name, if that member is allowed in
// the group with that very identity.
func (s *Server) certifiedLocked(g *group, name string, sender uint64, id, key []byte) (rosterItem, bool) {
	m := s.byName[name]
	if m == nil || !g.allowed[name] || !bytes.Equal(id, m.id[:]) {
		return rosterItem{}, false
	}
	if sk := m.pk.SigningKey(); !bytes.Equal(key, sk[:]) {
		return rosterItem{}, false
	}
	it := rosterItem{name: name}
	it.Sender, it.Member = sender, m.id
	copy(it.Key[:], key)
	return it, true
}

// rosterChangedLocked brings a sender_auth group's roster up to date with
// its record, before the caller commits the record: ids of the last roster
// whose member left are retired until now + receive_retention, retired ids
// past that or of a member no longer allowed are dropped. It returns true
// when the roster differs from the last version: its version is then a new
// one, to be broadcast once the record is committed.
func (s *Server) rosterChangedLocked(g *group, now time.Time) bool {
	rec := g.rec
	if !g.cfg.SenderAuth {
		g.roster, g.rosterSet, rec.Retired = nil, false, nil
		return false
	}
	joined := make(map[uint64]bool, len(rec.Joined))
	var items []rosterItem
	for name, jm := range rec.Joined {
		joined[jm.Sender] = true
		if it, ok := s.certifiedLocked(g, name, jm.Sender, jm.ID, jm.SignKey); ok {
			items = append(items, it)
		}
	}
	retired := make(map[uint64]bool, len(rec.Retired))
	for _, r := range rec.Retired {
		retired[r.Sender] = true
	}
	for _, it := range g.roster {
		if !joined[it.Sender] && !retired[it.Sender] {
			rec.Retired = append(rec.Retired, retiredSender{
				Sender: it.Sender, Member: it.name, ID: slices.Clone(it.Member[:]), Key: slices.Clone(it.Key[:]),
				Until: now.Add(g.cfg.ReceiveRetention),
			})
		}
	}
	kept := rec.Retired[:0]
	for _, r := range rec.Retired {
		it, ok := s.certifiedLocked(g, r.Member, r.Sender, r.ID, r.Key)
		if ok && r.Until.After(now) && !joined[r.Sender] {
			kept = append(kept, r)
			items = append(items, it)
		}
	}
	clear(rec.Retired[len(kept):])
	rec.Retired = kept
	s.armRosterTimerLocked(g)
	slices.SortFunc(items, func(a, b rosterItem) int { return cmp.Compare(a.Sender, b.Sender) })
	if g.rosterSet && slices.Equal(items, g.roster) {
		return false
	}
	rec.RosterVersion++
	g.roster, g.rosterSet = items, true
	return true
}

// commitRosterLocked updates the group's roster, commits the record if the
// roster changed or force is set (the caller changed the record), and then
// broadcasts the new version if there is one.
func (s *Server) commitRosterLocked(g *group, force bool) error {
	changed := s.rosterChangedLocked(g, time.Now())
	if !changed && !force {
		return nil
	}
	if err := s.store.saveGroup(g.cfg.Name, g.rec); err != nil {
		return err
	}
	if changed {
		s.sendRosterLocked(g, nil)
	}
	return nil
}

// armRosterTimerLocked sets the group's timer to the first end of a retired
// sender id's listing.
func (s *Server) armRosterTimerLocked(g *group) {
	if g.rosterTimer != nil {
		g.rosterTimer.Stop()
		g.rosterTimer = nil
	}
	if len(g.rec.Retired) == 0 {
		return
	}
	next := slices.MinFunc(g.rec.Retired, func(a, b retiredSender) int { return a.Until.Compare(b.Until) }).Until
	g.rosterTimer = time.AfterFunc(time.Until(next), func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if !s.closed && s.groups[g.id] == g {
			if err := s.commitRosterLocked(g, false); err != nil {
				s.log.Error("storing a roster failed", "group", g.cfg.Name, "error", err)
			}
		}
	})
}

// sendRosterLocked publishes the group's current roster version, in parts
// that respect max_message_size: to the group, or (to != nil) to one member
// on its own topic.
func (s *Server) sendRosterLocked(g *group, to *member) {
	if !g.cfg.SenderAuth || !g.rosterSet {
		return
	}
	topic, recipient := gkd.GroupTopic(s.opts.TopicPrefix, g.id), [8]byte{}
	if to != nil {
		topic, recipient = gkd.MemberTopic(s.opts.TopicPrefix, to.id), to.id
	}
	per := min(max(1, (g.cfg.MaxMessageSize-rosterOverhead)/gkd.RosterEntrySize), 1<<16-1)
	parts := max(1, (len(g.roster)+per-1)/per)
	if parts >= 1<<16 {
		s.log.Error("a roster too large for 65535 parts of max_message_size; not sent", "group", g.cfg.Name, "senders", len(g.roster), "max_message_size", g.cfg.MaxMessageSize)
		return
	}
	for p := range parts {
		body := gkd.Roster{Group: g.id, Version: g.rec.RosterVersion, Part: uint16(p), Parts: uint16(parts)}
		for _, it := range g.roster[min(p*per, len(g.roster)):min((p+1)*per, len(g.roster))] {
			body.Senders = append(body.Senders, it.RosterEntry)
		}
		s.sendLocked(topic, mustPlain(s.opts.Identity, recipient, gkd.TypeRoster, body))
	}
}

// rosterState is what an lkh rekey restores of the roster when its commit
// fails.
type rosterState struct {
	items   []rosterItem
	set     bool
	version uint64
	retired []retiredSender
}

func (g *group) rosterSnapshot() rosterState {
	return rosterState{g.roster, g.rosterSet, g.rec.RosterVersion, slices.Clone(g.rec.Retired)}
}

func (g *group) restoreRoster(st rosterState) {
	g.roster, g.rosterSet, g.rec.RosterVersion, g.rec.Retired = st.items, st.set, st.version, st.retired
}
