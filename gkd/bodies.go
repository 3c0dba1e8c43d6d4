package gkd

import (
	"encoding"
	"encoding/binary"
	"fmt"
	"math"
	"time"
	"unicode/utf8"
)

// A Body is the decoded body of a key-distribution message: one of
// [JoinRequest], [JoinResponse], [Refusal], [Rekey], [Leave], [Heartbeat],
// [Policy], [Register], [Challenge], [ChallengeResponse], [RekeyAck],
// [GroupRekey] and [Roster].
// MarshalBinary encodes it as specified in docs/PROTOCOL.md (section 2.5);
// the matching Parse function decodes it.
type Body interface {
	encoding.BinaryMarshaler
	// Type returns the message type that carries this body.
	Type() MsgType
}

// ParseBody decodes the body of a message of type t: the plain body, or for
// a sealed type the plaintext that [Identity.OpenBody] returned.
func ParseBody(t MsgType, b []byte) (Body, error) {
	switch t {
	case TypeJoinRequest:
		return asBody(ParseJoinRequest(b))
	case TypeJoinResponse:
		return asBody(ParseJoinResponse(b))
	case TypeRefusal:
		return asBody(ParseRefusal(b))
	case TypeRekey:
		return asBody(ParseRekey(b))
	case TypeLeave:
		return asBody(ParseLeave(b))
	case TypeHeartbeat:
		return asBody(ParseHeartbeat(b))
	case TypePolicy:
		return asBody(ParsePolicy(b))
	case TypeRegister:
		return asBody(ParseRegister(b))
	case TypeChallenge:
		return asBody(ParseChallenge(b))
	case TypeChallengeResponse:
		return asBody(ParseChallengeResponse(b))
	case TypeRekeyAck:
		return asBody(ParseRekeyAck(b))
	case TypeGroupRekey:
		return asBody(ParseGroupRekey(b))
	case TypeRoster:
		return asBody(ParseRoster(b))
	}
	return nil, fmt.Errorf("%w: unknown type %d", ErrMalformed, uint8(t))
}

// asBody turns a Parse function's result into ParseBody's.
func asBody[T Body](v T, err error) (Body, error) {
	if err != nil {
		return nil, err
	}
	return v, nil
}

// A Scheme is a group-key method.
type Scheme uint8

// The group-key schemes.
const (
	SchemeStatic  Scheme = 1 // one key for the group's lifetime
	SchemeUpdate  Scheme = 2 // a new key at every membership change
	SchemeSlotted Scheme = 3 // time-slot keys from hash trees
	SchemeLKH     Scheme = 4 // logical key hierarchy
)

// String returns the scheme's configuration name (static, update, slotted,
// lkh).
func (s Scheme) String() string {
	switch s {
	case SchemeStatic:
		return "static"
	case SchemeUpdate:
		return "update"
	case SchemeSlotted:
		return "slotted"
	case SchemeLKH:
		return "lkh"
	}
	return fmt.Sprintf("Scheme(%d)", uint8(s))
}

func (s Scheme) known() bool { return s >= SchemeStatic && s <= SchemeLKH }

// A RefusalCode says why the key server refused a request.
type RefusalCode uint8

// The refusal codes.
const (
	RefusalUnknownMember RefusalCode = 1 // the sender is not a configured member
	RefusalNotAuthorised RefusalCode = 2 // the member may not join this group
	RefusalUnknownGroup  RefusalCode = 3 // no such group
	RefusalRateLimited   RefusalCode = 4 // too many requests; try again later
	RefusalRevoked       RefusalCode = 5 // the member was revoked
	RefusalBadRequest    RefusalCode = 6 // the request made no sense
)

// String returns a short description of the code.
func (c RefusalCode) String() string {
	switch c {
	case RefusalUnknownMember:
		return "unknown member"
	case RefusalNotAuthorised:
		return "not authorised for group"
	case RefusalUnknownGroup:
		return "unknown group"
	case RefusalRateLimited:
		return "rate limited"
	case RefusalRevoked:
		return "revoked"
	case RefusalBadRequest:
		return "bad request"
	}
	return fmt.Sprintf("RefusalCode(%d)", uint8(c))
}

