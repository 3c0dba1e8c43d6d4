// Package keyclient is the sidecar's side of group key distribution: it keeps
// a key ring per group (the epochs a sidecar may open, the one it seals with,
// and its sender id) and, with a key server, joins groups and follows rekeys.
//
// The data plane (package proxy) sees only the Ring: it asks for the Sealer of
// a group when it must protect a message, and looks keys up by (group, epoch)
// when it opens one. Static keys (config sidecar.static_keys) fill the ring
// once at start; the key server fills and rotates it at run time.
package keyclient

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/smqtt/smqtt/envelope"
)

// StaticEpoch is the epoch a static group key is known by. Static keys never
// rotate, so one epoch number is enough.
const StaticEpoch uint32 = 1

// ErrNoKey means the ring holds no key to seal for a group: the caller must
// not send the message in clear (fail closed).
var ErrNoKey = errors.New("no group key")

// ErrStale means no signed heartbeat from the key server arrived within
// max_staleness: the key may have been replaced without this sidecar.
var ErrStale = errors.New("key freshness expired: no heartbeat from the key server")

// Ring holds the group keys of one sidecar process. It is safe for
// concurrent use.
type Ring struct {
	mu      sync.RWMutex
	sealers map[string]*envelope.Sealer              // group -> current sending sealer
	keys    map[string]map[uint32]*envelope.GroupKey // group -> epoch -> key (receive side)
	senders map[string]uint64                        // group -> this process's sender id
	fresh   map[string]time.Time                     // group -> seal only until (key server mode)
	until   map[string]map[uint32]time.Time          // group -> epoch -> senders stop using it
	miss    map[string]func(epoch uint32)            // group -> told of each lookup without a key
	now     func() time.Time

	// sender_auth (senders.go)
	senderAuth map[string]bool    // groups whose envelopes carry batch proofs
	required   map[string]bool    // groups the configuration requires to be sender_auth
	rosters    map[string]*roster // group -> installed roster
	signer     ProofSigner        // this process's identity

}

// NewRing returns an empty ring.
func NewRing() *Ring {
	return &Ring{
		sealers: make(map[string]*envelope.Sealer),
		keys:    make(map[string]map[uint32]*envelope.GroupKey),
		senders: make(map[string]uint64),
		fresh:   make(map[string]time.Time),
		until:   make(map[string]map[uint32]time.Time),
		miss:    make(map[string]func(uint32)),
		now:     time.Now,

		senderAuth: make(map[string]bool),
		required:   make(map[string]bool),
		rosters:    make(map[string]*roster),
	}
}

// AddStatic installs a static group key under StaticEpoch with a fresh random
// 64-bit sender id, drawn anew every time the process starts: two processes
// sealing under the same static key collide on a sender id with probability
// about n²/2⁶⁵ for n starts (see docs/PROTOCOL.md, "Nonce uniqueness").
func (r *Ring) AddStatic(group string, key envelope.GroupKey) error {
	sender, err := RandomSenderID()
	if err != nil {
		return err
	}
	return r.Install(group, StaticEpoch, key, sender, true)
}

// Install adds the key of (group, epoch) for opening, and, when send is true,
// makes it the epoch the ring seals with under the given sender id.
func (r *Ring) Install(group string, epoch uint32, key envelope.GroupKey, sender uint64, send bool) error {
	k := key
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys[group] == nil {
		r.keys[group] = make(map[uint32]*envelope.GroupKey)
	}
	r.keys[group][epoch] = &k
	r.senders[group] = sender
	if send {
		s, err := envelope.NewSealer(group, epoch, &k, sender)
		if err != nil {
			return fmt.Errorf("keyclient: group %q epoch %d: %w", group, epoch, err)
		}
		r.sealers[group] = s
	}
	return nil
}

// Activate makes an installed epoch the one the ring seals with, under the
// group's current sender id (sequence numbers start again at 1: the
// per-sender subkey is new with the epoch).
func (r *Ring) Activate(group string, epoch uint32) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	k, ok := r.keys[group][epoch]
	if !ok {
		return fmt.Errorf("%w for group %q epoch %d", ErrNoKey, group, epoch)
	}
	if s := r.sealers[group]; s != nil && s.Epoch() == epoch {
		return nil
	}
	s, err := envelope.NewSealer(group, epoch, k, r.senders[group])
	if err != nil {
		return fmt.Errorf("keyclient: group %q epoch %d: %w", group, epoch, err)
	}
	r.sealers[group] = s
	return nil
}

