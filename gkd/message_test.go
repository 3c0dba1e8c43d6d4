package gkd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"time"
)

// seededIdentity derives an identity from fixed seeds: the Ed25519 seed is
// the bytes first, first+1, ..., first+31 and the KEM seed the next 32 bytes.
func seededIdentity(t testing.TB, suite Suite, first byte) *Identity {
	t.Helper()
	secret := make([]byte, 2*seedSize)
	for i := range secret {
		secret[i] = first + byte(i)
	}
	id, err := newIdentity(suite, secret[:seedSize], secret[seedSize:])
	if err != nil {
		t.Fatalf("newIdentity(%s, %#x): %v", suite, first, err)
	}
	return id
}

// testParties are a key server and two members, all x25519 (fast).
type testParties struct {
	server, alice, bob *Identity
}

func newParties(t testing.TB, suite Suite) testParties {
	return testParties{
		server: seededIdentity(t, suite, 0x00),
		alice:  seededIdentity(t, suite, 0x40),
		bob:    seededIdentity(t, suite, 0x80),
	}
}

func rawID(id *Identity) [8]byte { return id.Public().RawID() }

var testTime = time.UnixMilli(1767225600123).UTC() // 2026-01-01T00:00:00.123Z

func mustBuild(t testing.TB, id *Identity, h Header, body []byte) []byte {
	t.Helper()
	raw, err := Build(id, h, body)
	if err != nil {
		t.Fatalf("Build(%s): %v", h.Type, err)
	}
	return raw
}

func mustParse(t testing.TB, raw []byte) *Message {
	t.Helper()
	m, err := Parse(raw)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return m
}

func mustSeal(t testing.TB, to *PublicKey, h Header, pt []byte) []byte {
	t.Helper()
	ct, err := Seal(to, h, pt)
	if err != nil {
		t.Fatalf("Seal(%s): %v", h.Type, err)
	}
	return ct
}

func mustMarshal(t testing.TB, b Body) []byte {
	t.Helper()
	p, err := b.MarshalBinary()
	if err != nil {
		t.Fatalf("%s.MarshalBinary: %v", b.Type(), err)
	}
	return p
}

// sealedRekey returns a Rekey from p.server to p.alice, built by hand, with
// its header and plaintext.
func sealedRekey(t testing.TB, p testParties) ([]byte, Header, []byte) {
	t.Helper()
	h := Header{
		Type:      TypeRekey,
		Sender:    rawID(p.server),
		Recipient: rawID(p.alice),
		Time:      testTime,
		Nonce:     [16]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16},
	}
	pt := mustMarshal(t, sampleRekey())
	return mustBuild(t, p.server, h, mustSeal(t, p.alice.Public(), h, pt)), h, pt
}

func TestBuildParseVerifyRoundTrip(t *testing.T) {
	p := newParties(t, SuiteX25519)
	body := []byte("plain body")
	h := Header{Type: TypeHeartbeat, Time: testTime, Nonce: [16]byte{0xaa}}
	raw := mustBuild(t, p.server, h, body)
	if want := HeaderSize + len(body) + SignatureSize; len(raw) != want {
		t.Fatalf("message is %d bytes, want %d", len(raw), want)
	}
	m := mustParse(t, raw)
	want := Header{Type: TypeHeartbeat, Sender: rawID(p.server), Time: testTime, Nonce: [16]byte{0xaa}}
	if m.Header != want {
		t.Errorf("header = %+v, want %+v", m.Header, want)
	}
	if !bytes.Equal(m.Body, body) || len(m.Sig) != SignatureSize {
		t.Errorf("body %q, %d-byte signature", m.Body, len(m.Sig))
	}
	if err := m.Verify(p.server.Public()); err != nil {
		t.Errorf("Verify: %v", err)
	}
	if again := mustBuild(t, p.server, m.Header, m.Body); !bytes.Equal(again, raw) {
		t.Error("building the parsed header and body again gives other bytes")
	}
}