func (c RefusalCode) known() bool { return c >= RefusalUnknownMember && c <= RefusalBadRequest }

// A LeaveReason says why a member leaves.
type LeaveReason uint8

// The leave reasons.
const (
	LeaveShutdown LeaveReason = 1 // a clean shutdown, sent by the member
	LeaveWill     LeaveReason = 2 // the member's Will, published by the broker
)

// String returns "shutdown" or "will".
func (r LeaveReason) String() string {
	switch r {
	case LeaveShutdown:
		return "shutdown"
	case LeaveWill:
		return "will"
	}
	return fmt.Sprintf("LeaveReason(%d)", uint8(r))
}

func (r LeaveReason) known() bool { return r == LeaveShutdown || r == LeaveWill }

// JoinRequest asks the key server for a group's key (member → server, plain).
type JoinRequest struct {
	Group  [8]byte  // [GroupID] of the group
	ConnID [16]byte // the member's current connection id (see [Register])
}

// JoinResponse hands a member a group's current key (server → member,
// sealed).
type JoinResponse struct {
	Group        [8]byte
	RequestNonce [NonceSize]byte // the header nonce of the JoinRequest answered
	Scheme       Scheme
	Epoch        uint32
	Sender       uint64 // the member's data-plane sender id, fresh for each join
	Key          [GroupKeySize]byte
	Counter      uint64    // the group's message counter
	ActivateAt   time.Time // when to start sending under Key; zero: at once
	Flags        GroupFlags
	Roster       uint64 // sender_auth: the roster version the member must hold; 0 otherwise
	Ext          []byte // scheme-specific, may be empty
}

// GroupFlags are a group's settings that members must know.
type GroupFlags uint8

// The group flags; the others are reserved and must be zero.
const (
	// FlagSenderAuth: members sign what they seal (docs/PROTOCOL.md 1.10),
	// and receivers accept only what a sender in the group's [Roster]
	// signed.
	FlagSenderAuth GroupFlags = 1 << 0
)

// SenderAuth reports whether FlagSenderAuth is set.
func (f GroupFlags) SenderAuth() bool { return f&FlagSenderAuth != 0 }

// Refusal answers a request that the key server refuses (server → member,
// plain).
type Refusal struct {
	Group        [8]byte
	RequestNonce [NonceSize]byte // the header nonce of the request refused
	Code         RefusalCode
	Reason       string // for people; at most 65535 bytes of UTF-8
}

// Rekey hands a member a group's next key (server → member, sealed).
type Rekey struct {
	Group         [8]byte
	Epoch         uint32
	Key           [GroupKeySize]byte
	Counter       uint64    // the group's message counter
	ActivateAt    time.Time // when senders switch to Key
	PrevSendUntil time.Time // when senders stop using the previous epoch
	PrevOpenUntil time.Time // until when the previous epoch may be opened
	Ext           []byte    // scheme-specific, may be empty
}

// Leave says a member leaves a group, or every group (member → server,
// plain). The Will that a member leaves with the broker is a Leave with
// reason [LeaveWill]; it is signed when the member connects, so its header
// time may be old, and the key server accepts it without the time window but
// only for the member's current ConnID, once (docs/PROTOCOL.md, 2.6).
type Leave struct {
	Group  [8]byte // all zero: every group
	ConnID [16]byte
	Reason LeaveReason
}

// Heartbeat proves a group's current epoch is fresh (server → group, plain).
// The server's time is the header's.
type Heartbeat struct {
	Group   [8]byte
	Epoch   uint32
	Counter uint64
	Roster  uint64 // sender_auth: the current roster version; 0 otherwise
}

// Roster says which member signs as which sender id in a sender_auth group
// (server → group, broadcast, or → one member after its JoinResponse;
// plain, signed). A roster too large for one message travels in Parts
// messages of one Version, numbered from 0; a member installs a version
// once it holds every part.
type Roster struct {
	Group   [8]byte
	Version uint64 // increasing with every change of the group's senders
	Part    uint16
	Parts   uint16        // at least 1
	Senders []RosterEntry // at most 65535 in one part
}

// A RosterEntry certifies one sender id: the member whose Ed25519 key
// signs its envelopes.
type RosterEntry struct {
	Sender uint64
	Member [8]byte  // the member's id
	Key    [32]byte // its Ed25519 public key (of its identity)
}

