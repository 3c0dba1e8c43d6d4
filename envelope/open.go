package envelope

import (
	"crypto/cipher"
	"fmt"
	"sync"
	"sync/atomic"
)

// KeyLookup gives an Opener the group keys it may use. GroupKey returns the
// key of group in epoch, or false if the epoch is unknown or retired.
// Implementations must be safe for concurrent use; they are called on every
// Open, so that a retired epoch stops opening at once. The returned key must
// not be modified afterwards; a new key gets a new epoch.
type KeyLookup interface {
	GroupKey(group string, epoch uint32) (*GroupKey, bool)
}

// DefaultCacheSize is the number of per-sender ciphers an Opener keeps when
// NewOpener is given a size below 1.
const DefaultCacheSize = 4096

// An Opener opens envelopes with the keys of a KeyLookup. It caches the
// AES-GCM cipher of each (group, epoch, sender) it has seen, up to a fixed
// number, evicting with the clock algorithm (an approximation of least
// recently used). It is safe for concurrent use.
//
// An Opener checks authenticity, integrity and the binding to group and
// topic; it does not detect replays (see [ReplayWindow]).
type Opener struct {
	keys KeyLookup
	size int

	mu    sync.RWMutex
	index map[cacheKey]int // slot of each cached entry
	slots []*cacheEntry
	hand  int // clock hand: next slot considered for eviction
}

type cacheKey struct {
	group  string
	epoch  uint32
	sender uint64
}

type cacheEntry struct {
	key      cacheKey
	groupKey GroupKey // the group key the cipher was derived from
	aead     cipher.AEAD
	used     atomic.Bool // clock reference bit
}

// NewOpener returns an Opener over keys that caches up to cacheSize
// per-sender ciphers (DefaultCacheSize if cacheSize < 1).
func NewOpener(keys KeyLookup, cacheSize int) *Opener {
	if cacheSize < 1 {
		cacheSize = DefaultCacheSize
	}
	return &Opener{keys: keys, size: cacheSize, index: make(map[cacheKey]int)}
}

// Open authenticates and decrypts the envelope msg received on topic for
// group, appends the plaintext to dst, and returns the authenticated header
// and the extended slice. With enough spare capacity in dst and a cached
// cipher it does not allocate. dst's spare capacity must not overlap msg.
//
// On error it returns a zero Header and dst unchanged, and the error wraps
// exactly one of ErrMalformed (too short, reserved flags, seq 0, group or
// topic out of range), ErrVersion, ErrNoKey or ErrAuth (any AEAD failure:
// tampering, wrong key, other topic, other group).
func (o *Opener) Open(dst []byte, group, topic string, msg []byte) (Header, []byte, error) {
	h, err := ParseHeader(msg)
	if err != nil {
		return Header{}, dst, fmt.Errorf("open on topic %q: %w", topic, err)
	}
	if err := checkGroup(group); err != nil {
		return Header{}, dst, fmt.Errorf("open on topic %q: %w", topic, err)
	}
	if err := checkTopic(topic); err != nil {
		return Header{}, dst, fmt.Errorf("open for group %q: %w", group, err)
	}
	key, ok := o.keys.GroupKey(group, h.Epoch)
	if !ok || key == nil {
		return Header{}, dst, fmt.Errorf("%w: group %q epoch %d (sender %d, topic %q)", ErrNoKey, group, h.Epoch, h.Sender, topic)
	}
	aead, err := o.cipher(cacheKey{group: group, epoch: h.Epoch, sender: h.Sender}, key)
	if err != nil {
		return Header{}, dst, fmt.Errorf("open for group %q epoch %d: %w", group, h.Epoch, err)
	}

	sc := scratchPool.Get().(*scratch)
	putNonce(&sc.nonce, h.Seq)
	ad := appendAD(sc.ad[:0], msg, group, topic)
	body := msg[HeaderLen:]
	if h.Flags.Proof() {
		// The proof is checked by a ProofChecker; the AEAD covers what
		// precedes it.
		start, _, _, err := parseTrailer(msg)
		if err != nil {
			scratchPool.Put(sc)
			return Header{}, dst, fmt.Errorf("open on topic %q: %w", topic, err)
		}
		body = msg[HeaderLen:start]
	}
	out, err := aead.Open(dst, sc.nonce[:], body, ad)
	scratchPool.Put(sc)
	if err != nil {
		return Header{}, dst, fmt.Errorf("%w: group %q epoch %d sender %d seq %d topic %q", ErrAuth, group, h.Epoch, h.Sender, h.Seq, topic)
	}
	return h, out, nil
}

// cipher returns the cached cipher of k, deriving it from key on a miss or
// when the key ring now maps the epoch to a different key.
func (o *Opener) cipher(k cacheKey, key *GroupKey) (cipher.AEAD, error) {
	o.mu.RLock()
	if i, ok := o.index[k]; ok {
		if e := o.slots[i]; e.groupKey == *key {
			if !e.used.Load() {
				e.used.Store(true)
			}
			o.mu.RUnlock()
			return e.aead, nil
		}
	}
	o.mu.RUnlock()

	aead, err := newSenderAEAD(key, k.group, k.epoch, k.sender)
	if err != nil {
		return nil, err
	}
	ne := &cacheEntry{key: k, groupKey: *key, aead: aead}
	ne.used.Store(true)

	o.mu.Lock()
	defer o.mu.Unlock()
	if i, ok := o.index[k]; ok {
		o.slots[i] = ne // refresh (another goroutine, or a changed key)
		return aead, nil
	}
	if len(o.slots) < o.size {
		o.index[k] = len(o.slots)
		o.slots = append(o.slots, ne)
		return aead, nil
	}
	// Clock: clear reference bits until an unreferenced slot comes up; this
	// ends within two turns of the hand.
	for {
		victim := o.slots[o.hand]
		if victim.used.Load() {
			victim.used.Store(false)
			o.hand = (o.hand + 1) % len(o.slots)
			continue
		}
		delete(o.index, victim.key)
		clear(victim.groupKey[:])
		o.slots[o.hand] = ne
		o.index[k] = o.hand
		o.hand = (o.hand + 1) % len(o.slots)
		return aead, nil
	}
}

// Forget drops the cached ciphers of every sender in (group, epoch), for
// example when the epoch is retired. Open still asks the KeyLookup on every
// call, so Forget frees memory; it is not needed for correctness.
func (o *Opener) Forget(group string, epoch uint32) {
	o.mu.Lock()
	defer o.mu.Unlock()
	kept := o.slots[:0]
	for _, e := range o.slots {
		if e.key.group == group && e.key.epoch == epoch {
			delete(o.index, e.key)
			clear(e.groupKey[:])
			continue
		}
		o.index[e.key] = len(kept)
		kept = append(kept, e)
	}
	clear(o.slots[len(kept):])
	o.slots = kept
	if o.hand >= len(o.slots) {
		o.hand = 0
	}
}

// Len returns the number of cached per-sender ciphers.
func (o *Opener) Len() int {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return len(o.slots)
}