func TestBuildFillsSenderNonceAndTime(t *testing.T) {
	p := newParties(t, SuiteX25519)
	before := time.Now().Truncate(time.Millisecond)
	a := mustParse(t, mustBuild(t, p.alice, Header{Type: TypeRegister}, make([]byte, 16)))
	b := mustParse(t, mustBuild(t, p.alice, Header{Type: TypeRegister}, make([]byte, 16)))
	after := time.Now()
	if a.Sender != rawID(p.alice) {
		t.Errorf("sender = %x, want %x", a.Sender, rawID(p.alice))
	}
	if a.Nonce == ([16]byte{}) || a.Nonce == b.Nonce {
		t.Errorf("nonces %x and %x: want random and distinct", a.Nonce, b.Nonce)
	}
	if a.Time.Before(before) || a.Time.After(after) {
		t.Errorf("time %s not between %s and %s", a.Time, before, after)
	}
	if a.Time.Nanosecond()%int(time.Millisecond) != 0 {
		t.Errorf("time %s has sub-millisecond precision", a.Time)
	}
}

func TestBuildRejectsInvalidHeaders(t *testing.T) {
	p := newParties(t, SuiteX25519)
	for _, tc := range []struct {
		name string
		h    Header
		body []byte
		want error
	}{
		{"unknown type 0", Header{Type: 0}, nil, ErrMalformed},
		{"unknown type 14", Header{Type: 14}, nil, ErrMalformed},
		{"sealed type to nobody", Header{Type: TypeRekey}, nil, ErrMalformed},
		{"time before 1970", Header{Type: TypeLeave, Time: time.Unix(-1, 0)}, nil, ErrMalformed},
		{"body too large", Header{Type: TypePolicy}, make([]byte, MaxBodySize+1), ErrMalformed},
		{"another sender", Header{Type: TypeLeave, Sender: rawID(p.bob)}, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := Build(p.alice, tc.h, tc.body)
			if err == nil {
				t.Fatalf("Build succeeded: %x", raw[:HeaderSize])
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("error %v, want %v", err, tc.want)
			}
		})
	}
}

func TestBuildAcceptsTheLargestBody(t *testing.T) {
	p := newParties(t, SuiteX25519)
	raw := mustBuild(t, p.server, Header{Type: TypePolicy}, make([]byte, MaxBodySize))
	if len(raw) != MaxMessageSize {
		t.Fatalf("message is %d bytes, want %d", len(raw), MaxMessageSize)
	}
	if err := mustParse(t, raw).Verify(p.server.Public()); err != nil {
		t.Fatal(err)
	}
}

func TestVerifyFailsOnEveryModifiedByte(t *testing.T) {
	p := newParties(t, SuiteX25519)
	plain := mustBuild(t, p.alice, Header{Type: TypeJoinRequest}, mustMarshal(t, sampleJoinRequest()))
	sealed, _, _ := sealedRekey(t, p)
	for _, tc := range []struct {
		name   string
		raw    []byte
		signer *Identity
	}{
		{"plain", plain, p.alice},
		{"sealed", sealed, p.server},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := mustParse(t, tc.raw).Verify(tc.signer.Public()); err != nil {
				t.Fatalf("unmodified message: %v", err)
			}
			for i := range tc.raw {
				for _, mask := range []byte{0x01, 0x80} {
					bad := bytes.Clone(tc.raw)
					bad[i] ^= mask
					m, err := Parse(bad)
					if err != nil {
						continue // rejected by structure: fine
					}
					if err := m.Verify(tc.signer.Public()); !errors.Is(err, ErrSignature) {
						t.Fatalf("byte %d ^ %#x: Verify = %v, want ErrSignature", i, mask, err)
					}
				}
			}
		})
	}
}

func TestVerifyRefusesAnotherSigner(t *testing.T) {
	p := newParties(t, SuiteX25519)
	raw := mustBuild(t, p.bob, Header{Type: TypeRefusal, Recipient: rawID(p.alice)}, mustMarshal(t, sampleRefusal()))

	// Bob's message checked against the server's key.
	if err := mustParse(t, raw).Verify(p.server.Public()); !errors.Is(err, ErrSignature) {
		t.Errorf("Verify with another key = %v, want ErrSignature", err)
	}
	// Bob's message claiming to come from the server.
	forged := bytes.Clone(raw)
	id := rawID(p.server)
	copy(forged[offSender:], id[:])
	if err := mustParse(t, forged).Verify(p.server.Public()); !errors.Is(err, ErrSignature) {
		t.Errorf("Verify of a forged sender = %v, want ErrSignature", err)
	}
	if err := mustParse(t, raw).Verify(nil); !errors.Is(err, ErrSignature) {
		t.Errorf("Verify(nil) = %v, want ErrSignature", err)
	}
	if err := (&Message{Header: Header{Sender: rawID(p.bob)}}).Verify(p.bob.Public()); !errors.Is(err, ErrSignature) {
		t.Errorf("Verify of an unparsed message = %v, want ErrSignature", err)
	}
}