// RosterEntrySize is the encoded size of one RosterEntry.
const RosterEntrySize = 8 + 8 + 32

// Policy lists every protected topic filter (server → every member, plain).
type Policy struct {
	Version uint64
	Entries []PolicyEntry // at most 65535
}

// A PolicyEntry maps an MQTT topic filter to the group that protects it.
type PolicyEntry struct {
	Group  [8]byte
	Filter string // at most 65535 bytes of UTF-8
}

// Register tells the key server a member's new connection id after each
// connection to the broker (member → server, plain).
type Register struct {
	ConnID [16]byte
}

// Challenge asks a member whose Will arrived to prove it is alive (server →
// member, plain).
type Challenge struct {
	Value [16]byte // random
}

// ChallengeResponse echoes a Challenge (member → server, plain).
type ChallengeResponse struct {
	Value [16]byte
}

// RekeyAck acknowledges a Rekey (member → server, plain).
type RekeyAck struct {
	Group   [8]byte
	Epoch   uint32
	Counter uint64
}

// GroupRekey carries one chunk of an lkh rekey to the whole group (server →
// group, plain). The chunk ([LKHRekey.Chunks]) holds only wrapped keys, so it
// needs no sealing: a member unwraps what its path keys open
// ([LKHMember.Apply]). The chunks of one rekey share its Counter.
type GroupRekey struct {
	Group         [8]byte
	Counter       uint64    // the group's message counter
	ActivateAt    time.Time // when senders switch to the new group key
	PrevSendUntil time.Time // when senders stop using the previous epoch
	PrevOpenUntil time.Time // until when the previous epoch may be opened
	Chunk         []byte    // one chunk of the rekey's wrapped keys
}

// Type returns TypeRoster.
func (Roster) Type() MsgType { return TypeRoster }

// Type returns TypeJoinRequest.
func (JoinRequest) Type() MsgType { return TypeJoinRequest }

// Type returns TypeJoinResponse.
func (JoinResponse) Type() MsgType { return TypeJoinResponse }

// Type returns TypeRefusal.
func (Refusal) Type() MsgType { return TypeRefusal }

// Type returns TypeRekey.
func (Rekey) Type() MsgType { return TypeRekey }

// Type returns TypeLeave.
func (Leave) Type() MsgType { return TypeLeave }

// Type returns TypeHeartbeat.
func (Heartbeat) Type() MsgType { return TypeHeartbeat }

// Type returns TypePolicy.
func (Policy) Type() MsgType { return TypePolicy }

// Type returns TypeRegister.
func (Register) Type() MsgType { return TypeRegister }

// Type returns TypeChallenge.
func (Challenge) Type() MsgType { return TypeChallenge }

// Type returns TypeChallengeResponse.
func (ChallengeResponse) Type() MsgType { return TypeChallengeResponse }

// Type returns TypeRekeyAck.
func (RekeyAck) Type() MsgType { return TypeRekeyAck }

// Type returns TypeGroupRekey.
func (GroupRekey) Type() MsgType { return TypeGroupRekey }

// MarshalBinary encodes the JoinRequest body.
func (b JoinRequest) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeJoinRequest, 8+16)
	w.bytes(b.Group[:])
	w.bytes(b.ConnID[:])
	return w.result()
}

// MarshalBinary encodes the JoinResponse body.
func (b JoinResponse) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeJoinResponse, 8+NonceSize+1+4+8+GroupKeySize+8+8+1+8+4+len(b.Ext))
	w.bytes(b.Group[:])
	w.bytes(b.RequestNonce[:])
	w.scheme(b.Scheme)
	w.u32(b.Epoch)
	w.u64(b.Sender)
	w.bytes(b.Key[:])
	w.u64(b.Counter)
	w.time("activate_at", b.ActivateAt)
	w.groupFlags(b.Flags)
	w.u64(b.Roster)
	w.blob32("ext", b.Ext)
	return w.result()
}

// MarshalBinary encodes the Refusal body.
func (b Refusal) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeRefusal, 8+NonceSize+1+2+len(b.Reason))
	w.bytes(b.Group[:])
	w.bytes(b.RequestNonce[:])
	if !b.Code.known() {
		w.fail("code %d unknown", uint8(b.Code))
	}
	w.u8(uint8(b.Code))
	w.string16("reason", b.Reason)
	return w.result()
}

