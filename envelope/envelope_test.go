package envelope_test

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/smqtt/smqtt/envelope"
)

const (
	testGroup = "demo"
	testEpoch = 7
	testTopic = "secure/room1/temperature"
)

// ring is a KeyLookup for tests, safe for concurrent use.
type ring struct {
	mu   sync.Mutex
	keys map[ringKey]*envelope.GroupKey
}

type ringKey struct {
	group string
	epoch uint32
}

func newRing() *ring { return &ring{keys: make(map[ringKey]*envelope.GroupKey)} }

func (r *ring) set(group string, epoch uint32, key *envelope.GroupKey) *ring {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys[ringKey{group, epoch}] = key
	return r
}

func (r *ring) retire(group string, epoch uint32) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.keys, ringKey{group, epoch})
}

func (r *ring) GroupKey(group string, epoch uint32) (*envelope.GroupKey, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k, ok := r.keys[ringKey{group, epoch}]
	return k, ok
}

func testKey(b byte) *envelope.GroupKey {
	var k envelope.GroupKey
	for i := range k {
		k[i] = b + byte(i)
	}
	return &k
}

func mustSealer(t testing.TB, group string, epoch uint32, key *envelope.GroupKey, sender uint64) *envelope.Sealer {
	t.Helper()
	s, err := envelope.NewSealer(group, epoch, key, sender)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSealOpenRoundTrip(t *testing.T) {
	key := testKey(1)
	s := mustSealer(t, testGroup, testEpoch, key, 42)
	o := envelope.NewOpener(newRing().set(testGroup, testEpoch, key), 16)
	tests := []struct {
		name      string
		topic     string
		flags     envelope.Flags
		plaintext []byte
	}{
		{"one byte", testTopic, 0, []byte("x")},
		{"256 bytes", testTopic, 0, bytes.Repeat([]byte{0xab}, 256)},
		{"64 KiB", testTopic, 0, bytes.Repeat([]byte("payload"), 10000)},
		{"empty message", testTopic, 0, nil},
		{"retained", "secure/door", envelope.FlagRetain, []byte("open")},
		{"retained tombstone", "secure/door", envelope.FlagRetain, []byte{}},
		{"reseal", "secure/door", envelope.FlagRetain | envelope.FlagReseal, []byte("open")},
		{"longest topic", strings.Repeat("t", envelope.MaxTopicLen), 0, []byte("long topic")},
		{"topic longer than the pooled buffer", strings.Repeat("t", 600), 0, []byte("x")},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := []byte("prefix")
			msg, seq, err := s.Seal(prefix, tt.topic, tt.flags, tt.plaintext)
			if err != nil {
				t.Fatal(err)
			}
			if seq != uint64(i+1) {
				t.Errorf("seq = %d, want %d", seq, i+1)
			}
			if !bytes.HasPrefix(msg, []byte("prefix")) {
				t.Fatalf("Seal did not append to dst")
			}
			msg = msg[len(prefix):]
			if len(msg) != len(tt.plaintext)+envelope.Overhead {
				t.Errorf("envelope is %d bytes, want %d + %d", len(msg), len(tt.plaintext), envelope.Overhead)
			}
			h, pt, err := o.Open([]byte("out:"), testGroup, tt.topic, msg)
			if err != nil {
				t.Fatal(err)
			}
			want := envelope.Header{Version: envelope.Version, Flags: tt.flags, Epoch: testEpoch, Sender: 42, Seq: seq}
			if h != want {
				t.Errorf("header = %+v, want %+v", h, want)
			}
			if !bytes.Equal(pt, append([]byte("out:"), tt.plaintext...)) {
				t.Errorf("Open did not append the plaintext to dst: got %.40q", pt)
			}
		})
	}
}

func TestOverheadIsExactly38Bytes(t *testing.T) {
	if envelope.Overhead != 38 || envelope.HeaderLen != 22 || envelope.TagLen != 16 {
		t.Fatalf("Overhead = %d (header %d, tag %d), want 38 (22, 16)", envelope.Overhead, envelope.HeaderLen, envelope.TagLen)
	}
	s := mustSealer(t, testGroup, testEpoch, testKey(1), 1)
	for _, n := range []int{0, 1, 15, 16, 17, 1000} {
		msg, _, err := s.Seal(nil, testTopic, 0, make([]byte, n))
		if err != nil {
			t.Fatal(err)
		}
		if len(msg)-n != 38 {
			t.Errorf("%d-byte plaintext sealed to %d bytes, overhead %d", n, len(msg), len(msg)-n)
		}
	}
}

