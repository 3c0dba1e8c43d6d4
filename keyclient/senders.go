package keyclient

import (
	"crypto/ed25519"
	"errors"
	"fmt"

	"github.com/smqtt/smqtt/envelope"
)

// ErrNoRoster means a sender_auth group has no roster installed yet: the
// ring neither seals for it nor accepts its senders.
var ErrNoRoster = errors.New("no sender roster")

// ProofSigner signs batch proofs (envelope.ProveBatch); a gkd.Identity is
// one.
type ProofSigner = envelope.ProofSigner

// roster is one installed version of a group's sender roster.
type roster struct {
	version uint64
	keys    map[uint64]ed25519.PublicKey // sender id -> verification key
}

// SetProofSigner sets the key this process signs its batch proofs with:
// its identity, whose public key the key server certifies in the rosters
// of sender_auth groups.
func (r *Ring) SetProofSigner(s ProofSigner) {
	r.mu.Lock()
	r.signer = s
	r.mu.Unlock()
}

// SetSenderAuth records whether a group requires sender authentication
// (from its JoinResponse). A group switched on holds no roster until
// InstallRoster: until then the ring refuses to seal for it.
func (r *Ring) SetSenderAuth(group string, on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !on && !r.required[group] {
		delete(r.senderAuth, group)
		delete(r.rosters, group)
		return
	}
	r.senderAuth[group] = true
}

// RequireSenderAuth makes a group a sender_auth group whatever its
// JoinResponse says (config sidecar.protect[].sender_auth): against a key
// server that does not run it so, the group seals nothing (no roster comes)
// and opens nothing unproved, instead of silently going without.
func (r *Ring) RequireSenderAuth(group string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.required[group] = true
	r.senderAuth[group] = true
}

// SenderAuth reports whether a group requires sender authentication: every
// envelope sealed for it carries a batch proof, and an envelope without a
// valid proof by a sender in its roster is dropped.
func (r *Ring) SenderAuth(group string) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.senderAuth[group]
}

// AnySenderAuth reports whether any group of the ring requires sender
// authentication (the data plane then leaves room for proofs).
func (r *Ring) AnySenderAuth() bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.senderAuth) > 0
}

// InstallRoster replaces a sender_auth group's roster with version, mapping
// sender ids to the Ed25519 keys that sign for them. A version older than
// the one installed is refused.
func (r *Ring) InstallRoster(group string, version uint64, keys map[uint64]ed25519.PublicKey) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur, ok := r.rosters[group]; ok && version < cur.version {
		return fmt.Errorf("keyclient: group %q: roster version %d is older than the installed %d", group, version, cur.version)
	}
	r.rosters[group] = &roster{version: version, keys: keys}
	return nil
}

// RosterVersion returns the version of a group's installed roster, and
// false when none is installed.
func (r *Ring) RosterVersion(group string) (uint64, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if ro, ok := r.rosters[group]; ok {
		return ro.version, true
	}
	return 0, false
}

// SenderKey returns the key that signs for sender in a sender_auth group,
// and false when the group's roster does not list it (or no roster is
// installed). It implements envelope.SenderKeys.
func (r *Ring) SenderKey(group string, sender uint64) (ed25519.PublicKey, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	ro, ok := r.rosters[group]
	if !ok {
		return nil, false
	}
	k, ok := ro.keys[sender]
	return k, ok
}

// ProofSigner returns what signs a sender_auth group's batch proofs: ready
// only once the group's roster lists this process's own sender id with the
// signer's key (receivers could not verify anything signed before that).
func (r *Ring) ProofSigner(group string) (ProofSigner, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.signer == nil {
		return nil, fmt.Errorf("%w for group %q: no signing key", ErrNoRoster, group)
	}
	ro, ok := r.rosters[group]
	if !ok {
		return nil, fmt.Errorf("%w for group %q", ErrNoRoster, group)
	}
	if _, ok := ro.keys[r.senders[group]]; !ok {
		return nil, fmt.Errorf("%w for group %q: roster version %d does not list sender %d yet", ErrNoRoster, group, ro.version, r.senders[group])
	}
	return r.signer, nil
}