// MarshalBinary encodes the Rekey body.
func (b Rekey) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeRekey, 8+4+GroupKeySize+8+8+8+8+4+len(b.Ext))
	w.bytes(b.Group[:])
	w.u32(b.Epoch)
	w.bytes(b.Key[:])
	w.u64(b.Counter)
	w.time("activate_at", b.ActivateAt)
	w.time("prev_send_until", b.PrevSendUntil)
	w.time("prev_open_until", b.PrevOpenUntil)
	w.blob32("ext", b.Ext)
	return w.result()
}

// MarshalBinary encodes the Leave body.
func (b Leave) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeLeave, 8+16+1)
	w.bytes(b.Group[:])
	w.bytes(b.ConnID[:])
	if !b.Reason.known() {
		w.fail("reason %d unknown", uint8(b.Reason))
	}
	w.u8(uint8(b.Reason))
	return w.result()
}

// MarshalBinary encodes the Heartbeat body.
func (b Heartbeat) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeHeartbeat, 8+4+8+8)
	w.bytes(b.Group[:])
	w.u32(b.Epoch)
	w.u64(b.Counter)
	w.u64(b.Roster)
	return w.result()
}

// MarshalBinary encodes the Roster body.
func (b Roster) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeRoster, 8+8+2+2+2+len(b.Senders)*RosterEntrySize)
	w.bytes(b.Group[:])
	w.u64(b.Version)
	w.u16(b.Part)
	w.u16(b.Parts)
	switch {
	case b.Parts == 0 || b.Part >= b.Parts:
		w.fail("part %d of %d", b.Part, b.Parts)
	case len(b.Senders) > math.MaxUint16:
		w.fail("%d senders in one part, more than %d", len(b.Senders), math.MaxUint16)
	}
	w.u16(uint16(len(b.Senders)))
	for _, e := range b.Senders {
		w.u64(e.Sender)
		w.bytes(e.Member[:])
		w.bytes(e.Key[:])
	}
	return w.result()
}

// MarshalBinary encodes the Policy body.
func (b Policy) MarshalBinary() ([]byte, error) {
	n := 8 + 2
	for _, e := range b.Entries {
		n += 8 + 2 + len(e.Filter)
	}
	w := newWriter(TypePolicy, n)
	w.u64(b.Version)
	if len(b.Entries) > math.MaxUint16 {
		w.fail("%d entries, more than %d", len(b.Entries), math.MaxUint16)
	}
	w.u16(uint16(len(b.Entries)))
	for i, e := range b.Entries {
		w.bytes(e.Group[:])
		w.string16(fmt.Sprintf("entries[%d].filter", i), e.Filter)
	}
	return w.result()
}

// MarshalBinary encodes the Register body.
func (b Register) MarshalBinary() ([]byte, error) {
	return append([]byte(nil), b.ConnID[:]...), nil
}

// MarshalBinary encodes the Challenge body.
func (b Challenge) MarshalBinary() ([]byte, error) {
	return append([]byte(nil), b.Value[:]...), nil
}

// MarshalBinary encodes the ChallengeResponse body.
func (b ChallengeResponse) MarshalBinary() ([]byte, error) {
	return append([]byte(nil), b.Value[:]...), nil
}

// MarshalBinary encodes the RekeyAck body.
func (b RekeyAck) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeRekeyAck, 8+4+8)
	w.bytes(b.Group[:])
	w.u32(b.Epoch)
	w.u64(b.Counter)
	return w.result()
}

// MarshalBinary encodes the GroupRekey body.
func (b GroupRekey) MarshalBinary() ([]byte, error) {
	w := newWriter(TypeGroupRekey, 8+8+8+8+8+4+len(b.Chunk))
	w.bytes(b.Group[:])
	w.u64(b.Counter)
	w.time("activate_at", b.ActivateAt)
	w.time("prev_send_until", b.PrevSendUntil)
	w.time("prev_open_until", b.PrevOpenUntil)
	w.blob32("chunk", b.Chunk)
	return w.result()
}