func TestSealerCountsFromOne(t *testing.T) {
	s := mustSealer(t, testGroup, testEpoch, testKey(1), 9)
	if s.LastSeq() != 0 || s.Group() != testGroup || s.Epoch() != testEpoch || s.Sender() != 9 {
		t.Fatalf("new sealer: LastSeq %d group %q epoch %d sender %d", s.LastSeq(), s.Group(), s.Epoch(), s.Sender())
	}
	for want := uint64(1); want <= 3; want++ {
		msg, seq, err := s.Seal(nil, testTopic, 0, []byte("m"))
		if err != nil {
			t.Fatal(err)
		}
		h, err := envelope.ParseHeader(msg)
		if err != nil {
			t.Fatal(err)
		}
		if seq != want || h.Seq != want || s.LastSeq() != want {
			t.Errorf("message %d: seq %d, header seq %d, LastSeq %d", want, seq, h.Seq, s.LastSeq())
		}
	}
	if _, err := s.SealSeq(nil, testTopic, 0, 100, []byte("m")); err != nil {
		t.Fatal(err)
	}
	if s.LastSeq() != 3 {
		t.Errorf("SealSeq changed the counter: LastSeq = %d, want 3", s.LastSeq())
	}
}

func TestSealerHandsOutEachSeqOnceUnderConcurrency(t *testing.T) {
	s := mustSealer(t, testGroup, testEpoch, testKey(1), 9)
	const workers, each = 4, 500
	seqs := make(chan uint64, workers*each)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			buf := make([]byte, 0, 64)
			for range each {
				_, seq, err := s.Seal(buf[:0], testTopic, 0, []byte("m"))
				if err != nil {
					t.Error(err)
					return
				}
				seqs <- seq
			}
		})
	}
	wg.Wait()
	close(seqs)
	seen := make(map[uint64]bool)
	for seq := range seqs {
		if seen[seq] || seq < 1 || seq > workers*each {
			t.Fatalf("seq %d handed out twice or out of 1..%d", seq, workers*each)
		}
		seen[seq] = true
	}
	if len(seen) != workers*each || s.LastSeq() != workers*each {
		t.Errorf("%d distinct seqs, LastSeq %d; want %d", len(seen), s.LastSeq(), workers*each)
	}
}

func TestSealRejectsInvalidArguments(t *testing.T) {
	key := testKey(1)
	for _, group := range []string{"", strings.Repeat("g", 256)} {
		if _, err := envelope.NewSealer(group, 1, key, 1); !errors.Is(err, envelope.ErrMalformed) {
			t.Errorf("NewSealer with a %d-byte group: err = %v, want ErrMalformed", len(group), err)
		}
	}
	if _, err := envelope.NewSealer(strings.Repeat("g", 255), 1, key, 1); err != nil {
		t.Errorf("NewSealer with a 255-byte group: %v", err)
	}
	s := mustSealer(t, testGroup, testEpoch, key, 1)
	tests := []struct {
		name  string
		topic string
		flags envelope.Flags
	}{
		{"empty topic", "", 0},
		{"topic of 65536 bytes", strings.Repeat("t", 65536), 0},
		{"reserved flag bit 5", testTopic, 1 << 5},
		{"reserved flag bit 7", testTopic, 1 << 7},
		{"reseal without retain", testTopic, envelope.FlagReseal},
		{"reseal of a Will", testTopic, envelope.FlagRetain | envelope.FlagReseal | envelope.FlagWill},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := []byte("keep")
			out, seq, err := s.Seal(dst, tt.topic, tt.flags, []byte("m"))
			if !errors.Is(err, envelope.ErrMalformed) {
				t.Errorf("Seal: err = %v, want ErrMalformed", err)
			}
			if seq != 0 || !bytes.Equal(out, dst) || s.LastSeq() != 0 {
				t.Errorf("failed Seal returned seq %d, %q, and left LastSeq %d", seq, out, s.LastSeq())
			}
			if _, err := s.SealSeq(nil, tt.topic, tt.flags, 5, []byte("m")); !errors.Is(err, envelope.ErrMalformed) {
				t.Errorf("SealSeq: err = %v, want ErrMalformed", err)
			}
		})
	}
	if _, err := s.SealSeq(nil, testTopic, 0, 0, []byte("m")); !errors.Is(err, envelope.ErrMalformed) {
		t.Errorf("SealSeq with seq 0: err = %v, want ErrMalformed", err)
	}
}

