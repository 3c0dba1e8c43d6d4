package keyclient

// The client's side of sender_auth groups (docs/PROTOCOL.md 2.5, Roster):
// the JoinResponse says the group signs what it seals and which roster
// version the member must hold; Roster messages from the pinned key server
// (on the group's topic, or this member's own) carry it, possibly in several
// parts; the ring gets each newer version once it is whole. The group does
// not count as joined until the ring holds that version and it lists this
// member's own sender id under its own key, and a Heartbeat naming a newer
// version than the member knows makes it join again.

import (
	"bytes"
	"crypto/ed25519"
	"fmt"

	"github.com/smqtt/smqtt/gkd"
)

// Bounds of one roster version being collected: a key server's roster
// larger than this is not installed.
const (
	maxRosterParts   = 4096
	maxRosterEntries = 1 << 20
)

// rosterParts collects the parts of the newest roster version seen.
type rosterParts struct {
	version uint64
	parts   uint16
	got     map[uint16][]gkd.RosterEntry
	entries int
}

// add files one part; when the version is whole it returns its keys. A
// part of an older version than the one being collected, or one that
// disagrees with it on the number of parts, is refused with the reason.
func (rp *rosterParts) add(ro gkd.Roster) (keys map[uint64]ed25519.PublicKey, whole bool, err error) {
	switch {
	case ro.Parts > maxRosterParts:
		return nil, false, fmt.Errorf("%d parts, more than the %d accepted", ro.Parts, maxRosterParts)
	case ro.Version < rp.version:
		return nil, false, fmt.Errorf("older than version %d being collected", rp.version)
	case ro.Version > rp.version || rp.got == nil:
		*rp = rosterParts{version: ro.Version, parts: ro.Parts, got: map[uint16][]gkd.RosterEntry{}}
	case ro.Parts != rp.parts:
		return nil, false, fmt.Errorf("%d parts, other parts of version %d said %d", ro.Parts, ro.Version, rp.parts)
	}
	if _, dup := rp.got[ro.Part]; dup {
		return nil, false, nil
	}
	if rp.entries += len(ro.Senders); rp.entries > maxRosterEntries {
		*rp = rosterParts{version: ro.Version}
		return nil, false, fmt.Errorf("more than %d senders", maxRosterEntries)
	}
	rp.got[ro.Part] = ro.Senders
	if len(rp.got) < int(rp.parts) {
		return nil, false, nil
	}
	keys = make(map[uint64]ed25519.PublicKey, rp.entries)
	for _, part := range rp.got {
		for _, e := range part {
			if k, dup := keys[e.Sender]; dup && !bytes.Equal(k, e.Key[:]) {
				*rp = rosterParts{version: ro.Version}
				return nil, false, fmt.Errorf("sender %d listed with two keys", e.Sender)
			}
			keys[e.Sender] = ed25519.PublicKey(bytes.Clone(e.Key[:]))
		}
	}
	*rp = rosterParts{version: ro.Version} // done: later parts are duplicates
	return keys, true, nil
}

// senderAuthLocked takes a JoinResponse's word on sender_auth, before any
// of its key material reaches the ring: the ring must know that the group's
// envelopes carry proofs before it holds a key that opens them.
func (c *Client) senderAuthLocked(st *groupState, group string, r gkd.JoinResponse) {
	st.senderAuth = r.Flags.SenderAuth()
	st.rosterMin = r.Roster
	c.opts.Ring.SetSenderAuth(group, st.senderAuth)
}

// readyLocked reports whether a group counts as joined: it holds keys and,
// in a sender_auth group, the roster its JoinResponse named (or a newer
// one), listing this member's own sender id under its own key.
func (c *Client) readyLocked(group string, st *groupState) bool {
	if !st.joined {
		return false
	}
	if !st.senderAuth {
		return true
	}
	if v, ok := c.opts.Ring.RosterVersion(group); !ok || v < st.rosterMin {
		return false
	}
	k, ok := c.opts.Ring.SenderKey(group, st.sender)
	own := c.opts.Identity.Public().SigningKey()
	return ok && bytes.Equal(k, own[:])
}

// onRoster collects a Roster part for a sender_auth group this member
// joined, and installs the version once it is whole.
func (c *Client) onRoster(msg *gkd.Message) {
	ro, err := gkd.ParseRoster(msg.Body)
	if err != nil {
		c.log.Warn("dropped a malformed roster", "error", err)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	group, ok := c.gids[ro.Group]
	if !ok {
		return
	}
	st := c.state[group]
	if !st.senderAuth {
		c.log.Debug("ignored a roster: no join response of this process made the group sender_auth", "group", group, "version", ro.Version)
		return
	}
	installed, has := c.opts.Ring.RosterVersion(group)
	if ro.Version < st.rosterMin || has && ro.Version <= installed {
		st.rostersIgnored++
		c.log.Debug("ignored an old or repeated roster", "group", group, "version", ro.Version, "installed", installed, "joined_at", st.rosterMin)
		return
	}
	keys, whole, err := st.rosterParts.add(ro)
	if err != nil {
		c.log.Warn("dropped a roster part", "group", group, "version", ro.Version, "part", ro.Part, "error", err)
		return
	}
	if !whole {
		return
	}
	if err := c.opts.Ring.InstallRoster(group, ro.Version, keys); err != nil {
		c.log.Warn("installing a roster failed", "group", group, "error", err)
		return
	}
	c.log.Debug("installed a roster", "group", group, "version", ro.Version, "senders", len(keys))
	if st.joined && !c.readyLocked(group, st) && ro.Version >= st.rosterMin {
		c.log.Warn("the roster does not list this sidecar's sender id under its key", "group", group, "version", ro.Version, "sender", st.sender)
	}
	c.cond.Broadcast()
}

// rosterBehindLocked reports whether a Heartbeat's roster version tells a
// member that it missed a roster (or that the group switched sender_auth
// on or off): it must join again.
func (c *Client) rosterBehindLocked(st *groupState, group string, version uint64) bool {
	if st.senderAuth != (version != 0) {
		return true
	}
	installed, _ := c.opts.Ring.RosterVersion(group)
	return version > max(installed, st.rosterMin)
}