// Parse functions. Each rejects truncated input, trailing bytes, unknown
// enumeration values, invalid UTF-8 and out-of-range times with an error
// wrapping ErrMalformed, so that an accepted body re-encodes to the same
// bytes.

// ParseJoinRequest decodes a JoinRequest body.
func ParseJoinRequest(b []byte) (JoinRequest, error) {
	var v JoinRequest
	r := bodyReader(TypeJoinRequest, b)
	r.array("group", v.Group[:])
	r.array("conn_id", v.ConnID[:])
	return finish(v, &r)
}

// ParseJoinResponse decodes the plaintext of a JoinResponse body.
func ParseJoinResponse(b []byte) (JoinResponse, error) {
	var v JoinResponse
	r := bodyReader(TypeJoinResponse, b)
	r.array("group", v.Group[:])
	r.array("request_nonce", v.RequestNonce[:])
	v.Scheme = Scheme(r.u8("scheme"))
	if r.err == nil && !v.Scheme.known() {
		r.fail("unknown scheme %d", uint8(v.Scheme))
	}
	v.Epoch = r.u32("epoch")
	v.Sender = r.u64("sender")
	r.array("key", v.Key[:])
	v.Counter = r.u64("counter")
	v.ActivateAt = r.time("activate_at")
	v.Flags = GroupFlags(r.u8("flags"))
	if r.err == nil && v.Flags&^FlagSenderAuth != 0 {
		r.fail("reserved flags 0x%02x", uint8(v.Flags))
	}
	v.Roster = r.u64("roster")
	v.Ext = r.blob32("ext")
	return finish(v, &r)
}

// ParseRefusal decodes a Refusal body.
func ParseRefusal(b []byte) (Refusal, error) {
	var v Refusal
	r := bodyReader(TypeRefusal, b)
	r.array("group", v.Group[:])
	r.array("request_nonce", v.RequestNonce[:])
	v.Code = RefusalCode(r.u8("code"))
	if r.err == nil && !v.Code.known() {
		r.fail("unknown code %d", uint8(v.Code))
	}
	v.Reason = r.string16("reason")
	return finish(v, &r)
}

// ParseRekey decodes the plaintext of a Rekey body.
func ParseRekey(b []byte) (Rekey, error) {
	var v Rekey
	r := bodyReader(TypeRekey, b)
	r.array("group", v.Group[:])
	v.Epoch = r.u32("epoch")
	r.array("key", v.Key[:])
	v.Counter = r.u64("counter")
	v.ActivateAt = r.time("activate_at")
	v.PrevSendUntil = r.time("prev_send_until")
	v.PrevOpenUntil = r.time("prev_open_until")
	v.Ext = r.blob32("ext")
	return finish(v, &r)
}

// ParseLeave decodes a Leave body.
func ParseLeave(b []byte) (Leave, error) {
	var v Leave
	r := bodyReader(TypeLeave, b)
	r.array("group", v.Group[:])
	r.array("conn_id", v.ConnID[:])
	v.Reason = LeaveReason(r.u8("reason"))
	if r.err == nil && !v.Reason.known() {
		r.fail("unknown reason %d", uint8(v.Reason))
	}
	return finish(v, &r)
}

// ParseHeartbeat decodes a Heartbeat body.
func ParseHeartbeat(b []byte) (Heartbeat, error) {
	var v Heartbeat
	r := bodyReader(TypeHeartbeat, b)
	r.array("group", v.Group[:])
	v.Epoch = r.u32("epoch")
	v.Counter = r.u64("counter")
	v.Roster = r.u64("roster")
	return finish(v, &r)
}

// ParseRoster decodes a Roster body.
func ParseRoster(b []byte) (Roster, error) {
	var v Roster
	r := bodyReader(TypeRoster, b)
	r.array("group", v.Group[:])
	v.Version = r.u64("version")
	v.Part = r.u16("part")
	v.Parts = r.u16("parts")
	if r.err == nil && (v.Parts == 0 || v.Part >= v.Parts) {
		r.fail("part %d of %d", v.Part, v.Parts)
	}
	n := int(r.u16("count"))
	// Do not trust n for the allocation: each entry takes RosterEntrySize.
	v.Senders = make([]RosterEntry, 0, min(n, len(r.b)/RosterEntrySize))
	for i := 0; i < n && r.err == nil; i++ {
		var e RosterEntry
		e.Sender = r.u64(fmt.Sprintf("senders[%d].sender", i))
		r.array(fmt.Sprintf("senders[%d].member", i), e.Member[:])
		r.array(fmt.Sprintf("senders[%d].key", i), e.Key[:])
		v.Senders = append(v.Senders, e)
	}
	return finish(v, &r)
}

