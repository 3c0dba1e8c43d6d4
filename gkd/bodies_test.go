package gkd

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func seq(first byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = first + byte(i)
	}
	return b
}

func seq8(first byte) (a [8]byte)   { copy(a[:], seq(first, 8)); return a }
func seq16(first byte) (a [16]byte) { copy(a[:], seq(first, 16)); return a }
func seq32(first byte) (a [32]byte) { copy(a[:], seq(first, 32)); return a }

func sampleJoinRequest() JoinRequest {
	return JoinRequest{Group: seq8(0x10), ConnID: seq16(0x20)}
}

func sampleJoinResponse() JoinResponse {
	return JoinResponse{
		Group: seq8(0x10), RequestNonce: seq16(0x30), Scheme: SchemeUpdate, Epoch: 7,
		Sender: 0x0102030405060708, Key: seq32(0x40), Counter: 42,
		ActivateAt: testTime.Add(2 * time.Second), Ext: []byte("ext"),
	}
}

func sampleRefusal() Refusal {
	return Refusal{Group: seq8(0x10), RequestNonce: seq16(0x30), Code: RefusalNotAuthorised, Reason: "not a member of this group"}
}

func sampleRekey() Rekey {
	return Rekey{
		Group: seq8(0x10), Epoch: 8, Key: seq32(0x60), Counter: 43,
		ActivateAt:    testTime.Add(2 * time.Second),
		PrevSendUntil: testTime.Add(32 * time.Second),
		PrevOpenUntil: testTime.Add(24 * time.Hour),
	}
}

func sampleLeave() Leave { return Leave{Group: seq8(0x10), ConnID: seq16(0x20), Reason: LeaveWill} }

func sampleHeartbeat() Heartbeat { return Heartbeat{Group: seq8(0x10), Epoch: 8, Counter: 44} }

func samplePolicy() Policy {
	return Policy{Version: 3, Entries: []PolicyEntry{
		{Group: seq8(0x10), Filter: "secure/#"},
		{Group: seq8(0x18), Filter: "plant/+/état"},
	}}
}

func sampleRegister() Register { return Register{ConnID: seq16(0x20)} }

func sampleChallenge() Challenge { return Challenge{Value: seq16(0x70)} }

func sampleChallengeResponse() ChallengeResponse { return ChallengeResponse{Value: seq16(0x70)} }

func sampleRekeyAck() RekeyAck { return RekeyAck{Group: seq8(0x10), Epoch: 8, Counter: 43} }

func sampleGroupRekey() GroupRekey {
	return GroupRekey{
		Group: seq8(0x10), Counter: 45,
		ActivateAt:    testTime.Add(2 * time.Second),
		PrevSendUntil: testTime.Add(32 * time.Second),
		PrevOpenUntil: testTime.Add(24 * time.Hour),
		Chunk:         append([]byte{lkhFormat, 0, 0, 0, 9, 0, 0, 0, 1}, seq(0x80, LKHWrapSize)...),
	}
}

func sampleRoster() Roster {
	return Roster{Group: seq8(0x10), Version: 3, Part: 1, Parts: 2, Senders: []RosterEntry{
		{Sender: 7, Member: seq8(0x30), Key: seq32(0x40)}, {Sender: 9, Member: seq8(0x50), Key: seq32(0x60)}}}
}

// sampleBodies has one body of every type, in type order.
func sampleBodies() []Body {
	return []Body{
		sampleJoinRequest(), sampleJoinResponse(), sampleRefusal(), sampleRekey(),
		sampleLeave(), sampleHeartbeat(), samplePolicy(), sampleRegister(),
		sampleChallenge(), sampleChallengeResponse(), sampleRekeyAck(), sampleGroupRekey(),
		sampleRoster(),
	}
}

func equalBodies(a, b Body) bool { return reflect.DeepEqual(a, b) }

func TestEveryBodyTypeRoundTrips(t *testing.T) {
	bodies := sampleBodies()
	if len(bodies) != int(maxType) {
		t.Fatalf("%d sample bodies for %d types", len(bodies), maxType)
	}
	for i, b := range bodies {
		t.Run(b.Type().String(), func(t *testing.T) {
			if want := MsgType(i + 1); b.Type() != want {
				t.Fatalf("sample %d has type %s, want %s", i, b.Type(), want)
			}
			enc := mustMarshal(t, b)
			got, err := ParseBody(b.Type(), enc)
			if err != nil {
				t.Fatalf("ParseBody: %v", err)
			}
			if !equalBodies(got, b) {
				t.Errorf("ParseBody = %+v, want %+v", got, b)
			}
			if again := mustMarshal(t, got); !bytes.Equal(again, enc) {
				t.Errorf("re-encoding gives %x, want %x", again, enc)
			}
		})
	}
}

