package envelope_test

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/smqtt/smqtt/envelope"
)

// member is one member of a sender_auth group in these tests: its sender
// id, its Sealer and its signing key.
type member struct {
	sender uint64
	sealer *envelope.Sealer
	priv   ed25519.PrivateKey
}

func (m *member) Sign(msg []byte) []byte { return ed25519.Sign(m.priv, msg) }

// roster maps sender ids to verification keys, as a key server's Roster
// does; safe for concurrent use.
type roster struct {
	mu   sync.Mutex
	keys map[uint64]ed25519.PublicKey
	asks int
}

func (r *roster) SenderKey(group string, sender uint64) (ed25519.PublicKey, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.asks++
	k, ok := r.keys[sender]
	return k, ok
}

func newMember(t testing.TB, key *envelope.GroupKey, sender uint64, seed byte, r *roster) *member {
	t.Helper()
	priv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, ed25519.SeedSize))
	if r != nil {
		r.mu.Lock()
		r.keys[sender] = priv.Public().(ed25519.PublicKey)
		r.mu.Unlock()
	}
	return &member{sender: sender, sealer: mustSealer(t, testGroup, testEpoch, key, sender), priv: priv}
}

// batch seals one message per topic with FlagProof and proves them as one
// batch.
func (m *member) batch(t testing.TB, topics ...string) [][]byte {
	t.Helper()
	items := make([]envelope.BatchItem, len(topics))
	for i, tp := range topics {
		env, _, err := m.sealer.Seal(nil, tp, envelope.FlagProof, []byte(fmt.Sprintf("m%d on %s", i, tp)))
		if err != nil {
			t.Fatal(err)
		}
		items[i] = envelope.BatchItem{Topic: tp, Env: env}
	}
	if err := envelope.ProveBatch(testGroup, m, items); err != nil {
		t.Fatal(err)
	}
	out := make([][]byte, len(items))
	for i := range items {
		out[i] = items[i].Env
	}
	return out
}

func topics(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("secure/t/%d", i)
	}
	return out
}

// Every envelope of batches of every size up to 70 verifies on its own and
// still opens; its proof has the length ProofLen gives.
func TestProofEveryBatchShape(t *testing.T) {
	key := testKey(1)
	r := &roster{keys: map[uint64]ed25519.PublicKey{}}
	a := newMember(t, key, 11, 1, r)
	o := envelope.NewOpener(newRing().set(testGroup, testEpoch, key), 8)
	for n := 1; n <= 70; n++ {
		tps := topics(n)
		envs := a.batch(t, tps...)
		c := envelope.NewProofChecker(r, 0)
		for i, env := range envs {
			if err := c.Check(testGroup, tps[i], env); err != nil {
				t.Fatalf("batch of %d, envelope %d: %v", n, i, err)
			}
			_, p, ok, err := envelope.SplitProof(env)
			if err != nil || !ok || int(p.Index) != i || int(p.Size) != n {
				t.Fatalf("batch of %d, envelope %d: SplitProof = %+v, %v, %v", n, i, p, ok, err)
			}
			if got, want := len(p.Path)*envelope.HashLen+envelope.ProofFixedLen, envelope.ProofLen(i, n); got != want {
				t.Fatalf("batch of %d, envelope %d: proof of %d bytes, ProofLen says %d", n, i, got, want)
			}
			if envelope.ProofLen(i, n) > envelope.MaxProofLen(n) {
				t.Fatalf("batch of %d: envelope %d's proof is longer than MaxProofLen", n, i)
			}
			h, pt, err := o.Open(nil, testGroup, tps[i], env)
			if err != nil || !h.Flags.Proof() || string(pt) != fmt.Sprintf("m%d on %s", i, tps[i]) {
				t.Fatalf("batch of %d, envelope %d: Open = %+v, %q, %v", n, i, h, pt, err)
			}
		}
		if c.Len() != 1 {
			t.Fatalf("batch of %d: checker remembers %d roots, want 1", n, c.Len())
		}
	}
}