// ParsePolicy decodes a Policy body.
func ParsePolicy(b []byte) (Policy, error) {
	var v Policy
	r := bodyReader(TypePolicy, b)
	v.Version = r.u64("version")
	n := int(r.u16("count"))
	// Each entry takes at least 10 bytes: do not trust n for the allocation.
	v.Entries = make([]PolicyEntry, 0, min(n, len(r.b)/10))
	for i := 0; i < n && r.err == nil; i++ {
		var e PolicyEntry
		r.array(fmt.Sprintf("entries[%d].group", i), e.Group[:])
		e.Filter = r.string16(fmt.Sprintf("entries[%d].filter", i))
		v.Entries = append(v.Entries, e)
	}
	return finish(v, &r)
}

// ParseRegister decodes a Register body.
func ParseRegister(b []byte) (Register, error) {
	var v Register
	r := bodyReader(TypeRegister, b)
	r.array("conn_id", v.ConnID[:])
	return finish(v, &r)
}

// ParseChallenge decodes a Challenge body.
func ParseChallenge(b []byte) (Challenge, error) {
	var v Challenge
	r := bodyReader(TypeChallenge, b)
	r.array("challenge", v.Value[:])
	return finish(v, &r)
}

// ParseChallengeResponse decodes a ChallengeResponse body.
func ParseChallengeResponse(b []byte) (ChallengeResponse, error) {
	var v ChallengeResponse
	r := bodyReader(TypeChallengeResponse, b)
	r.array("challenge", v.Value[:])
	return finish(v, &r)
}

// ParseRekeyAck decodes a RekeyAck body.
func ParseRekeyAck(b []byte) (RekeyAck, error) {
	var v RekeyAck
	r := bodyReader(TypeRekeyAck, b)
	r.array("group", v.Group[:])
	v.Epoch = r.u32("epoch")
	v.Counter = r.u64("counter")
	return finish(v, &r)
}

// ParseGroupRekey decodes a GroupRekey body. It does not look inside the
// chunk: [LKHMember.Apply] does.
func ParseGroupRekey(b []byte) (GroupRekey, error) {
	var v GroupRekey
	r := bodyReader(TypeGroupRekey, b)
	r.array("group", v.Group[:])
	v.Counter = r.u64("counter")
	v.ActivateAt = r.time("activate_at")
	v.PrevSendUntil = r.time("prev_send_until")
	v.PrevOpenUntil = r.time("prev_open_until")
	v.Chunk = r.blob32("chunk")
	return finish(v, &r)
}

// writer appends big-endian fields and remembers the first error.
type writer struct {
	typ MsgType
	b   []byte
	err error
}

func newWriter(typ MsgType, size int) *writer {
	return &writer{typ: typ, b: make([]byte, 0, size)}
}

func (w *writer) fail(format string, args ...any) {
	if w.err == nil {
		w.err = fmt.Errorf("gkd: marshal %s body: %s", w.typ, fmt.Sprintf(format, args...))
	}
}

func (w *writer) bytes(p []byte) { w.b = append(w.b, p...) }
func (w *writer) u8(v uint8)     { w.b = append(w.b, v) }
func (w *writer) u16(v uint16)   { w.b = binary.BigEndian.AppendUint16(w.b, v) }
func (w *writer) u32(v uint32)   { w.b = binary.BigEndian.AppendUint32(w.b, v) }
func (w *writer) u64(v uint64)   { w.b = binary.BigEndian.AppendUint64(w.b, v) }

func (w *writer) groupFlags(f GroupFlags) {
	if f&^FlagSenderAuth != 0 {
		w.fail("reserved group flags 0x%02x", uint8(f))
	}
	w.u8(uint8(f))
}