func TestZeroBodiesRoundTrip(t *testing.T) {
	for _, b := range []Body{
		JoinRequest{}, JoinResponse{Scheme: SchemeStatic}, Refusal{Code: RefusalBadRequest}, Rekey{},
		Leave{Reason: LeaveShutdown}, Heartbeat{}, Policy{}, Register{}, Challenge{}, ChallengeResponse{}, RekeyAck{},
		GroupRekey{}, Roster{Parts: 1},
	} {
		got, err := ParseBody(b.Type(), mustMarshal(t, b))
		if err != nil {
			t.Errorf("%s: %v", b.Type(), err)
			continue
		}
		// An empty policy or roster decodes with an empty, non-nil list.
		if p, ok := got.(Policy); ok && len(p.Entries) == 0 {
			got = Policy{Version: p.Version}
		}
		if r, ok := got.(Roster); ok && len(r.Senders) == 0 {
			r.Senders = nil
			got = r
		}
		if !equalBodies(got, b) {
			t.Errorf("%s: ParseBody = %+v, want %+v", b.Type(), got, b)
		}
	}
}

func TestBodySizes(t *testing.T) {
	for _, tc := range []struct {
		b    Body
		size int
	}{
		{JoinRequest{}, 24},
		{JoinResponse{Scheme: SchemeLKH}, 8 + 16 + 1 + 4 + 8 + 32 + 8 + 8 + 1 + 8 + 4},
		{Refusal{Code: RefusalRevoked, Reason: "ab"}, 8 + 16 + 1 + 2 + 2},
		{Rekey{Ext: []byte{1}}, 8 + 4 + 32 + 8 + 8 + 8 + 8 + 4 + 1},
		{Leave{Reason: LeaveWill}, 25},
		{Heartbeat{}, 28},
		{Roster{Parts: 1, Senders: make([]RosterEntry, 2)}, 8 + 8 + 2 + 2 + 2 + 2*48},
		{Policy{Entries: []PolicyEntry{{Filter: "a/#"}}}, 8 + 2 + 8 + 2 + 3},
		{Register{}, 16},
		{Challenge{}, 16},
		{ChallengeResponse{}, 16},
		{RekeyAck{}, 20},
	} {
		if got := len(mustMarshal(t, tc.b)); got != tc.size {
			t.Errorf("%s encodes to %d bytes, want %d", tc.b.Type(), got, tc.size)
		}
	}
}