// The attacks of a member on another (and of the broker), each refused
// with ErrProof (or ErrMalformed for a proof that does not parse), and
// reported under the reason "sender_auth" or "malformed".
func TestProofRefusesForgeries(t *testing.T) {
	key := testKey(1)
	r := &roster{keys: map[uint64]ed25519.PublicKey{}}
	honest := newMember(t, key, 11, 1, r)
	mallory := newMember(t, key, 22, 2, r)
	outsider := newMember(t, key, 33, 3, nil) // holds the group key, not in the roster

	tps := []string{"secure/a", "secure/b", "secure/c"}
	good := honest.batch(t, tps...)

	// Mallory seals under honest's sender id (it has the group key, so the
	// AEAD holds) and signs with its own key.
	posing := &member{sender: honest.sender, sealer: mustSealer(t, testGroup, testEpoch, key, honest.sender), priv: mallory.priv}
	posed := posing.batch(t, "secure/actuator")[0]

	// Mallory takes honest's envelope, strips its proof and proves it
	// again under its own key.
	stripped, _, _, err := envelope.SplitProof(good[0])
	if err != nil {
		t.Fatal(err)
	}
	resigned := []envelope.BatchItem{{Topic: tps[0], Env: bytes.Clone(stripped)}}
	if err := envelope.ProveBatch(testGroup, mallory, resigned); err != nil {
		t.Fatal(err)
	}

	// Mallory seals its own message and attaches honest's proof (replay of
	// another member's batch proof).
	own, _, err := mallory.sealer.Seal(nil, tps[1], envelope.FlagProof, []byte("mallory"))
	if err != nil {
		t.Fatal(err)
	}
	_, hp, _, _ := envelope.SplitProof(good[1])
	replayedProof := hp.AppendTo(own)

	// ... or seals under honest's id and attaches honest's proof.
	posingEnv, _, err := posing.sealer.Seal(nil, tps[1], envelope.FlagProof, []byte("mallory as honest"))
	if err != nil {
		t.Fatal(err)
	}
	replayedAsHonest := hp.AppendTo(posingEnv)

	// A member outside the roster (revoked: its key is no longer listed).
	outside := outsider.batch(t, "secure/a")[0]

	// Without a proof at all.
	bare, _, err := honest.sealer.Seal(nil, "secure/a", 0, []byte("no proof"))
	if err != nil {
		t.Fatal(err)
	}

	flip := func(env []byte, i int) []byte { b := bytes.Clone(env); b[i] ^= 1; return b }
	cases := []struct {
		name, topic string
		msg         []byte
		reason      string
	}{
		{"sealed under another member's sender id", "secure/actuator", posed, "sender_auth"},
		{"another member's envelope signed again", tps[0], resigned[0].Env, "sender_auth"},
		{"another member's proof on its own envelope", tps[1], replayedProof, "sender_auth"},
		{"another member's proof on an envelope under its id", tps[1], replayedAsHonest, "sender_auth"},
		{"a proved envelope moved to another topic", "secure/other", good[0], "sender_auth"},
		{"a proved envelope moved to the topic of another of its batch", tps[2], good[1], "sender_auth"},
		{"a sender not in the roster", "secure/a", outside, "sender_auth"},
		{"no proof", "secure/a", bare, "sender_auth"},
		{"signature altered", tps[0], flip(good[0], len(good[0])-5), "sender_auth"},
		{"path altered", tps[0], flip(good[0], len(good[0])-envelope.ProofFixedLen-1), "sender_auth"},
		{"ciphertext altered", tps[0], flip(good[0], envelope.HeaderLen), "sender_auth"},
		{"index out of range", tps[0], func() []byte { b := bytes.Clone(good[0]); b[len(b)-3] = 9; return b }(), "malformed"},
		{"size zero", tps[0], func() []byte { b := bytes.Clone(good[0]); b[len(b)-1], b[len(b)-2] = 0, 0; return b }(), "malformed"},
		{"truncated", tps[0], good[0][:envelope.Overhead+10], "malformed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := envelope.NewProofChecker(r, 0)
			err := c.Check(testGroup, tc.topic, tc.msg)
			if err == nil {
				t.Fatal("Check accepted it")
			}
			if got := envelope.Reason(err); got != tc.reason {
				t.Fatalf("Reason(%v) = %q, want %q", err, got, tc.reason)
			}
		})
	}
	// The honest batch itself verifies, in any order, once per batch.
	c := envelope.NewProofChecker(r, 0)
	for _, i := range []int{2, 0, 1} {
		if err := c.Check(testGroup, tps[i], good[i]); err != nil {
			t.Fatalf("honest envelope %d: %v", i, err)
		}
	}
}