func (w *writer) scheme(s Scheme) {
	if !s.known() {
		w.fail("scheme %d unknown", uint8(s))
	}
	w.u8(uint8(s))
}

func (w *writer) time(field string, t time.Time) {
	ms, err := millis(t)
	if err != nil {
		w.fail("%s: %v", field, err)
	}
	w.u64(ms)
}

func (w *writer) string16(field, s string) {
	if len(s) > math.MaxUint16 {
		w.fail("%s is %d bytes, more than %d", field, len(s), math.MaxUint16)
	}
	if !utf8.ValidString(s) {
		w.fail("%s is not valid UTF-8", field)
	}
	w.u16(uint16(len(s)))
	w.b = append(w.b, s...)
}

func (w *writer) blob32(field string, p []byte) {
	if len(p) > MaxBodySize {
		w.fail("%s is %d bytes, more than %d", field, len(p), MaxBodySize)
	}
	w.u32(uint32(len(p)))
	w.b = append(w.b, p...)
}

func (w *writer) result() ([]byte, error) {
	if w.err != nil {
		return nil, w.err
	}
	return w.b, nil
}

// reader consumes big-endian fields and remembers the first error; after an
// error every read returns zero.
type reader struct {
	what string // for errors: "JoinRequest body", "lkh tree"
	b    []byte
	off  int
	err  error
}

// bodyReader reads the body of a message of type typ.
func bodyReader(typ MsgType, b []byte) reader { return reader{what: typ.String() + " body", b: b} }

func (r *reader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: %s: %s", ErrMalformed, r.what, fmt.Sprintf(format, args...))
	}
}

// next returns the next n bytes, or nil after recording an error.
func (r *reader) next(field string, n int) []byte {
	if r.err != nil {
		return nil
	}
	if n > len(r.b)-r.off {
		r.fail("truncated: %s needs %d bytes at offset %d, %d left", field, n, r.off, len(r.b)-r.off)
		return nil
	}
	p := r.b[r.off : r.off+n]
	r.off += n
	return p
}

func (r *reader) array(field string, dst []byte) { copy(dst, r.next(field, len(dst))) }

func (r *reader) u8(field string) uint8 {
	if p := r.next(field, 1); p != nil {
		return p[0]
	}
	return 0
}

func (r *reader) u16(field string) uint16 {
	if p := r.next(field, 2); p != nil {
		return binary.BigEndian.Uint16(p)
	}
	return 0
}

func (r *reader) u32(field string) uint32 {
	if p := r.next(field, 4); p != nil {
		return binary.BigEndian.Uint32(p)
	}
	return 0
}

func (r *reader) u64(field string) uint64 {
	if p := r.next(field, 8); p != nil {
		return binary.BigEndian.Uint64(p)
	}
	return 0
}

func (r *reader) time(field string) time.Time {
	ms := r.u64(field)
	if ms > math.MaxInt64 {
		r.fail("%s %d out of range", field, ms)
		return time.Time{}
	}
	return timeFromMillis(ms)
}

func (r *reader) string16(field string) string {
	n := int(r.u16(field + " length"))
	p := r.next(field, n)
	if p != nil && !utf8.Valid(p) {
		r.fail("%s is not valid UTF-8", field)
		return ""
	}
	return string(p)
}

// blob32 returns a copy of a u32-length-prefixed byte string, nil if it is
// empty.
func (r *reader) blob32(field string) []byte {
	n := r.u32(field + " length")
	if r.err == nil && uint64(n) > uint64(len(r.b)-r.off) {
		r.fail("truncated: %s needs %d bytes at offset %d, %d left", field, n, r.off, len(r.b)-r.off)
		return nil
	}
	p := r.next(field, int(n))
	if len(p) == 0 {
		return nil
	}
	return append([]byte{}, p...)
}

// finish returns v, or the zero value and the reader's error.
func finish[T any](v T, r *reader) (T, error) {
	if err := r.done(); err != nil {
		var zero T
		return zero, err
	}
	return v, nil
}

// done reports the first error, or trailing bytes.
func (r *reader) done() error {
	if r.err == nil && r.off != len(r.b) {
		r.fail("%d trailing bytes after offset %d", len(r.b)-r.off, r.off)
	}
	return r.err
}