// Epochs returns the epochs of a group the ring holds keys for.
func (r *Ring) Epochs(group string) []uint32 {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]uint32, 0, len(r.keys[group]))
	for e := range r.keys[group] {
		out = append(out, e)
	}
	return out
}

// SendEpoch returns the epoch the ring seals a group with, if any.
func (r *Ring) SendEpoch(group string) (uint32, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if s := r.sealers[group]; s != nil {
		return s.Epoch(), true
	}
	return 0, false
}

// SetSendUntil records when senders stop using an epoch (a rekey's
// prev_send_until).
func (r *Ring) SetSendUntil(group string, epoch uint32, t time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.until[group] == nil {
		r.until[group] = make(map[uint32]time.Time)
	}
	r.until[group][epoch] = t
}

// SendUntil returns when senders stop using an epoch, if a rekey said so.
func (r *Ring) SendUntil(group string, epoch uint32) (time.Time, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	t, ok := r.until[group][epoch]
	return t, ok
}

// FreshUntil makes the ring refuse to seal for group after t: a key server
// whose signed heartbeats stop arriving may have rekeyed without us (a
// broker can hide a rekey), so sealing stops (fail closed).
func (r *Ring) FreshUntil(group string, t time.Time) {
	r.mu.Lock()
	r.fresh[group] = t
	r.mu.Unlock()
}

// Retire forgets the key of (group, epoch): messages under it can no longer
// be opened, and if it was the sending epoch the ring stops sealing for the
// group until another key is installed.
func (r *Ring) Retire(group string, epoch uint32) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.keys[group], epoch)
	delete(r.until[group], epoch)
	if s := r.sealers[group]; s != nil && s.Epoch() == epoch {
		delete(r.sealers, group)
	}
}

// StopSealing makes the ring seal nothing for a group until an epoch is
// activated again; its keys still open messages.
func (r *Ring) StopSealing(group string) {
	r.mu.Lock()
	delete(r.sealers, group)
	r.mu.Unlock()
}

// Forget drops every key of a group: nothing is sealed or opened for it
// until keys are installed again.
func (r *Ring) Forget(group string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.keys, group)
	delete(r.sealers, group)
	if !r.required[group] {
		delete(r.senderAuth, group)
	}
	delete(r.rosters, group)
}

// Sealer returns the sealer a group's messages are protected with now, or
// ErrNoKey.
func (r *Ring) Sealer(group string) (*envelope.Sealer, error) {
	r.mu.RLock()
	s := r.sealers[group]
	until, bounded := r.fresh[group]
	r.mu.RUnlock()
	if s == nil {
		return nil, fmt.Errorf("%w for group %q", ErrNoKey, group)
	}
	if bounded && r.now().After(until) {
		return nil, fmt.Errorf("%w for group %q: %w", ErrNoKey, group, ErrStale)
	}
	return s, nil
}

// GroupKey implements envelope.KeyLookup.
func (r *Ring) GroupKey(group string, epoch uint32) (*envelope.GroupKey, bool) {
	r.mu.RLock()
	k, ok := r.keys[group][epoch]
	r.mu.RUnlock()
	if !ok {
		r.mu.RLock()
		miss := r.miss[group]
		r.mu.RUnlock()
		if miss != nil {
			miss(epoch)
		}
	}
	return k, ok
}

// OnMiss has f told of every lookup of a group's epoch that finds no key
// (a slotted group explains in its logs which slot the message was for).
func (r *Ring) OnMiss(group string, f func(epoch uint32)) {
	r.mu.Lock()
	r.miss[group] = f
	r.mu.Unlock()
}

// RandomSenderID draws a non-zero 64-bit sender id from crypto/rand.
func RandomSenderID() (uint64, error) {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, fmt.Errorf("keyclient: sender id: %w", err)
		}
		if id := binary.BigEndian.Uint64(b[:]); id != 0 {
			return id, nil
		}
	}
}
