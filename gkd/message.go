package gkd

import (
	"crypto/rand"
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"
)

// Key-distribution message layout (docs/PROTOCOL.md, section 2).
const (
	// Version is the only key-distribution protocol version.
	Version = 1
	// HeaderSize is the size of a message header.
	HeaderSize = 47
	// SignatureSize is the size of the Ed25519 signature that ends a message.
	SignatureSize = 64
	// MaxMessageSize bounds a whole message: header, body and signature.
	MaxMessageSize = 1 << 20
	// MaxBodySize bounds a message body as it travels (sealed or plain).
	MaxBodySize = MaxMessageSize - HeaderSize - SignatureSize
	// NonceSize is the size of the random nonce in every header.
	NonceSize = 16

	signContext = "smqtt/v1 gkd\x00"      // prefixes what a message signs
	sealContext = "smqtt/v1 gkd seal\x00" // prefixes the HPKE info of a sealed body
)

// Offsets of the header fields.
const (
	offType      = 1
	offFlags     = 2
	offSender    = 3
	offRecipient = 11
	offTime      = 19
	offNonce     = 27
	offBodyLen   = 43
)

// Errors of the key-distribution messages; check them with errors.Is. A body
// that does not open wraps [ErrDecrypt].
var (
	ErrMalformed = errors.New("gkd: malformed")
	ErrVersion   = errors.New("gkd: unsupported protocol version")
	ErrSignature = errors.New("gkd: bad signature")
	ErrStale     = errors.New("gkd: message time outside the freshness window")
	ErrReplay    = errors.New("gkd: replayed message")
	ErrBusy      = errors.New("gkd: replay cache full")
)

// A MsgType is the type byte of a key-distribution message.
type MsgType uint8

// The message types. JoinResponse and Rekey bodies are sealed to their
// recipient; the others travel in plain text, signed like every message.
const (
	TypeJoinRequest       MsgType = 1  // member → server
	TypeJoinResponse      MsgType = 2  // server → member, sealed
	TypeRefusal           MsgType = 3  // server → member
	TypeRekey             MsgType = 4  // server → member, sealed
	TypeLeave             MsgType = 5  // member → server (also as the Will)
	TypeHeartbeat         MsgType = 6  // server → group
	TypePolicy            MsgType = 7  // server → every member
	TypeRegister          MsgType = 8  // member → server
	TypeChallenge         MsgType = 9  // server → member
	TypeChallengeResponse MsgType = 10 // member → server
	TypeRekeyAck          MsgType = 11 // member → server
	TypeGroupRekey        MsgType = 12 // server → group (one chunk of an lkh rekey)
	TypeRoster            MsgType = 13 // server → group or member (sender_auth: who signs as which sender)

	maxType = TypeRoster
)

var typeNames = [...]string{
	TypeJoinRequest:       "JoinRequest",
	TypeJoinResponse:      "JoinResponse",
	TypeRefusal:           "Refusal",
	TypeRekey:             "Rekey",
	TypeLeave:             "Leave",
	TypeHeartbeat:         "Heartbeat",
	TypePolicy:            "Policy",
	TypeRegister:          "Register",
	TypeChallenge:         "Challenge",
	TypeChallengeResponse: "ChallengeResponse",
	TypeRekeyAck:          "RekeyAck",
	TypeGroupRekey:        "GroupRekey",
	TypeRoster:            "Roster",
}

// String returns the type's name, or "MsgType(N)" for an unknown type.
func (t MsgType) String() string {
	if t.Known() {
		return typeNames[t]
	}
	return fmt.Sprintf("MsgType(%d)", uint8(t))
}

// Known reports whether t is a type of this protocol version.
func (t MsgType) Known() bool { return t >= 1 && t <= maxType }

// Sealed reports whether bodies of type t are sealed to their recipient.
func (t MsgType) Sealed() bool { return t == TypeJoinResponse || t == TypeRekey }

// A Header is the cleartext header of a key-distribution message. The
// version, flags and body length are implied.
type Header struct {
	Type MsgType
	// Sender is the raw id ([PublicKey.RawID]) of the signing identity.
	Sender [8]byte
	// Recipient is the raw id of the recipient; all zero means broadcast.
	Recipient [8]byte
	// Time is the sender's clock when it built the message, carried in whole
	// Unix milliseconds. The zero Time travels as 0.
	Time time.Time
	// Nonce is random for each message.
	Nonce [NonceSize]byte
}