func TestBodyParsersRejectTruncationAndTrailingBytes(t *testing.T) {
	for _, b := range sampleBodies() {
		t.Run(b.Type().String(), func(t *testing.T) {
			enc := mustMarshal(t, b)
			for n := range len(enc) {
				got, err := ParseBody(b.Type(), enc[:n])
				if !errors.Is(err, ErrMalformed) || got != nil {
					t.Fatalf("ParseBody of the first %d of %d bytes = %+v, %v; want ErrMalformed", n, len(enc), got, err)
				}
			}
			if _, err := ParseBody(b.Type(), append(enc, 0)); !errors.Is(err, ErrMalformed) {
				t.Fatalf("ParseBody with a trailing byte = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestBodyParseErrorsNameTheTypeAndField(t *testing.T) {
	enc := mustMarshal(t, sampleJoinResponse())
	_, err := ParseJoinResponse(enc[:27])
	if err == nil || !strings.Contains(err.Error(), "JoinResponse") || !strings.Contains(err.Error(), "epoch") {
		t.Errorf("error %q does not name JoinResponse and epoch", err)
	}
}

func TestBodyParsersRejectInvalidValues(t *testing.T) {
	edit := func(b Body, f func([]byte) []byte) []byte { return f(mustMarshal(t, b)) }
	set := func(b Body, off int, v ...byte) []byte {
		return edit(b, func(p []byte) []byte { copy(p[off:], v); return p })
	}
	const (
		joinScheme   = 8 + 16
		joinActivate = 8 + 16 + 1 + 4 + 8 + 32 + 8
		joinExtLen   = joinActivate + 8
		rekeyOpen    = 8 + 4 + 32 + 8 + 8 + 8
	)
	long := Refusal{Code: RefusalBadRequest, Reason: "ab"}
	for _, tc := range []struct {
		name string
		typ  MsgType
		enc  []byte
	}{
		{"scheme 0", TypeJoinResponse, set(sampleJoinResponse(), joinScheme, 0)},
		{"scheme 5", TypeJoinResponse, set(sampleJoinResponse(), joinScheme, 5)},
		{"activate_at past 2^63", TypeJoinResponse, set(sampleJoinResponse(), joinActivate, 0x80)},
		{"ext longer than the body", TypeJoinResponse, set(sampleJoinResponse(), joinExtLen, 0xff, 0xff, 0xff, 0xff)},
		{"prev_open_until past 2^63", TypeRekey, set(sampleRekey(), rekeyOpen, 0xff)},
		{"refusal code 0", TypeRefusal, set(sampleRefusal(), 24, 0)},
		{"refusal code 7", TypeRefusal, set(sampleRefusal(), 24, 7)},
		{"reason not UTF-8", TypeRefusal, edit(long, func(p []byte) []byte { copy(p[len(p)-2:], "\xff\xfe"); return p })},
		{"reason longer than the body", TypeRefusal, set(long, 25, 0, 3)},
		{"leave reason 0", TypeLeave, set(sampleLeave(), 24, 0)},
		{"leave reason 3", TypeLeave, set(sampleLeave(), 24, 3)},
		{"policy count too high", TypePolicy, set(samplePolicy(), 8, 0, 3)},
		{"policy count too low", TypePolicy, set(samplePolicy(), 8, 0, 1)},
		{"policy count 65535", TypePolicy, set(samplePolicy(), 8, 0xff, 0xff)},
		{"filter not UTF-8", TypePolicy, edit(samplePolicy(), func(p []byte) []byte { p[len(p)-1] = 0xc3; return p })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, err := ParseBody(tc.typ, tc.enc); !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseBody = %+v, %v; want ErrMalformed", got, err)
			}
		})
	}
	if _, err := ParseBody(0, nil); !errors.Is(err, ErrMalformed) {
		t.Errorf("ParseBody of type 0 = %v, want ErrMalformed", err)
	}
}

func TestBodyMarshalRejectsUnencodableValues(t *testing.T) {
	manyEntries := make([]PolicyEntry, 1<<16)
	for _, tc := range []struct {
		name string
		b    Body
	}{
		{"scheme 0", JoinResponse{}},
		{"scheme 5", JoinResponse{Scheme: 5}},
		{"activate_at before 1970", JoinResponse{Scheme: SchemeStatic, ActivateAt: time.Unix(-10, 0)}},
		{"refusal code 0", Refusal{}},
		{"reason too long", Refusal{Code: RefusalBadRequest, Reason: strings.Repeat("x", 1<<16)}},
		{"reason not UTF-8", Refusal{Code: RefusalBadRequest, Reason: "\xff"}},
		{"leave reason 0", Leave{}},
		{"prev_send_until before 1970", Rekey{PrevSendUntil: time.Unix(0, -1e6)}},
		{"ext too large", Rekey{Ext: make([]byte, MaxBodySize+1)}},
		{"too many policy entries", Policy{Entries: manyEntries}},
		{"filter too long", Policy{Entries: []PolicyEntry{{Filter: strings.Repeat("a", 1<<16)}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if enc, err := tc.b.MarshalBinary(); err == nil {
				t.Errorf("MarshalBinary succeeded: %d bytes", len(enc))
			}
		})
	}
}

func TestBodyTimesAreWholeMillisecondsAndZeroIsZero(t *testing.T) {
	r := Rekey{ActivateAt: testTime.Add(999 * time.Microsecond)}
	got, err := ParseRekey(mustMarshal(t, r))
	if err != nil {
		t.Fatal(err)
	}
	if !got.ActivateAt.Equal(testTime) {
		t.Errorf("ActivateAt = %s, want %s (truncated to the millisecond)", got.ActivateAt, testTime)
	}
	if !got.PrevSendUntil.IsZero() || !got.PrevOpenUntil.IsZero() {
		t.Errorf("zero times decode as %s and %s", got.PrevSendUntil, got.PrevOpenUntil)
	}
}

func TestEnumStrings(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{SchemeStatic.String(), "static"},
		{SchemeUpdate.String(), "update"},
		{SchemeSlotted.String(), "slotted"},
		{SchemeLKH.String(), "lkh"},
		{Scheme(9).String(), "Scheme(9)"},
		{RefusalUnknownMember.String(), "unknown member"},
		{RefusalRateLimited.String(), "rate limited"},
		{RefusalCode(0).String(), "RefusalCode(0)"},
		{LeaveShutdown.String(), "shutdown"},
		{LeaveWill.String(), "will"},
		{LeaveReason(3).String(), "LeaveReason(3)"},
	} {
		if tc.got != tc.want {
			t.Errorf("String() = %q, want %q", tc.got, tc.want)
		}
	}
}

// TestGroupRekeyCarriesAChunkToTheMembers: a rekey chunk travels in a signed
// plain GroupRekey broadcast, and a member that verifies and parses it
// reaches the new group key with it.
func TestGroupRekeyCarriesAChunkToTheMembers(t *testing.T) {
	p := newParties(t, SuiteX25519)
	tree := NewLKHTree(4, lkhRand(1))
	if _, err := tree.Rekey([]string{"a", "b", "c"}, nil); err != nil {
		t.Fatal(err)
	}
	path, err := tree.Path("a")
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewLKHMember(path)
	if err != nil {
		t.Fatal(err)
	}
	r, err := tree.Leave("c")
	if err != nil {
		t.Fatal(err)
	}
	chunks, err := r.Chunks(4096)
	if err != nil || len(chunks) != 1 {
		t.Fatalf("Chunks: %d chunks, %v", len(chunks), err)
	}
	sent := sampleGroupRekey()
	sent.Chunk = chunks[0]
	raw, err := PlainMessage(p.server, [8]byte{}, TypeGroupRekey, sent)
	if err != nil {
		t.Fatal(err)
	}
	m := mustParse(t, raw)
	if err := m.Verify(p.server.Public()); err != nil {
		t.Fatal(err)
	}
	got, err := ParseGroupRekey(m.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !equalBodies(got, sent) {
		t.Fatalf("ParseGroupRekey = %+v, want %+v", got, sent)
	}
	if _, err := a.Apply(got.Chunk); err != nil {
		t.Fatal(err)
	}
	wantV, wantK := tree.GroupKey()
	if v, k := a.GroupKey(); v != wantV || k != wantK {
		t.Fatalf("member at version %d after the chunk, want %d and the tree's key", v, wantV)
	}
}

// TestSenderAuthFieldsRefuseWhatTheyDoNotDefine: reserved group flags, and
// a roster part outside its count, are malformed.
func TestSenderAuthFieldsRefuseWhatTheyDoNotDefine(t *testing.T) {
	jr := sampleJoinResponse()
	jr.Flags = FlagSenderAuth
	enc := mustMarshal(t, jr)
	flags := len(enc) - 4 - len(jr.Ext) - 8 - 1
	if got, err := ParseJoinResponse(enc); err != nil || !got.Flags.SenderAuth() {
		t.Fatalf("a sender_auth JoinResponse: %+v, %v", got.Flags, err)
	}
	enc[flags] |= 0x02
	if _, err := ParseJoinResponse(enc); !errors.Is(err, ErrMalformed) {
		t.Fatalf("a reserved group flag: %v, want ErrMalformed", err)
	}
	jr.Flags = 0x80
	if _, err := jr.MarshalBinary(); err == nil {
		t.Fatal("a reserved group flag encoded")
	}
	for _, r := range []Roster{{Parts: 0}, {Part: 2, Parts: 2}} {
		if _, err := r.MarshalBinary(); err == nil {
			t.Errorf("roster part %d of %d encoded", r.Part, r.Parts)
		}
	}
	ro := mustMarshal(t, sampleRoster())
	ro[8+8+1] = 2 // part 2 of 2
	if _, err := ParseRoster(ro); !errors.Is(err, ErrMalformed) {
		t.Fatalf("roster part 2 of 2: %v, want ErrMalformed", err)
	}
}