// A verified root is remembered for its sender and key only: after the
// roster changes the sender's key, the same envelope is checked again and
// refused.
func TestProofCacheFollowsTheRoster(t *testing.T) {
	key := testKey(1)
	r := &roster{keys: map[uint64]ed25519.PublicKey{}}
	a := newMember(t, key, 11, 1, r)
	envs := a.batch(t, topics(8)...)
	c := envelope.NewProofChecker(r, 2)
	for i, env := range envs {
		if err := c.Check(testGroup, topics(8)[i], env); err != nil {
			t.Fatal(err)
		}
	}
	r.mu.Lock()
	delete(r.keys, 11)
	r.mu.Unlock()
	if err := c.Check(testGroup, topics(8)[3], envs[3]); !errors.Is(err, envelope.ErrProof) {
		t.Fatalf("after the sender left the roster: %v, want ErrProof", err)
	}
	other := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, 32))
	r.mu.Lock()
	r.keys[11] = other.Public().(ed25519.PublicKey)
	r.mu.Unlock()
	if err := c.Check(testGroup, topics(8)[3], envs[3]); !errors.Is(err, envelope.ErrProof) {
		t.Fatalf("with another key certified for the sender: %v, want ErrProof", err)
	}
	// The cache is bounded.
	for i := 0; i < 5; i++ {
		b := a.batch(t, "secure/x")
		r.mu.Lock()
		r.keys[11] = a.priv.Public().(ed25519.PublicKey)
		r.mu.Unlock()
		if err := c.Check(testGroup, "secure/x", b[0]); err != nil {
			t.Fatal(err)
		}
	}
	if c.Len() != 2 {
		t.Fatalf("checker of size 2 remembers %d roots", c.Len())
	}
}

// ProveBatch refuses what it cannot prove honestly.
func TestProveBatchRefusesBadBatches(t *testing.T) {
	key := testKey(1)
	a := newMember(t, key, 11, 1, nil)
	b := newMember(t, key, 22, 2, nil)
	withProof := func(m *member) []byte {
		env, _, err := m.sealer.Seal(nil, "secure/a", envelope.FlagProof, []byte("x"))
		if err != nil {
			t.Fatal(err)
		}
		return env
	}
	without, _, _ := a.sealer.Seal(nil, "secure/a", 0, []byte("x"))
	for name, items := range map[string][]envelope.BatchItem{
		"empty":            nil,
		"two senders":      {{"secure/a", withProof(a)}, {"secure/a", withProof(b)}},
		"without the flag": {{"secure/a", without}},
		"no topic":         {{"", withProof(a)}},
		"not an envelope":  {{"secure/a", []byte("plain")}},
	} {
		if err := envelope.ProveBatch(testGroup, a, items); !errors.Is(err, envelope.ErrMalformed) {
			t.Errorf("%s: ProveBatch = %v, want ErrMalformed", name, err)
		}
	}
}