// sealed returns a valid envelope and the Opener that accepts it.
func sealed(t *testing.T) ([]byte, *ring, []byte) {
	t.Helper()
	key := testKey(1)
	s := mustSealer(t, testGroup, testEpoch, key, 0x0102030405060708)
	plaintext := []byte(`{"temperature": 21.5, "unit": "C"}`)
	msg, err := s.SealSeq(nil, testTopic, 0, 1000, plaintext)
	if err != nil {
		t.Fatal(err)
	}
	return msg, newRing().set(testGroup, testEpoch, key), plaintext
}

func withByte(msg []byte, i int, v byte) []byte {
	m := bytes.Clone(msg)
	m[i] = v
	return m
}

func TestOpenRejectsAttacks(t *testing.T) {
	msg, keys, plaintext := sealed(t)
	if _, pt, err := envelope.NewOpener(keys, 8).Open(nil, testGroup, testTopic, msg); err != nil || !bytes.Equal(pt, plaintext) {
		t.Fatalf("the untampered envelope does not open: %v", err)
	}
	tagStart := len(msg) - envelope.TagLen

	type attack struct {
		name  string
		keys  envelope.KeyLookup
		group string
		topic string
		msg   []byte
		want  error
	}
	var attacks []attack
	add := func(name string, m []byte, want error) {
		attacks = append(attacks, attack{name: name, msg: m, want: want})
	}

	// Every header byte, changed.
	for i := range envelope.HeaderLen {
		m := withByte(msg, i, msg[i]^0x80)
		want := envelope.ErrAuth
		switch {
		case i == 0:
			want = envelope.ErrVersion
		case i == 1:
			want = envelope.ErrMalformed // 0x80 is a reserved flag bit
		case i < 6:
			want = envelope.ErrNoKey // another epoch, unknown to the ring
		}
		add(fmt.Sprintf("header byte %d changed", i), m, want)
	}
	add("retain flag set by the broker", withByte(msg, 1, byte(envelope.FlagRetain)), envelope.ErrAuth)
	add("seq changed to another valid seq", withByte(msg, 21, msg[21]^1), envelope.ErrAuth)
	add("version 2", withByte(msg, 0, 2), envelope.ErrVersion)
	add("version 0", withByte(msg, 0, 0), envelope.ErrVersion)
	add("will flag set by the broker", withByte(msg, 1, byte(envelope.FlagWill)), envelope.ErrAuth)
	add("props flag set by the broker", withByte(msg, 1, byte(envelope.FlagProps)), envelope.ErrAuth)
	for bit := 4; bit < 8; bit++ {
		add(fmt.Sprintf("unknown flag bit %d", bit), withByte(msg, 1, 1<<bit), envelope.ErrMalformed)
	}
	add("reseal without retain", withByte(msg, 1, byte(envelope.FlagReseal)), envelope.ErrMalformed)
	zeroSeq := bytes.Clone(msg)
	clear(zeroSeq[14:22])
	add("seq 0", zeroSeq, envelope.ErrMalformed)

	// Every ciphertext and tag byte, changed.
	for i := envelope.HeaderLen; i < len(msg); i++ {
		what := "ciphertext"
		if i >= tagStart {
			what = "tag"
		}
		add(fmt.Sprintf("%s byte %d changed", what, i), withByte(msg, i, msg[i]^0x01), envelope.ErrAuth)
	}

	// Truncation to every length short of the whole, and an extension.
	for n := range len(msg) {
		want := envelope.ErrAuth
		if n < envelope.Overhead {
			want = envelope.ErrMalformed
		}
		add(fmt.Sprintf("truncated to %d bytes", n), bytes.Clone(msg[:n]), want)
	}
	add("extended by a byte", append(bytes.Clone(msg), 0), envelope.ErrAuth)

	// The broker injects its own payloads.
	add("broker injects empty payload", []byte{}, envelope.ErrMalformed)
	add("broker injects short plaintext", []byte("21.5"), envelope.ErrMalformed)
	add("broker injects JSON plaintext", []byte(`{"temperature": 99.9, "unit": "C", "note": "forged"}`), envelope.ErrVersion)
	forged := msg[:envelope.HeaderLen:envelope.HeaderLen]
	forged = append(forged, []byte(`{"temperature": 99.9, "unit": "C"}`)...)
	add("broker injects plaintext behind a copied header", forged, envelope.ErrAuth)
	add("broker injects a header with a zero tag", append(bytes.Clone(msg[:envelope.HeaderLen]), make([]byte, envelope.TagLen)...), envelope.ErrAuth)

	// Moved, or opened with the wrong key.
	attacks = append(attacks,
		attack{name: "moved to another topic", topic: "secure/room2/temperature", msg: msg, want: envelope.ErrAuth},
		attack{name: "moved to another group with the same key", group: "other",
			keys: newRing().set("other", testEpoch, testKey(1)), msg: msg, want: envelope.ErrAuth},
		attack{name: "wrong key", keys: newRing().set(testGroup, testEpoch, testKey(2)), msg: msg, want: envelope.ErrAuth},
		attack{name: "unknown epoch", keys: newRing().set(testGroup, testEpoch+1, testKey(1)), msg: msg, want: envelope.ErrNoKey},
		attack{name: "epoch changed to another epoch with the same key",
			keys: newRing().set(testGroup, testEpoch, testKey(1)).set(testGroup, testEpoch^0x80000000, testKey(1)),
			msg:  withByte(msg, 2, msg[2]^0x80), want: envelope.ErrAuth},
	)

	for _, a := range attacks {
		t.Run(a.name, func(t *testing.T) {
			if a.keys == nil {
				a.keys = keys
			}
			if a.group == "" {
				a.group = testGroup
			}
			if a.topic == "" {
				a.topic = testTopic
			}
			dst := []byte("dst")
			h, out, err := envelope.NewOpener(a.keys, 8).Open(dst, a.group, a.topic, a.msg)
			if !errors.Is(err, a.want) {
				t.Fatalf("err = %v, want %v", err, a.want)
			}
			if h != (envelope.Header{}) || !bytes.Equal(out, dst) || len(out) != len(dst) {
				t.Errorf("failed Open returned header %+v and %q", h, out)
			}
			if got, want := envelope.Reason(err), envelope.Reason(a.want); got != want {
				t.Errorf("Reason = %q, want %q", got, want)
			}
		})
	}
}

