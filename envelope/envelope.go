package envelope

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
)

// Protocol constants of envelope version 1.
const (
	Version   = 1                  // wire format version in the first header byte
	HeaderLen = 22                 // version, flags, epoch, sender, seq
	TagLen    = 16                 // AES-GCM authentication tag
	Overhead  = HeaderLen + TagLen // bytes an envelope adds to its plaintext
	KeyLen    = 32                 // group keys and sender subkeys (AES-256)
	NonceLen  = 12                 // AES-GCM nonce: 4 zero bytes ‖ seq

	MaxGroupLen = 255   // group names are 1..MaxGroupLen bytes (u8 length in the AD)
	MaxTopicLen = 65535 // topics are 1..MaxTopicLen bytes (u16 length in the AD)

	// MaxPlaintextLen bounds a single envelope's plaintext: AES-GCM with a
	// 96-bit nonce can encrypt at most 2^32-2 blocks. MQTT's own limit
	// (256 MiB) is far below it.
	MaxPlaintextLen = (1<<32 - 2) * 16

	// DeriveInfo is the HKDF info prefix of the per-sender subkey.
	DeriveInfo = "smqtt/v1 data"
)

// Header field offsets.
const (
	offVersion = 0
	offFlags   = 1
	offEpoch   = 2
	offSender  = 6
	offSeq     = 14
)

// Flags are the per-message flag bits of the header. Bits other than
// FlagRetain, FlagReseal, FlagWill and FlagProps are reserved and must be
// zero.
type Flags uint8

const (
	// FlagRetain marks a message the application published with the MQTT
	// retain flag. An empty plaintext with FlagRetain is a tombstone: it clears
	// the retained value.
	FlagRetain Flags = 1 << 0
	// FlagReseal marks a retained value sealed again under a new epoch.
	// Receivers update their retained store but do not deliver it again.
	// FlagReseal is only valid together with FlagRetain.
	FlagReseal Flags = 1 << 1
	// FlagWill marks an MQTT Will: sealed when the application connected,
	// published by the broker when its connection ends. Receivers check
	// Wills against a register of their own instead of the sliding window
	// (a Will's seq is older than everything its sender sealed since).
	FlagWill Flags = 1 << 2
	// FlagProps says the plaintext starts with sealed MQTT 5 properties
	// (see [AppendProps] and [SplitProps]).
	FlagProps Flags = 1 << 3
	// FlagProof says a sender proof follows the tag (sender_auth groups:
	// see proof.go and docs/PROTOCOL.md 1.10).
	FlagProof Flags = 1 << 4

	knownFlags = FlagRetain | FlagReseal | FlagWill | FlagProps | FlagProof
)

// Valid reports whether f has no reserved bits set and FlagReseal, if set,
// comes with FlagRetain and without FlagWill.
func (f Flags) Valid() bool {
	return f&^knownFlags == 0 && (f&FlagReseal == 0 || f&FlagRetain != 0 && f&FlagWill == 0)
}

// Retain reports whether FlagRetain is set.
func (f Flags) Retain() bool { return f&FlagRetain != 0 }

// Reseal reports whether FlagReseal is set.
func (f Flags) Reseal() bool { return f&FlagReseal != 0 }

// Will reports whether FlagWill is set.
func (f Flags) Will() bool { return f&FlagWill != 0 }

// Props reports whether FlagProps is set.
func (f Flags) Props() bool { return f&FlagProps != 0 }

// Proof reports whether FlagProof is set.
func (f Flags) Proof() bool { return f&FlagProof != 0 }

// String returns the flags as "retain|reseal", "retain", "0", or with a hex
// remainder for reserved bits, for logs.
func (f Flags) String() string {
	var parts []string
	if f.Retain() {
		parts = append(parts, "retain")
	}
	if f.Reseal() {
		parts = append(parts, "reseal")
	}
	if f.Will() {
		parts = append(parts, "will")
	}
	if f.Props() {
		parts = append(parts, "props")
	}
	if f.Proof() {
		parts = append(parts, "proof")
	}
	if rest := f &^ knownFlags; rest != 0 {
		parts = append(parts, fmt.Sprintf("0x%02x", uint8(rest)))
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, "|")
}

// GroupKey is the key of one group in one epoch, as distributed by the key
// server (or read from a static key file).
type GroupKey [KeyLen]byte

// Errors returned by this package. Open's errors wrap exactly one of
// ErrMalformed, ErrVersion, ErrNoKey or ErrAuth.
var (
	// ErrMalformed: the message is too short, has reserved flag bits set, or
	// has sequence number 0; or an argument (group, topic, flags, seq) is out
	// of range.
	ErrMalformed = errors.New("envelope: malformed")
	// ErrVersion: the message has a version this package does not speak.
	ErrVersion = errors.New("envelope: unsupported version")
	// ErrNoKey: no key is known (or it was retired) for the message's
	// group and epoch.
	ErrNoKey = errors.New("envelope: no key for epoch")
	// ErrAuth: the AEAD check failed: the message was altered, sealed under
	// another key, or sealed for another topic or group.
	ErrAuth = errors.New("envelope: authentication failed")
	// ErrSeqExhausted: a Sealer has used every sequence number.
	ErrSeqExhausted = errors.New("envelope: sequence numbers exhausted")
)