// A Message is a parsed key-distribution message. Parse checks its structure
// only: call Verify with the sender's public key before trusting any field,
// and before [Identity.OpenBody].
type Message struct {
	Header
	// Body is the body as it travelled: HPKE ciphertext for sealed types,
	// the encoded body otherwise.
	Body []byte
	// Sig is the sender's Ed25519 signature.
	Sig []byte

	signed   []byte // signContext || header || body, as received
	verified bool
}

// NewNonce returns a random message nonce.
func NewNonce() ([NonceSize]byte, error) {
	var n [NonceSize]byte
	if _, err := rand.Read(n[:]); err != nil {
		return n, fmt.Errorf("gkd: message nonce: %w", err)
	}
	return n, nil
}

// Parse parses a key-distribution message. It checks the structure only (size,
// version, type, flags, body length) and does no cryptography. The returned
// message does not alias raw.
func Parse(raw []byte) (*Message, error) {
	switch {
	case len(raw) > MaxMessageSize:
		return nil, fmt.Errorf("%w: %d bytes, more than the %d allowed", ErrMalformed, len(raw), MaxMessageSize)
	case len(raw) == 0:
		return nil, fmt.Errorf("%w: empty", ErrMalformed)
	case raw[0] != Version:
		// Checked first: another version may have another layout.
		return nil, fmt.Errorf("%w %d (want %d)", ErrVersion, raw[0], Version)
	case len(raw) < HeaderSize+SignatureSize:
		return nil, fmt.Errorf("%w: %d bytes, shorter than header and signature (%d)", ErrMalformed, len(raw), HeaderSize+SignatureSize)
	}
	typ := MsgType(raw[offType])
	if !typ.Known() {
		return nil, fmt.Errorf("%w: unknown type %d", ErrMalformed, raw[offType])
	}
	if raw[offFlags] != 0 {
		return nil, fmt.Errorf("%w: %s flags 0x%02x, want 0", ErrMalformed, typ, raw[offFlags])
	}
	bodyLen := binary.BigEndian.Uint32(raw[offBodyLen:HeaderSize])
	if want := uint64(HeaderSize) + uint64(bodyLen) + SignatureSize; uint64(len(raw)) != want {
		how := "trailing bytes"
		if uint64(len(raw)) < want {
			how = "truncated"
		}
		return nil, fmt.Errorf("%w: %s message of %d bytes with a %d-byte body, want %d bytes (%s)",
			ErrMalformed, typ, len(raw), bodyLen, want, how)
	}
	ms := binary.BigEndian.Uint64(raw[offTime:offNonce])
	if ms > math.MaxInt64 {
		return nil, fmt.Errorf("%w: %s time %d out of range", ErrMalformed, typ, ms)
	}

	buf := make([]byte, 0, len(signContext)+len(raw))
	buf = append(buf, signContext...)
	buf = append(buf, raw...)
	signedLen := len(signContext) + HeaderSize + int(bodyLen)
	m := &Message{
		Header: Header{Type: typ, Time: timeFromMillis(ms)},
		Body:   buf[len(signContext)+HeaderSize : signedLen : signedLen],
		Sig:    buf[signedLen:],
		signed: buf[:signedLen:signedLen],
	}
	m.Sender, m.Recipient, m.Nonce = headerIDs(raw)
	if m.Type.Sealed() && m.Recipient == ([8]byte{}) {
		return nil, fmt.Errorf("%w: sealed %s addressed to nobody", ErrMalformed, typ)
	}
	return m, nil
}

// Verify checks that pk is the key of the message's sender and that the
// message is signed by it. Any failure wraps [ErrSignature].
func (m *Message) Verify(pk *PublicKey) error {
	if pk == nil {
		return fmt.Errorf("%w: %s from %x: no public key", ErrSignature, m.Type, m.Sender)
	}
	if len(m.signed) < len(signContext)+HeaderSize {
		return fmt.Errorf("%w: %s from %x: not a parsed message", ErrSignature, m.Type, m.Sender)
	}
	// The sender as signed, not the exported field, which may have changed.
	if sender, _, _ := headerIDs(m.signed[len(signContext):]); pk.RawID() != sender {
		return fmt.Errorf("%w: %s from %x checked against the key of %x", ErrSignature, m.Type, sender, pk.RawID())
	}
	if !pk.Verify(m.signed, m.Sig) {
		return fmt.Errorf("%w: %s from %x", ErrSignature, m.Type, m.Sender)
	}
	m.verified = true
	return nil
}