func TestOpenRejectsOutOfRangeNames(t *testing.T) {
	msg, keys, _ := sealed(t)
	o := envelope.NewOpener(keys, 8)
	for _, tc := range []struct{ group, topic string }{
		{"", testTopic},
		{strings.Repeat("g", 256), testTopic},
		{testGroup, ""},
		{testGroup, strings.Repeat("t", 65536)},
	} {
		if _, _, err := o.Open(nil, tc.group, tc.topic, msg); !errors.Is(err, envelope.ErrMalformed) {
			t.Errorf("Open with a %d-byte group and a %d-byte topic: err = %v, want ErrMalformed", len(tc.group), len(tc.topic), err)
		}
	}
}

func TestReasonLabels(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{nil, ""},
		{fmt.Errorf("x: %w", envelope.ErrMalformed), "malformed"},
		{fmt.Errorf("x: %w", envelope.ErrVersion), "version"},
		{fmt.Errorf("x: %w", envelope.ErrNoKey), "no_key"},
		{fmt.Errorf("x: %w", envelope.ErrAuth), "auth"},
		{errors.New("something else"), "other"},
	}
	for _, tt := range tests {
		if got := envelope.Reason(tt.err); got != tt.want {
			t.Errorf("Reason(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

func TestEqualPlaintextsSealDifferently(t *testing.T) {
	s := mustSealer(t, testGroup, testEpoch, testKey(1), 5)
	a, _, _ := s.Seal(nil, testTopic, 0, []byte("same"))
	b, _, _ := s.Seal(nil, testTopic, 0, []byte("same"))
	if bytes.Equal(a[envelope.HeaderLen:], b[envelope.HeaderLen:]) {
		t.Errorf("two seals of one plaintext share ciphertext and tag %x", a[envelope.HeaderLen:])
	}
}

// Senders sharing a group key use the same nonce for the same seq; they stay
// safe only because each seals under its own subkey. This test shows the
// subkeys differ in every input and so do the ciphertexts.
func TestSendersSharingAKeyUseDistinctSubkeys(t *testing.T) {
	key := testKey(1)
	base := envelope.DeriveSenderKey(key, testGroup, testEpoch, 1)
	for name, other := range map[string][envelope.KeyLen]byte{
		"other sender": envelope.DeriveSenderKey(key, testGroup, testEpoch, 2),
		"other epoch":  envelope.DeriveSenderKey(key, testGroup, testEpoch+1, 1),
		"other group":  envelope.DeriveSenderKey(key, "demo2", testEpoch, 1),
		"other key":    envelope.DeriveSenderKey(testKey(2), testGroup, testEpoch, 1),
	} {
		if other == base {
			t.Errorf("%s derives the same subkey %x", name, base)
		}
	}

	s1 := mustSealer(t, testGroup, testEpoch, key, 1)
	s2 := mustSealer(t, testGroup, testEpoch, key, 2)
	m1, seq1, _ := s1.Seal(nil, testTopic, 0, []byte("same plaintext"))
	m2, seq2, _ := s2.Seal(nil, testTopic, 0, []byte("same plaintext"))
	if seq1 != seq2 {
		t.Fatalf("seqs %d and %d: both senders should be at seq 1", seq1, seq2)
	}
	if bytes.Equal(m1[envelope.HeaderLen:], m2[envelope.HeaderLen:]) {
		t.Errorf("two senders with the same seq produced the same ciphertext: a nonce was reused under one key")
	}
	// Claiming the other sender's id does not open: the subkey differs.
	spliced := append(bytes.Clone(m2[:envelope.HeaderLen]), m1[envelope.HeaderLen:]...)
	o := envelope.NewOpener(newRing().set(testGroup, testEpoch, key), 8)
	if _, _, err := o.Open(nil, testGroup, testTopic, spliced); !errors.Is(err, envelope.ErrAuth) {
		t.Errorf("sender 1's ciphertext under sender 2's header: err = %v, want ErrAuth", err)
	}
}

func TestParseHeaderRoundTrip(t *testing.T) {
	h := envelope.Header{Version: 1, Flags: envelope.FlagRetain, Epoch: 0xdeadbeef, Sender: 0x0102030405060708, Seq: 0xfffffffffffffffe}
	b := h.AppendTo([]byte{0xee})
	if len(b) != 1+envelope.HeaderLen || b[0] != 0xee {
		t.Fatalf("AppendTo wrote %d bytes (%x)", len(b)-1, b)
	}
	want := "01" + "01" + "deadbeef" + "0102030405060708" + "fffffffffffffffe"
	if got := fmt.Sprintf("%x", b[1:]); got != want {
		t.Errorf("header bytes = %s, want %s", got, want)
	}
	got, err := envelope.ParseHeader(append(b[1:], make([]byte, envelope.TagLen)...))
	if err != nil || got != h {
		t.Errorf("ParseHeader = %+v, %v; want %+v", got, err, h)
	}
}

func TestFlagsString(t *testing.T) {
	for f, want := range map[envelope.Flags]string{
		0: "0", envelope.FlagRetain: "retain", envelope.FlagRetain | envelope.FlagReseal: "retain|reseal", 0x81: "retain|0x80",
		envelope.FlagRetain | envelope.FlagWill | envelope.FlagProps: "retain|will|props",
	} {
		if got := f.String(); got != want {
			t.Errorf("Flags(0x%02x).String() = %q, want %q", uint8(f), got, want)
		}
	}
}

func TestOpenerAsksTheKeyRingOnEveryOpen(t *testing.T) {
	key := testKey(1)
	keys := newRing().set(testGroup, testEpoch, key)
	o := envelope.NewOpener(keys, 8)
	s := mustSealer(t, testGroup, testEpoch, key, 1)
	msg, _, _ := s.Seal(nil, testTopic, 0, []byte("m"))
	if _, _, err := o.Open(nil, testGroup, testTopic, msg); err != nil {
		t.Fatal(err)
	}
	keys.retire(testGroup, testEpoch)
	if _, _, err := o.Open(nil, testGroup, testTopic, msg); !errors.Is(err, envelope.ErrNoKey) {
		t.Errorf("after retiring the epoch: err = %v, want ErrNoKey although the cipher is cached", err)
	}
	// A key ring that maps the epoch to another key invalidates the cache.
	keys.set(testGroup, testEpoch, testKey(3))
	if _, _, err := o.Open(nil, testGroup, testTopic, msg); !errors.Is(err, envelope.ErrAuth) {
		t.Errorf("after replacing the key: err = %v, want ErrAuth", err)
	}
	s3 := mustSealer(t, testGroup, testEpoch, testKey(3), 1)
	msg3, _, _ := s3.Seal(nil, testTopic, 0, []byte("m"))
	if _, _, err := o.Open(nil, testGroup, testTopic, msg3); err != nil {
		t.Errorf("message under the replacing key: %v", err)
	}
}

func TestOpenerCacheIsBoundedAndForgets(t *testing.T) {
	key := testKey(1)
	keys := newRing().set(testGroup, 1, key).set(testGroup, 2, key)
	o := envelope.NewOpener(keys, 3)
	var msgs [][]byte
	for epoch := uint32(1); epoch <= 2; epoch++ {
		for sender := uint64(1); sender <= 4; sender++ {
			m, _, err := mustSealer(t, testGroup, epoch, key, sender).Seal(nil, testTopic, 0, []byte("m"))
			if err != nil {
				t.Fatal(err)
			}
			msgs = append(msgs, m)
		}
	}
	for round := range 3 {
		for i, m := range msgs {
			if _, _, err := o.Open(nil, testGroup, testTopic, m); err != nil {
				t.Fatalf("round %d message %d: %v", round, i, err)
			}
			if o.Len() > 3 {
				t.Fatalf("cache holds %d ciphers, bound is 3", o.Len())
			}
		}
	}
	o.Forget(testGroup, 1)
	o.Forget(testGroup, 2)
	if o.Len() != 0 {
		t.Errorf("after forgetting both epochs the cache holds %d ciphers", o.Len())
	}
	if _, _, err := o.Open(nil, testGroup, testTopic, msgs[0]); err != nil || o.Len() != 1 {
		t.Errorf("after Forget: Open err %v, cache size %d", err, o.Len())
	}
	o.Forget(testGroup, 2)
	if o.Len() != 1 {
		t.Errorf("forgetting another epoch dropped the cached cipher of epoch 1")
	}
}

func TestOpenerIsSafeForConcurrentUse(t *testing.T) {
	key := testKey(1)
	keys := newRing().set(testGroup, testEpoch, key)
	o := envelope.NewOpener(keys, 4)
	var msgs [][]byte
	for sender := uint64(1); sender <= 8; sender++ {
		m, _, _ := mustSealer(t, testGroup, testEpoch, key, sender).Seal(nil, testTopic, 0, []byte("m"))
		msgs = append(msgs, m)
	}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 200 {
				m := msgs[(i+w)%len(msgs)]
				if _, _, err := o.Open(nil, testGroup, testTopic, m); err != nil {
					t.Error(err)
					return
				}
				if i%50 == 0 {
					o.Forget(testGroup, testEpoch)
				}
			}
		})
	}
	wg.Wait()
}

func BenchmarkSealOpen256(b *testing.B) {
	key := testKey(1)
	s := mustSealer(b, testGroup, testEpoch, key, 1)
	o := envelope.NewOpener(newRing().set(testGroup, testEpoch, key), 16)
	plaintext := make([]byte, 256)
	msg := make([]byte, 0, 256+envelope.Overhead)
	out := make([]byte, 0, 256)
	b.ReportAllocs()
	b.SetBytes(256)
	for b.Loop() {
		m, _, err := s.Seal(msg[:0], testTopic, 0, plaintext)
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := o.Open(out[:0], testGroup, testTopic, m); err != nil {
			b.Fatal(err)
		}
	}
}
