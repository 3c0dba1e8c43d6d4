package keyserver

// Commits and what may be published after them. A key server alone (bbolt)
// publishes whenever its commit succeeded. One of several on etcd (ha.go)
// publishes only while it leads: every commit is guarded by its election
// key, a failed commit ends its term at once (fenced: nothing more leaves
// it, its timers stop), and every publish also checks that its lease, as
// last renewed, cannot have lapsed.

import (
	"encoding/json"
	"time"
)

// meteredStore times the server's commits, and fences the server when one
// fails on etcd.
type meteredStore struct {
	stateStore
	s *Server
}

func (ms *meteredStore) saveGroup(name string, rec *groupRecord) error {
	start := time.Now()
	err := ms.stateStore.saveGroup(name, rec)
	ms.done(start, err)
	return err
}

func (ms *meteredStore) putMeta(key, value []byte) error {
	start := time.Now()
	err := ms.stateStore.putMeta(key, value)
	ms.done(start, err)
	return err
}

func (ms *meteredStore) done(start time.Time, err error) {
	if err == nil {
		ms.s.m.commitDur.Observe(time.Since(start).Seconds())
		return
	}
	if ms.s.term != nil {
		ms.s.fenceLocked(err)
	}
}

// fenceLocked ends the server's term after a failed commit: from here on
// it publishes nothing; the term's owner closes it.
func (s *Server) fenceLocked(err error) {
	if s.fenced {
		return
	}
	s.fenced = true
	s.log.Error("a commit failed: stepping down, publishing nothing more", "error", err)
	s.term.end(err)
}

// mayPublishLocked says whether the server may publish now.
func (s *Server) mayPublishLocked() bool {
	if s.term == nil {
		return true
	}
	if s.fenced || s.closed {
		return false
	}
	if !s.term.leaseValid() {
		s.fenceLocked(errLeaseLapsed)
		return false
	}
	return true
}

// keyConnIDs holds the members' current connection ids (their Wills name
// them), so that a Will reaching the next leader after a failover or
// restart is still acted on.
var keyConnIDs = []byte("conn-ids")

func (s *Server) loadConnIDs() error {
	s.connIDs = map[string][16]byte{}
	b, err := s.store.getMeta(keyConnIDs)
	if err != nil || len(b) == 0 {
		return err
	}
	if err := json.Unmarshal(b, &s.connIDs); err != nil {
		s.log.Warn("stored connection ids unreadable; Wills count from the members' next connections", "error", err)
		s.connIDs = map[string][16]byte{}
	}
	return nil
}

// setConnIDLocked records a member's current connection id.
func (s *Server) setConnIDLocked(m *member, id [16]byte) {
	if m.connID == id && s.connIDs[m.name] == id {
		return
	}
	m.connID = id
	s.connIDs[m.name] = id
	b, _ := json.Marshal(s.connIDs)
	if err := s.store.putMeta(keyConnIDs, b); err != nil {
		s.log.Error("storing a connection id failed", "member", m.name, "error", err)
	}
}
