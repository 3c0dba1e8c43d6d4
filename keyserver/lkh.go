package keyserver

// The lkh scheme: per group a logical key hierarchy ([gkd.LKHTree]). Joins
// and leaves are batched as for update; a batch is one tree rekey. Joiners
// get their path keys sealed to them in their JoinResponse (Ext); the others
// learn the new keys from one signed multicast of wrapped keys, split into
// GroupRekey messages of at most MaxMessageSize bytes.

import (
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/smqtt/smqtt/gkd"
)

// loadTree returns the group's key tree: the stored one, or a new empty tree
// of the configured degree. The record's epoch and key follow the tree's
// root from then on.
func loadTree(gc GroupConfig, rec *groupRecord) (*gkd.LKHTree, error) {
	if gc.Degree < gkd.MinLKHDegree || gc.Degree > gkd.MaxLKHDegree {
		return nil, fmt.Errorf("keyserver: group %q: degree %d, want %d to %d", gc.Name, gc.Degree, gkd.MinLKHDegree, gkd.MaxLKHDegree)
	}
	if rec.Scheme != "" && rec.Scheme != "lkh" {
		return nil, fmt.Errorf("keyserver: group %q: stored with scheme %s, cannot switch to lkh (rename the group)", gc.Name, rec.Scheme)
	}
	tree := gkd.NewLKHTree(gc.Degree, nil)
	if len(rec.Tree) > 0 {
		if err := tree.UnmarshalBinary(rec.Tree); err != nil {
			return nil, fmt.Errorf("keyserver: group %q: stored key tree: %w", gc.Name, err)
		}
	}
	rec.Scheme = "lkh"
	syncRoot(rec, tree)
	return tree, nil
}

// syncRoot copies the tree's root, the group key, into the record.
func syncRoot(rec *groupRecord, tree *gkd.LKHTree) {
	v, k := tree.GroupKey()
	rec.Epoch, rec.Key = v, k[:]
}

// rekeyLKHLocked rekeys an lkh group: leavers leave the tree, waiting joiners
// enter it, and every key on their paths changes once. The new tree is
// committed to the store before anything is sent.
func (s *Server) rekeyLKHLocked(g *group) {
	rec, tree := g.rec, g.tree
	inTree := func(name string) bool { _, err := tree.Path(name); return err == nil }

	// A member that leaves and joins again in one batch keeps its leaf: it
	// gets its path (after the rekey) like any joiner.
	waiting := map[string]bool{}
	var joins []string
	for _, p := range g.pending {
		waiting[p.m.name] = true
		if !inTree(p.m.name) {
			joins = append(joins, p.m.name)
		}
	}
	var leaves []string
	for name := range g.leaving {
		if inTree(name) && !waiting[name] {
			leaves = append(leaves, name)
		}
	}
	slices.Sort(leaves)

	prevTree, prevEpoch, prevKey, prevJoined, prevNext := rec.Tree, rec.Epoch, rec.Key, maps.Clone(rec.Joined), rec.NextSender
	prevRoster := g.rosterSnapshot()
	rollback := func() {
		g.restoreRoster(prevRoster)
		if len(prevTree) > 0 {
			tree.UnmarshalBinary(prevTree)
		} else {
			*tree = *gkd.NewLKHTree(tree.Degree(), nil)
		}
		rec.Tree, rec.Epoch, rec.Key, rec.Joined, rec.NextSender = prevTree, prevEpoch, prevKey, prevJoined, prevNext
		// the names changed in the attempt stay marked: the next commit
		// writes their restored values
	}
	r, err := tree.Rekey(joins, leaves)
	if err != nil {
		s.log.Error("rekeying the key tree failed; group keeps its epoch", "group", g.cfg.Name, "error", err)
		return
	}
	chunks, err := r.Chunks(g.cfg.MaxMessageSize - groupRekeyOverhead)
	if err != nil {
		s.log.Error("splitting a rekey failed; group keeps its epoch", "group", g.cfg.Name, "max_message_size", g.cfg.MaxMessageSize, "error", err)
		rollback()
		return
	}
	for _, name := range leaves {
		rec.drop(name)
	}
	for name := range g.leaving {
		if !inTree(name) {
			rec.drop(name) // left the tree, or never entered it
		}
	}
	for _, p := range g.pending {
		rec.enter(p.m, time.Now(), time.Time{})
	}
	if rec.Tree, err = tree.MarshalBinary(); err != nil {
		s.log.Error("encoding the key tree failed; group keeps its epoch", "group", g.cfg.Name, "error", err)
		rollback()
		return
	}
	syncRoot(rec, tree)
	rec.Counter++
	leaving := rec.Leaving
	rec.Leaving = nil
	// committed, and the new roster out, before the joiners' responses
	if err := s.commitRosterLocked(g, true); err != nil {
		s.log.Error("storing a rekey failed; group keeps its epoch", "group", g.cfg.Name, "error", err)
		rec.Counter--
		rec.Leaving = leaving
		rollback()
		return
	}
	newcomers := g.pending
	g.pending = nil
	clear(g.leaving)

	now, activate, retention := s.beginRekeyLocked(g)
	defer func() { s.m.rekeyDur.Observe(time.Since(now).Seconds()) }()
	for _, p := range newcomers {
		s.sendJoinResponseLocked(g, p.m, p.nonce, rec.Joined[p.m.name].Sender, activate)
	}
	topic := gkd.GroupTopic(s.opts.TopicPrefix, g.id)
	for _, chunk := range chunks {
		body := gkd.GroupRekey{
			Group: g.id, Counter: rec.Counter,
			ActivateAt:    activate,
			PrevSendUntil: activate.Add(g.cfg.SendGrace),
			PrevOpenUntil: activate.Add(retention),
			Chunk:         chunk,
		}
		msg, err := gkd.PlainMessage(s.opts.Identity, [8]byte{}, gkd.TypeGroupRekey, body)
		if err != nil {
			s.log.Error("building a group rekey failed", "group", g.cfg.Name, "error", err)
			continue
		}
		s.sendLocked(topic, msg)
	}
	s.log.Info("group rekeyed", "group", g.cfg.Name, "epoch", rec.Epoch, "members", len(rec.Joined),
		"joined", len(joins), "left", len(leaves), "wrapped_keys", len(r.Wraps), "chunks", len(chunks))
}