// Reason maps an error returned by [Opener.Open] or [ProofChecker.Check] to
// a short metric label: "malformed", "version", "no_key", "auth" or
// "sender_auth". It returns "" for nil and
// "other" for errors that did not come from Open. Callers add "replay" for
// messages their [ReplayWindow] rejects.
func Reason(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrAuth):
		return "auth"
	case errors.Is(err, ErrProof):
		return "sender_auth"
	case errors.Is(err, ErrNoKey):
		return "no_key"
	case errors.Is(err, ErrVersion):
		return "version"
	case errors.Is(err, ErrMalformed):
		return "malformed"
	default:
		return "other"
	}
}

// Header is the cleartext, authenticated header of an envelope.
type Header struct {
	Version uint8  // Version for every envelope this package seals
	Flags   Flags  // FlagRetain, FlagReseal, FlagWill, FlagProps
	Epoch   uint32 // opaque key id: the key ring maps (group, epoch) to a GroupKey
	Sender  uint64 // the sealing process's sender id, fresh per process start
	Seq     uint64 // per-sender sequence number, from 1, never 0, never wraps
}

// AppendTo appends the HeaderLen-byte encoding of h to dst. It encodes the
// fields as they are, without validating them.
func (h Header) AppendTo(dst []byte) []byte {
	dst = append(dst, h.Version, byte(h.Flags))
	dst = binary.BigEndian.AppendUint32(dst, h.Epoch)
	dst = binary.BigEndian.AppendUint64(dst, h.Sender)
	return binary.BigEndian.AppendUint64(dst, h.Seq)
}

// ParseHeader decodes the header of the envelope msg. It checks that msg is
// at least Overhead bytes long (ErrMalformed), that the version is Version
// (ErrVersion), that the flags are valid and that seq is not 0
// (ErrMalformed). The header is not authenticated until [Opener.Open]
// succeeds on msg.
func ParseHeader(msg []byte) (Header, error) {
	if len(msg) < Overhead {
		return Header{}, fmt.Errorf("%w: message is %d bytes, shorter than the %d-byte minimum", ErrMalformed, len(msg), Overhead)
	}
	h := Header{
		Version: msg[offVersion],
		Flags:   Flags(msg[offFlags]),
		Epoch:   binary.BigEndian.Uint32(msg[offEpoch:]),
		Sender:  binary.BigEndian.Uint64(msg[offSender:]),
		Seq:     binary.BigEndian.Uint64(msg[offSeq:]),
	}
	if h.Version != Version {
		return Header{}, fmt.Errorf("%w: version %d (want %d)", ErrVersion, h.Version, Version)
	}
	if !h.Flags.Valid() {
		return Header{}, fmt.Errorf("%w: invalid flags 0x%02x", ErrMalformed, uint8(h.Flags))
	}
	if h.Seq == 0 {
		return Header{}, fmt.Errorf("%w: sequence number 0", ErrMalformed)
	}
	return h, nil
}

// DeriveSenderKey returns the AES-256-GCM key with which sender seals in
// (group, epoch):
//
//	HKDF-SHA256(secret = key, salt = "",
//	            info = "smqtt/v1 data" ‖ u8 len(group) ‖ group ‖ u32 epoch ‖ u64 sender)
//
// It panics if group is not 1 to MaxGroupLen bytes long; [NewSealer] and
// [Opener.Open] check that first and return an error instead.
func DeriveSenderKey(key *GroupKey, group string, epoch uint32, sender uint64) [KeyLen]byte {
	if err := checkGroup(group); err != nil {
		panic(err)
	}
	var info [len(DeriveInfo) + 1 + MaxGroupLen + 4 + 8]byte
	b := append(info[:0], DeriveInfo...)
	b = append(b, byte(len(group)))
	b = append(b, group...)
	b = binary.BigEndian.AppendUint32(b, epoch)
	b = binary.BigEndian.AppendUint64(b, sender)
	k, err := hkdf.Key(sha256.New, key[:], nil, string(b), KeyLen)
	if err != nil {
		panic("envelope: HKDF-SHA256 refused a 32-byte output: " + err.Error())
	}
	var out [KeyLen]byte
	copy(out[:], k)
	clear(k)
	return out
}

func checkGroup(group string) error {
	if len(group) < 1 || len(group) > MaxGroupLen {
		return fmt.Errorf("%w: group name is %d bytes, want 1 to %d", ErrMalformed, len(group), MaxGroupLen)
	}
	return nil
}

func checkTopic(topic string) error {
	if len(topic) < 1 || len(topic) > MaxTopicLen {
		return fmt.Errorf("%w: topic is %d bytes, want 1 to %d", ErrMalformed, len(topic), MaxTopicLen)
	}
	return nil
}

// appendAD appends the associated data of an envelope to dst:
//
//	header (22 bytes) ‖ u8 len(group) ‖ group ‖ u16 len(topic) ‖ topic
//
// group and topic must already have been checked.
func appendAD(dst, header []byte, group, topic string) []byte {
	dst = append(dst, header[:HeaderLen]...)
	dst = append(dst, byte(len(group)))
	dst = append(dst, group...)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(topic)))
	return append(dst, topic...)
}

// putNonce writes the nonce of seq: 4 zero bytes ‖ u64 seq.
func putNonce(nonce *[NonceLen]byte, seq uint64) {
	nonce[0], nonce[1], nonce[2], nonce[3] = 0, 0, 0, 0
	binary.BigEndian.PutUint64(nonce[4:], seq)
}

// scratch holds the nonce and associated data of one Seal or Open call. The
// buffers escape through the cipher.AEAD interface, so they come from a pool
// rather than the stack; topics longer than the pooled buffer fall back to an
// allocation inside appendAD.
type scratch struct {
	nonce [NonceLen]byte
	ad    [HeaderLen + 1 + MaxGroupLen + 2 + 512]byte
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}
