package envelope

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"math"
	"sync/atomic"
)

// A Sealer seals one sender's messages for one (group, epoch). It owns the
// sender's sequence counter: the first message gets seq 1, and the Sealer
// refuses to seal once seq 2^64-1 has been used. It is safe for concurrent
// use.
//
// A process must not create two Sealers for the same (group, epoch, sender)
// from the same key, since both would count from 1 and repeat nonces. Sender
// ids are fresh per process start; within a process, keep one Sealer per
// (group, epoch) and share it.
type Sealer struct {
	group  string
	epoch  uint32
	sender uint64
	aead   cipher.AEAD
	last   atomic.Uint64 // last sequence number handed out
}

// NewSealer returns a Sealer for sender in (group, epoch) under the group key
// key. The group name must be 1 to MaxGroupLen bytes long.
func NewSealer(group string, epoch uint32, key *GroupKey, sender uint64) (*Sealer, error) {
	if err := checkGroup(group); err != nil {
		return nil, fmt.Errorf("new sealer: %w", err)
	}
	aead, err := newSenderAEAD(key, group, epoch, sender)
	if err != nil {
		return nil, fmt.Errorf("new sealer for group %q epoch %d: %w", group, epoch, err)
	}
	return &Sealer{group: group, epoch: epoch, sender: sender, aead: aead}, nil
}

// newSenderAEAD derives sender's subkey and returns its AES-256-GCM. group
// must already have been checked.
func newSenderAEAD(key *GroupKey, group string, epoch uint32, sender uint64) (cipher.AEAD, error) {
	k := DeriveSenderKey(key, group, epoch, sender)
	defer clear(k[:])
	block, err := aes.NewCipher(k[:])
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Group returns the group the Sealer seals for.
func (s *Sealer) Group() string { return s.group }

// Epoch returns the key epoch the Sealer seals under.
func (s *Sealer) Epoch() uint32 { return s.epoch }

// Sender returns the Sealer's sender id.
func (s *Sealer) Sender() uint64 { return s.sender }

// LastSeq returns the last sequence number Seal used, 0 if none.
func (s *Sealer) LastSeq() uint64 { return s.last.Load() }

// Seal seals plaintext for topic with the next sequence number, appends the
// envelope to dst and returns the extended slice and the sequence number it
// used. With enough spare capacity in dst it does not allocate. plaintext
// must not overlap dst's spare capacity. An empty plaintext is allowed.
//
// Seal consumes a sequence number only once its arguments are valid.
func (s *Sealer) Seal(dst []byte, topic string, flags Flags, plaintext []byte) (msg []byte, seq uint64, err error) {
	if err := checkSealArgs(topic, flags, plaintext); err != nil {
		return dst, 0, fmt.Errorf("seal for group %q: %w", s.group, err)
	}
	seq, err = s.next()
	if err != nil {
		return dst, 0, fmt.Errorf("seal for group %q epoch %d sender %d: %w", s.group, s.epoch, s.sender, err)
	}
	return s.seal(dst, topic, flags, seq, plaintext), seq, nil
}

// SealSeq is Seal with an explicit sequence number; it leaves the Sealer's
// counter alone. It exists for test vectors and for callers that manage
// sequence numbers themselves.
//
// The caller must never seal two different messages (different plaintext,
// topic or flags) under one seq with Sealers of the same (group, epoch,
// sender, key): that reuses an AES-GCM nonce and breaks confidentiality and
// integrity. In particular, never mix SealSeq with Seal on one Sealer unless
// the seqs come from the same counter. Sealing the same message again with
// the same seq reproduces the same bytes and is harmless.
func (s *Sealer) SealSeq(dst []byte, topic string, flags Flags, seq uint64, plaintext []byte) ([]byte, error) {
	if err := checkSealArgs(topic, flags, plaintext); err != nil {
		return dst, fmt.Errorf("seal for group %q: %w", s.group, err)
	}
	if seq == 0 {
		return dst, fmt.Errorf("seal for group %q: %w: sequence number 0", s.group, ErrMalformed)
	}
	return s.seal(dst, topic, flags, seq, plaintext), nil
}

// next reserves the next sequence number.
func (s *Sealer) next() (uint64, error) {
	for {
		last := s.last.Load()
		if last == math.MaxUint64 {
			return 0, ErrSeqExhausted
		}
		if s.last.CompareAndSwap(last, last+1) {
			return last + 1, nil
		}
	}
}

func checkSealArgs(topic string, flags Flags, plaintext []byte) error {
	if err := checkTopic(topic); err != nil {
		return err
	}
	if !flags.Valid() {
		return fmt.Errorf("%w: invalid flags 0x%02x", ErrMalformed, uint8(flags))
	}
	if uint64(len(plaintext)) > MaxPlaintextLen {
		return fmt.Errorf("%w: plaintext is %d bytes, more than the %d-byte maximum", ErrMalformed, len(plaintext), uint64(MaxPlaintextLen))
	}
	return nil
}

func (s *Sealer) seal(dst []byte, topic string, flags Flags, seq uint64, plaintext []byte) []byte {
	start := len(dst)
	dst = Header{Version: Version, Flags: flags, Epoch: s.epoch, Sender: s.sender, Seq: seq}.AppendTo(dst)
	sc := scratchPool.Get().(*scratch)
	putNonce(&sc.nonce, seq)
	ad := appendAD(sc.ad[:0], dst[start:], s.group, topic)
	dst = s.aead.Seal(dst, sc.nonce[:], plaintext, ad)
	scratchPool.Put(sc)
	return dst
}