func TestOpenBody(t *testing.T) {
	p := newParties(t, SuiteX25519)
	raw, _, pt := sealedRekey(t, p)
	m := mustParse(t, raw)
	if len(m.Body) != len(pt)+SuiteX25519.SealOverhead() {
		t.Errorf("sealed body is %d bytes, want %d", len(m.Body), len(pt)+SuiteX25519.SealOverhead())
	}
	if _, err := p.alice.OpenBody(m); !errors.Is(err, ErrSignature) {
		t.Errorf("OpenBody before Verify = %v, want ErrSignature", err)
	}
	if err := m.Verify(p.server.Public()); err != nil {
		t.Fatal(err)
	}
	got, err := p.alice.OpenBody(m)
	if err != nil {
		t.Fatalf("OpenBody: %v", err)
	}
	if !bytes.Equal(got, pt) {
		t.Errorf("OpenBody = %x, want %x", got, pt)
	}
	if _, err := p.bob.OpenBody(m); !errors.Is(err, ErrDecrypt) {
		t.Errorf("OpenBody by another member = %v, want ErrDecrypt", err)
	}

	// OpenBody reads the verified bytes, not the exported fields.
	m.Body = bytes.Repeat([]byte{0xee}, len(m.Body))
	m.Nonce = [16]byte{}
	if got, err := p.alice.OpenBody(m); err != nil || !bytes.Equal(got, pt) {
		t.Errorf("OpenBody after changing exported fields = %x, %v; want the verified body", got, err)
	}

	plain := mustParse(t, mustBuild(t, p.server, Header{Type: TypeHeartbeat, Recipient: rawID(p.alice)}, []byte("x")))
	if err := plain.Verify(p.server.Public()); err != nil {
		t.Fatal(err)
	}
	if _, err := p.alice.OpenBody(plain); !errors.Is(err, ErrMalformed) {
		t.Errorf("OpenBody of a plain type = %v, want ErrMalformed", err)
	}
}

// A sealed body is bound to its message: moved into another message that
// verifies (signed by whoever sends it), it does not open.
func TestSealedBodyDoesNotOpenInAnotherMessage(t *testing.T) {
	p := newParties(t, SuiteX25519)
	raw, h, _ := sealedRekey(t, p)
	ct := mustParse(t, raw).Body

	moved := func(change func(*Header)) Header {
		m := h
		change(&m)
		return m
	}
	for _, tc := range []struct {
		name   string
		h      Header
		signer *Identity
		opener *Identity
	}{
		{"another type", moved(func(h *Header) { h.Type = TypeJoinResponse }), p.server, p.alice},
		{"another nonce", moved(func(h *Header) { h.Nonce[0] ^= 1 }), p.server, p.alice},
		{"another sender", moved(func(h *Header) { h.Sender = rawID(p.bob) }), p.bob, p.alice},
		{"another recipient", moved(func(h *Header) { h.Recipient = rawID(p.bob) }), p.server, p.bob},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := mustParse(t, mustBuild(t, tc.signer, tc.h, ct))
			if err := m.Verify(tc.signer.Public()); err != nil {
				t.Fatal(err)
			}
			if _, err := tc.opener.OpenBody(m); !errors.Is(err, ErrDecrypt) {
				t.Errorf("OpenBody = %v, want ErrDecrypt", err)
			}
			// The HPKE info binds the header even for the key the body was
			// sealed to.
			info := sealInfo(tc.h.Type, tc.h.Sender, tc.h.Recipient, tc.h.Nonce)
			if _, err := p.alice.Open(info, ct); !errors.Is(err, ErrDecrypt) {
				t.Errorf("Open with the moved header's info = %v, want ErrDecrypt", err)
			}
		})
	}
}