// Build encodes and signs a message with id. A zero Sender is set to id's,
// a zero Nonce to a random one, and a zero Time to the current time. The
// body is used as it is: seal it first ([Seal]) for a sealed type.
func Build(id *Identity, h Header, body []byte) ([]byte, error) {
	if id == nil {
		return nil, errors.New("gkd: build message: nil identity")
	}
	self := id.Public().RawID()
	if err := h.fill(self); err != nil {
		return nil, fmt.Errorf("gkd: build message: %w", err)
	}
	if h.Sender != self {
		return nil, fmt.Errorf("gkd: build %s: sender %x is not the signing identity %x", h.Type, h.Sender, self)
	}
	if len(body) > MaxBodySize {
		return nil, fmt.Errorf("%w: %s body of %d bytes, more than %d", ErrMalformed, h.Type, len(body), MaxBodySize)
	}
	ms, err := millis(h.Time)
	if err != nil {
		return nil, fmt.Errorf("%w: %s header: %w", ErrMalformed, h.Type, err)
	}
	buf := make([]byte, 0, len(signContext)+HeaderSize+len(body)+SignatureSize)
	buf = append(buf, signContext...)
	buf = appendHeader(buf, &h, ms, len(body))
	buf = append(buf, body...)
	buf = append(buf, id.Sign(buf)...)
	return buf[len(signContext):], nil
}

// fill checks h's type and recipient and fills in a zero sender, nonce and
// time.
func (h *Header) fill(self [8]byte) error {
	if !h.Type.Known() {
		return fmt.Errorf("%w: unknown type %d", ErrMalformed, uint8(h.Type))
	}
	if h.Type.Sealed() && h.Recipient == ([8]byte{}) {
		return fmt.Errorf("%w: sealed %s needs a recipient", ErrMalformed, h.Type)
	}
	if h.Sender == ([8]byte{}) {
		h.Sender = self
	}
	if h.Nonce == ([NonceSize]byte{}) {
		n, err := NewNonce()
		if err != nil {
			return err
		}
		h.Nonce = n
	}
	if h.Time.IsZero() {
		h.Time = time.Now()
	}
	return nil
}

// headerIDs returns the sender, recipient and nonce of an encoded header.
func headerIDs(h []byte) (sender, recipient [8]byte, nonce [NonceSize]byte) {
	copy(sender[:], h[offSender:offRecipient])
	copy(recipient[:], h[offRecipient:offTime])
	copy(nonce[:], h[offNonce:offBodyLen])
	return sender, recipient, nonce
}

func appendHeader(b []byte, h *Header, ms uint64, bodyLen int) []byte {
	b = append(b, Version, byte(h.Type), 0)
	b = append(b, h.Sender[:]...)
	b = append(b, h.Recipient[:]...)
	b = binary.BigEndian.AppendUint64(b, ms)
	b = append(b, h.Nonce[:]...)
	return binary.BigEndian.AppendUint32(b, uint32(bodyLen))
}

// sealInfo returns the HPKE info that binds a sealed body to its message:
// "smqtt/v1 gkd seal\x00" || version || type || sender || recipient || nonce.
func sealInfo(typ MsgType, sender, recipient [8]byte, nonce [NonceSize]byte) []byte {
	info := make([]byte, 0, len(sealContext)+2+8+8+NonceSize)
	info = append(info, sealContext...)
	info = append(info, Version, byte(typ))
	info = append(info, sender[:]...)
	info = append(info, recipient[:]...)
	return append(info, nonce[:]...)
}

// Seal encrypts a body of a sealed type to its recipient, bound to the type,
// sender, recipient and nonce of h, which must all be set; h.Recipient must be
// to's id. Pass the result as the body to [Build] with the same header.
func Seal(to *PublicKey, h Header, plaintext []byte) ([]byte, error) {
	switch {
	case to == nil:
		return nil, fmt.Errorf("gkd: seal %s: nil recipient key", h.Type)
	case !h.Type.Sealed():
		return nil, fmt.Errorf("gkd: seal: %s bodies are not sealed", h.Type)
	case h.Recipient != to.RawID():
		return nil, fmt.Errorf("gkd: seal %s: header recipient %x is not the key's id %x", h.Type, h.Recipient, to.RawID())
	case h.Sender == [8]byte{}:
		return nil, fmt.Errorf("gkd: seal %s: header has no sender", h.Type)
	case h.Nonce == [NonceSize]byte{}:
		return nil, fmt.Errorf("gkd: seal %s: header has no nonce", h.Type)
	case len(plaintext) > MaxBodySize-to.Suite().SealOverhead():
		return nil, fmt.Errorf("%w: %s body of %d bytes is too large to seal", ErrMalformed, h.Type, len(plaintext))
	}
	return SealTo(to, sealInfo(h.Type, h.Sender, h.Recipient, h.Nonce), plaintext)
}