// FuzzCheckProof feeds arbitrary messages to Check: it must never panic,
// must fail with ErrProof or ErrMalformed, and may accept only envelopes
// (on their topics) that the honest member proved.
func FuzzCheckProof(f *testing.F) {
	key := testKey(1)
	r := &roster{keys: map[uint64]ed25519.PublicKey{}}
	a := newMember(f, key, 11, 1, r)
	accepted := map[string]bool{}
	for n := 1; n <= 5; n++ {
		tps := topics(n)
		for i, env := range a.batch(f, tps...) {
			f.Add(env, tps[i])
			proper, _, _, _ := envelope.SplitProof(env)
			accepted[tps[i]+"\x00"+string(proper)] = true
		}
	}
	f.Add([]byte{}, "secure/t/0")
	c := envelope.NewProofChecker(r, 16)
	f.Fuzz(func(t *testing.T, msg []byte, topic string) {
		err := c.Check(testGroup, topic, msg)
		if err == nil {
			// The signature bytes may differ from the member's (a root
			// verified once is remembered), but the envelope proper and its
			// topic must be what the member proved.
			proper, _, _, _ := envelope.SplitProof(msg)
			if !accepted[topic+"\x00"+string(proper)] {
				t.Fatalf("Check accepted %x on %q, which the member never proved", msg, topic)
			}
			return
		}
		if !errors.Is(err, envelope.ErrProof) && !errors.Is(err, envelope.ErrMalformed) && !errors.Is(err, envelope.ErrVersion) {
			t.Fatalf("Check error %v is none of ErrProof, ErrMalformed, ErrVersion", err)
		}
	})
}

// FuzzSplitProof: SplitProof never panics, and what it splits encodes back
// to the same bytes.
func FuzzSplitProof(f *testing.F) {
	key := testKey(1)
	a := newMember(f, key, 11, 1, nil)
	for _, env := range a.batch(f, topics(3)...) {
		f.Add(env)
	}
	f.Add([]byte{1, 0x10})
	f.Fuzz(func(t *testing.T, msg []byte) {
		env, p, ok, err := envelope.SplitProof(msg)
		if err != nil || !ok {
			return
		}
		if again := p.AppendTo(bytes.Clone(env)); !bytes.Equal(again, msg) {
			t.Fatalf("SplitProof(%x) = %x + %+v, which encodes to %x", msg, env, p, again)
		}
	})
}

// BenchmarkProveBatch measures sealing and proving 256-byte messages in
// batches of several sizes, per message: a batch of one pays a whole
// signature, larger batches share it.
func BenchmarkProveBatch(b *testing.B) {
	key := testKey(1)
	m := newMember(b, key, 11, 1, nil)
	payload := bytes.Repeat([]byte{'x'}, 256)
	for _, n := range []int{1, 8, 64} {
		b.Run(fmt.Sprintf("batch=%d", n), func(b *testing.B) {
			items := make([]envelope.BatchItem, n)
			bufs := make([][]byte, n)
			b.SetBytes(int64(len(payload)))
			b.ReportAllocs()
			for i := 0; b.Loop(); {
				for k := range items {
					env, _, err := m.sealer.Seal(bufs[k][:0], "secure/room1/temperature", envelope.FlagProof, payload)
					if err != nil {
						b.Fatal(err)
					}
					items[k] = envelope.BatchItem{Topic: "secure/room1/temperature", Env: env}
				}
				if err := envelope.ProveBatch(testGroup, m, items); err != nil {
					b.Fatal(err)
				}
				for k := range items {
					bufs[k] = items[k].Env
				}
				i += n
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/msg")
		})
	}
}

// BenchmarkCheckProof measures a receiver: every envelope of each batch
// (one verification per batch, the rest cache hits), and one envelope per
// batch (the worst case: one verification per message).
func BenchmarkCheckProof(b *testing.B) {
	key := testKey(1)
	r := &roster{keys: map[uint64]ed25519.PublicKey{}}
	m := newMember(b, key, 11, 1, r)
	const n = 64
	tps := make([]string, n)
	for i := range tps {
		tps[i] = "secure/room1/temperature"
	}
	batches := make([][][]byte, 64)
	for i := range batches {
		batches[i] = m.batch(b, tps...)
	}
	b.Run("all of each batch", func(b *testing.B) {
		for b.Loop() {
			c := envelope.NewProofChecker(r, 8)
			for _, bt := range batches[:4] {
				for _, env := range bt {
					if err := c.Check(testGroup, tps[0], env); err != nil {
						b.Fatal(err)
					}
				}
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*4*n), "ns/msg")
	})
	b.Run("one of each batch", func(b *testing.B) {
		// A cache of one and consecutive batches: every check misses.
		c := envelope.NewProofChecker(r, 1)
		for i := 0; b.Loop(); i++ {
			if err := c.Check(testGroup, tps[0], batches[i%len(batches)][i%n]); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/msg")
	})
}