func TestSealRejectsIncompleteHeaders(t *testing.T) {
	p := newParties(t, SuiteX25519)
	good := Header{Type: TypeJoinResponse, Sender: rawID(p.server), Recipient: rawID(p.alice), Nonce: [16]byte{1}}
	if _, err := Seal(p.alice.Public(), good, []byte("x")); err != nil {
		t.Fatalf("Seal of a complete header: %v", err)
	}
	for _, tc := range []struct {
		name   string
		change func(*Header)
		to     *PublicKey
	}{
		{"plain type", func(h *Header) { h.Type = TypeHeartbeat }, p.alice.Public()},
		{"no sender", func(h *Header) { h.Sender = [8]byte{} }, p.alice.Public()},
		{"no nonce", func(h *Header) { h.Nonce = [16]byte{} }, p.alice.Public()},
		{"recipient is not the key", func(h *Header) {}, p.bob.Public()},
		{"nil key", func(h *Header) {}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := good
			tc.change(&h)
			if ct, err := Seal(tc.to, h, []byte("x")); err == nil {
				t.Errorf("Seal succeeded: %x", ct)
			}
		})
	}
}

func TestSealedAndPlainMessages(t *testing.T) {
	for _, suite := range suites {
		t.Run(string(suite), func(t *testing.T) {
			p := newParties(t, suite)
			raw, err := SealedMessage(p.server, p.alice.Public(), TypeJoinResponse, sampleJoinResponse())
			if err != nil {
				t.Fatal(err)
			}
			m := mustParse(t, raw)
			if m.Type != TypeJoinResponse || m.Sender != rawID(p.server) || m.Recipient != rawID(p.alice) {
				t.Errorf("header %+v", m.Header)
			}
			if err := m.Verify(p.server.Public()); err != nil {
				t.Fatal(err)
			}
			pt, err := p.alice.OpenBody(m)
			if err != nil {
				t.Fatal(err)
			}
			got, err := ParseJoinResponse(pt)
			if err != nil {
				t.Fatal(err)
			}
			if !equalBodies(got, sampleJoinResponse()) {
				t.Errorf("JoinResponse = %+v, want %+v", got, sampleJoinResponse())
			}
			if key := sampleJoinResponse().Key; bytes.Contains(raw, key[:]) {
				t.Error("the group key appears in clear in the message")
			}
		})
	}

	p := newParties(t, SuiteX25519)
	raw, err := PlainMessage(p.server, [8]byte{}, TypeHeartbeat, sampleHeartbeat())
	if err != nil {
		t.Fatal(err)
	}
	m := mustParse(t, raw)
	if err := m.Verify(p.server.Public()); err != nil {
		t.Fatal(err)
	}
	if hb, err := ParseHeartbeat(m.Body); err != nil || hb != sampleHeartbeat() {
		t.Errorf("ParseHeartbeat = %+v, %v", hb, err)
	}
}

func TestConvenienceBuildersRefuseMistakes(t *testing.T) {
	p := newParties(t, SuiteX25519)
	if _, err := PlainMessage(p.server, rawID(p.alice), TypeRekey, sampleRekey()); err == nil {
		t.Error("PlainMessage sent a Rekey unsealed")
	}
	if _, err := SealedMessage(p.server, p.alice.Public(), TypeHeartbeat, sampleHeartbeat()); err == nil {
		t.Error("SealedMessage sealed a Heartbeat")
	}
	if _, err := PlainMessage(p.alice, rawID(p.server), TypeLeave, sampleJoinRequest()); err == nil {
		t.Error("PlainMessage sent a JoinRequest body as a Leave")
	}
	if _, err := PlainMessage(p.alice, rawID(p.server), TypeLeave, Leave{Reason: 9}); err == nil {
		t.Error("PlainMessage sent a Leave with an unknown reason")
	}
	if _, err := SealedMessage(nil, p.alice.Public(), TypeRekey, sampleRekey()); err == nil {
		t.Error("SealedMessage without a sender identity succeeded")
	}
}

func TestParseRejectsEveryTruncation(t *testing.T) {
	p := newParties(t, SuiteX25519)
	raw, _, _ := sealedRekey(t, p)
	for n := range len(raw) {
		if _, err := Parse(raw[:n]); !errors.Is(err, ErrMalformed) {
			t.Fatalf("Parse of the first %d of %d bytes = %v, want ErrMalformed", n, len(raw), err)
		}
	}
}