// OpenBody decrypts the body of a sealed message addressed to id. The message
// must have passed [Message.Verify] first (otherwise the error wraps
// [ErrSignature]), so that no KEM decapsulation runs on unauthenticated
// input. A body that does not open, or a message for another recipient,
// wraps [ErrDecrypt].
func (id *Identity) OpenBody(m *Message) ([]byte, error) {
	if !m.verified || len(m.signed) < len(signContext)+HeaderSize {
		return nil, fmt.Errorf("gkd: open %s body: %w: message not verified", m.Type, ErrSignature)
	}
	// Use the verified bytes, not the exported fields, which may have changed.
	h := m.signed[len(signContext):]
	typ := MsgType(h[offType])
	sender, recipient, nonce := headerIDs(h)
	if !typ.Sealed() {
		return nil, fmt.Errorf("gkd: open body: %w: %s bodies are not sealed", ErrMalformed, typ)
	}
	if self := id.Public().RawID(); recipient != self {
		return nil, fmt.Errorf("gkd: open %s body: %w: addressed to %x, not %x", typ, ErrDecrypt, recipient, self)
	}
	pt, err := id.Open(sealInfo(typ, sender, recipient, nonce), h[HeaderSize:])
	if err != nil {
		return nil, fmt.Errorf("gkd: open %s body from %x: %w", typ, sender, err)
	}
	return pt, nil
}

// SealedMessage builds a message of a sealed type from from to to: a fresh
// nonce, the current time, the body sealed to to, signed by from.
func SealedMessage(from *Identity, to *PublicKey, typ MsgType, body encoding.BinaryMarshaler) ([]byte, error) {
	if from == nil || to == nil {
		return nil, fmt.Errorf("gkd: sealed %s: nil identity or recipient", typ)
	}
	pt, err := marshalBody(typ, body)
	if err != nil {
		return nil, err
	}
	h := Header{Type: typ, Recipient: to.RawID()}
	if err := h.fill(from.Public().RawID()); err != nil {
		return nil, fmt.Errorf("gkd: sealed message: %w", err)
	}
	ct, err := Seal(to, h, pt)
	if err != nil {
		return nil, err
	}
	return Build(from, h, ct)
}

// PlainMessage builds a message of a plain type from from to recipient (all
// zero to broadcast): a fresh nonce, the current time, the body in plain text,
// signed by from. It refuses a sealed type, so that a confidential body
// cannot leave unsealed by mistake.
func PlainMessage(from *Identity, recipient [8]byte, typ MsgType, body encoding.BinaryMarshaler) ([]byte, error) {
	if typ.Sealed() {
		return nil, fmt.Errorf("gkd: plain message: %s bodies must be sealed (use SealedMessage)", typ)
	}
	pt, err := marshalBody(typ, body)
	if err != nil {
		return nil, err
	}
	return Build(from, Header{Type: typ, Recipient: recipient}, pt)
}

func marshalBody(typ MsgType, body encoding.BinaryMarshaler) ([]byte, error) {
	if body == nil {
		return nil, fmt.Errorf("gkd: %s message: nil body", typ)
	}
	if b, ok := body.(Body); ok && b.Type() != typ {
		return nil, fmt.Errorf("gkd: %s message with a %s body", typ, b.Type())
	}
	pt, err := body.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("gkd: %s message: %w", typ, err)
	}
	return pt, nil
}

// millis converts t to the wire's Unix milliseconds; the zero Time is 0.
func millis(t time.Time) (uint64, error) {
	if t.IsZero() {
		return 0, nil
	}
	ms := t.UnixMilli()
	if ms < 0 {
		return 0, fmt.Errorf("time %s is before 1970", t.UTC().Format(time.RFC3339))
	}
	return uint64(ms), nil
}

// timeFromMillis is the inverse of millis for ms <= math.MaxInt64.
func timeFromMillis(ms uint64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(int64(ms)).UTC()
}
