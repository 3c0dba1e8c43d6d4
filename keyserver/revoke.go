package keyserver

// Durable revocation. A member that a configuration reload removes from a
// group (or whose identity it removes) is recorded as revoked in the group's
// record, committed with the rekey that removes it. Every key server that
// loads the group, the next leader after a failover included, keeps it out
// whatever its own configuration file lists, until a reload of the serving
// key server adds it back to the group (it was not in the configuration that
// server ran, and is in the new one): that is the explicit re-admission.

import (
	"maps"
	"slices"
)

// setAllowed computes who may join: the configured members not revoked.
func (g *group) setAllowed() {
	g.allowed = make(map[string]bool, len(g.cfg.Members))
	for _, n := range g.cfg.Members {
		if !slices.Contains(g.rec.Revoked, n) {
			g.allowed[n] = true
		}
	}
}

// recordRevocationsLocked compares a group's members under the new
// configuration with before (those the running configuration named, with
// an identity): members gone are revoked, members added are re-admitted.
// It returns whether the record changed (the caller commits it).
func (s *Server) recordRevocationsLocked(g *group, before map[string]bool) bool {
	if before == nil {
		return false // a new group: nothing to revoke
	}
	now := map[string]bool{}
	for _, n := range g.cfg.Members {
		if s.byName[n] != nil {
			now[n] = true
		}
	}
	rec := g.rec
	changed := false
	for _, n := range slices.Sorted(maps.Keys(before)) {
		if !now[n] && !slices.Contains(rec.Revoked, n) {
			rec.Revoked = append(rec.Revoked, n)
			changed = true
			s.log.Warn("member revoked: recorded in the store", "group", g.cfg.Name, "member", n)
		}
	}
	kept := rec.Revoked[:0]
	for _, n := range rec.Revoked {
		if now[n] && !before[n] {
			changed = true
			s.log.Info("revoked member re-admitted by the configuration", "group", g.cfg.Name, "member", n)
			continue
		}
		kept = append(kept, n)
	}
	rec.Revoked = kept
	g.setAllowed()
	return changed
}