func TestParseRejectsMalformedMessages(t *testing.T) {
	p := newParties(t, SuiteX25519)
	raw := mustBuild(t, p.alice, Header{Type: TypeLeave, Recipient: rawID(p.server)}, mustMarshal(t, sampleLeave()))
	edit := func(f func([]byte) []byte) []byte { return f(bytes.Clone(raw)) }
	oversize := make([]byte, MaxMessageSize+1)
	copy(oversize, raw[:HeaderSize])
	binary.BigEndian.PutUint32(oversize[offBodyLen:], uint32(len(oversize)-HeaderSize-SignatureSize))

	for _, tc := range []struct {
		name string
		raw  []byte
		want error
	}{
		{"trailing byte", append(bytes.Clone(raw), 0), ErrMalformed},
		{"oversize", oversize, ErrMalformed},
		{"version 0", edit(func(b []byte) []byte { b[0] = 0; return b }), ErrVersion},
		{"version 2", edit(func(b []byte) []byte { b[0] = 2; return b }), ErrVersion},
		{"version 2, short", []byte{2, 1}, ErrVersion},
		{"flags", edit(func(b []byte) []byte { b[offFlags] = 0x01; return b }), ErrMalformed},
		{"high flag", edit(func(b []byte) []byte { b[offFlags] = 0x80; return b }), ErrMalformed},
		{"type 0", edit(func(b []byte) []byte { b[offType] = 0; return b }), ErrMalformed},
		{"type 14", edit(func(b []byte) []byte { b[offType] = 14; return b }), ErrMalformed},
		{"type 255", edit(func(b []byte) []byte { b[offType] = 255; return b }), ErrMalformed},
		{"body length too long", edit(func(b []byte) []byte { b[offBodyLen+3]++; return b }), ErrMalformed},
		{"body length too short", edit(func(b []byte) []byte { b[offBodyLen+3]--; return b }), ErrMalformed},
		{"body length 2^32-1", edit(func(b []byte) []byte {
			binary.BigEndian.PutUint32(b[offBodyLen:], 0xffffffff)
			return b
		}), ErrMalformed},
		{"time past 2^63", edit(func(b []byte) []byte { b[offTime] = 0x80; return b }), ErrMalformed},
		{"sealed type to nobody", edit(func(b []byte) []byte {
			b[offType] = byte(TypeJoinResponse)
			clear(b[offRecipient:offTime])
			return b
		}), ErrMalformed},
		{"empty", nil, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Parse(tc.raw); !errors.Is(err, tc.want) {
				t.Errorf("Parse = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestParseDoesNotAliasInput(t *testing.T) {
	p := newParties(t, SuiteX25519)
	raw := mustBuild(t, p.alice, Header{Type: TypeRegister}, make([]byte, 16))
	m := mustParse(t, raw)
	clear(raw)
	if err := m.Verify(p.alice.Public()); err != nil {
		t.Errorf("Verify after clearing the input: %v", err)
	}
}

func TestParseAcceptsBroadcastAndZeroTime(t *testing.T) {
	p := newParties(t, SuiteX25519)
	raw := mustBuild(t, p.server, Header{Type: TypePolicy, Time: testTime}, mustMarshal(t, samplePolicy()))
	clear(raw[offTime:offNonce]) // a zero time parses; freshness checks reject it
	m := mustParse(t, raw)
	if !m.Time.IsZero() || m.Recipient != ([8]byte{}) {
		t.Errorf("time %s, recipient %x; want zero and broadcast", m.Time, m.Recipient)
	}
}

func TestMsgTypeString(t *testing.T) {
	for typ, want := range map[MsgType]string{
		TypeJoinRequest:       "JoinRequest",
		TypeRekey:             "Rekey",
		TypeChallengeResponse: "ChallengeResponse",
		TypeRekeyAck:          "RekeyAck",
		TypeGroupRekey:        "GroupRekey",
		0:                     "MsgType(0)",
		13:                    "Roster",
		14:                    "MsgType(14)",
	} {
		if got := typ.String(); got != want {
			t.Errorf("MsgType(%d).String() = %q, want %q", uint8(typ), got, want)
		}
	}
	var sealed []MsgType
	for typ := MsgType(0); typ < 255; typ++ {
		if typ.Sealed() {
			sealed = append(sealed, typ)
		}
	}
	if len(sealed) != 2 || sealed[0] != TypeJoinResponse || sealed[1] != TypeRekey {
		t.Errorf("sealed types %v, want JoinResponse and Rekey", sealed)
	}
}
