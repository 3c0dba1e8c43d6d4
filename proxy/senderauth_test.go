package proxy_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
)

// edSigner signs batch roots with an Ed25519 key, as a gkd.Identity does.
type edSigner ed25519.PrivateKey

func (k edSigner) Sign(m []byte) []byte { return ed25519.Sign(ed25519.PrivateKey(k), m) }

// saMember is a member of a sender_auth group: a sidecar, or (without
// one) a process that holds the group key and speaks to the broker itself.
type saMember struct {
	sc     *proxy.Sidecar
	ring   *keyclient.Ring
	priv   ed25519.PrivateKey
	sender uint64
}

func newSigningKey(t testing.TB) ed25519.PrivateKey {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	must(t, err)
	return priv
}

// senderAuthSidecar starts a sidecar whose ring treats group demo as a
// sender_auth group and signs with a key of its own. It seals nothing
// until a roster listing it is installed (installRoster).
func (r *rig) senderAuthSidecar(name, dir string) *saMember {
	m := &saMember{priv: newSigningKey(r.t)}
	m.sc = r.sidecar(name, dir, func(o *proxy.Options) {
		m.ring = o.Keys.(*keyclient.Ring)
		m.ring.SetSenderAuth("demo", true)
		m.ring.SetProofSigner(edSigner(m.priv))
	})
	s, err := m.ring.Sealer("demo")
	must(r.t, err)
	m.sender = s.Sender()
	return m
}

// installRoster installs, in every ring, version v of the roster that
// certifies the given members.
func installRoster(t testing.TB, v uint64, rings []*keyclient.Ring, members ...*saMember) {
	keys := map[uint64]ed25519.PublicKey{}
	for _, m := range members {
		keys[m.sender] = m.priv.Public().(ed25519.PublicKey)
	}
	for _, ring := range rings {
		must(t, ring.InstallRoster("demo", v, keys))
	}
}

// topicSpy records what crosses the broker, topic and payload.
type topicSpy struct {
	mu   sync.Mutex
	msgs []spied
}

type spied struct {
	topic   string
	payload []byte
}

func newTopicSpy(t *testing.T, url string) *topicSpy {
	t.Helper()
	a, err := mqtttest.Connect(url, uniq("spy"), mqtttest.AppOptions{InboxSize: 1})
	must(t, err)
	s := &topicSpy{}
	tok := a.Client.Subscribe("secure/#", 2, func(_ paho.Client, m paho.Message) {
		s.mu.Lock()
		s.msgs = append(s.msgs, spied{m.Topic(), slices.Clone(m.Payload())})
		s.mu.Unlock()
	})
	tok.Wait()
	must(t, tok.Error())
	t.Cleanup(a.Close)
	return s
}

func (s *topicSpy) all() []spied {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.msgs)
}

// burst publishes n QoS 1 messages without waiting between them (so that
// they queue up in the sidecar) and waits for every acknowledgement.
func burst(t *testing.T, a *mqtttest.App, prefix string, n int) []string {
	t.Helper()
	var want []string
	toks := make([]paho.Token, n)
	for i := range n {
		topic, payload := fmt.Sprintf("secure/%s/%d", prefix, i%5), fmt.Sprintf("%s-%d", prefix, i)
		want = append(want, topic+" "+payload)
		toks[i] = a.Client.Publish(topic, 1, false, payload)
	}
	for _, tok := range toks {
		if !tok.WaitTimeout(10 * time.Second) {
			t.Fatal("a publish was not acknowledged")
		}
		must(t, tok.Error())
	}
	return want
}

// receive collects n messages, or fails.
func receive(t *testing.T, a *mqtttest.App, n int) []string {
	t.Helper()
	var got []string
	for len(got) < n {
		m, ok := a.Next(10 * time.Second)
		if !ok {
			t.Fatalf("received %d of %d messages", len(got), n)
		}
		got = append(got, m.Topic+" "+string(m.Payload))
	}
	return got
}

// TestSenderAuth runs a sender_auth group through Mosquitto: two honest
// members publishing interleaved bursts are delivered complete and in
// order per publisher; a member that forges another's messages (under the
// other's sender id, by signing the other's envelope, by reusing the
// other's proof, by moving the other's message to another topic) gets
// nothing delivered, each attempt counted under sender_auth; once revoked
// (the roster no longer lists it) even its own messages are refused. A
// fresh receiver given a batch's envelopes out of order and with some
// missing delivers exactly those it got.
func TestSenderAuth(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		m := startMosquitto(t)
		r := newModeRig(t, mode, m)
		spy := newTopicSpy(t, m.URL())
		alice := r.senderAuthSidecar(uniq("alice"), "")
		carol := r.senderAuthSidecar(uniq("carol"), "")
		bob := r.senderAuthSidecar(uniq("bob"), "")
		mallory := &saMember{priv: newSigningKey(t), sender: 0x6d616c6c6f7279}
		rings := []*keyclient.Ring{alice.ring, carol.ring, bob.ring}
		installRoster(t, 1, rings, alice, carol, bob, mallory)

		// One message of alice's that bob never receives (it is not
		// subscribed yet): its proof is one bob has never verified.
		pa, pc := r.app(alice.sc, uniq("pa")), r.app(carol.sc, uniq("pc"))
		must(t, pa.Publish("secure/a/early", 1, false, []byte("before bob listened")))
		waitFor(t, func() bool { return len(spy.all()) == 1 }, "the spy saw alice's first message")
		sub := r.app(bob.sc, uniq("sub"))
		must(t, sub.Subscribe("secure/#", 1))

		// Honest traffic, interleaved.
		var wantA, wantC []string
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); wantA = burst(t, pa, "a", 300) }()
		go func() { defer wg.Done(); wantC = burst(t, pc, "c", 300) }()
		wg.Wait()
		got := receive(t, sub, 600)
		var gotA, gotC []string
		for _, g := range got {
			if g[len("secure/")] == 'a' {
				gotA = append(gotA, g)
			} else {
				gotC = append(gotC, g)
			}
		}
		if !slices.Equal(gotA, wantA) || !slices.Equal(gotC, wantC) {
			t.Fatalf("honest traffic: got %d from alice and %d from carol, not what they sent in order", len(gotA), len(gotC))
		}

		// Every envelope on the wire carries a proof; session mode
		// batches what queued up.
		sizes := map[uint16]int{}
		var captured spied // alice's first envelope, for later
		honest := spy.all()
		for _, s := range honest {
			h, err := envelope.ParseHeader(s.payload)
			must(t, err)
			_, p, ok, err := envelope.SplitProof(s.payload)
			if err != nil || !ok {
				t.Fatalf("an envelope on the wire without a proof (flags %s): %v", h.Flags, err)
			}
			sizes[p.Size]++
			if h.Sender == alice.sender && captured.payload == nil && s.topic == "secure/a/early" {
				captured = s
			}
		}
		largest := uint16(0)
		for s := range sizes {
			largest = max(largest, s)
		}
		t.Logf("%s mode: batch sizes seen on the wire: %v", mode, sizes)
		if mode == proxy.ModeSession && largest < 2 {
			t.Errorf("session mode proved every message alone in a burst of 600: %v", sizes)
		}

		// Mallory, a member of the group, speaks to the broker directly.
		evil, err := mqtttest.Connect(m.URL(), uniq("mallory"), mqtttest.AppOptions{})
		must(t, err)
		defer evil.Close()
		key := r.key
		seal := func(sender uint64, topic string, plain []byte) []byte {
			s, err := envelope.NewSealer("demo", keyclient.StaticEpoch, &key, sender)
			must(t, err)
			env, err := s.SealSeq(nil, topic, envelope.FlagProof, 1<<40+uint64(mrand.IntN(1<<20)), plain)
			must(t, err)
			return env
		}
		prove := func(signer ed25519.PrivateKey, topic string, env []byte) []byte {
			items := []envelope.BatchItem{{Topic: topic, Env: env}}
			must(t, envelope.ProveBatch("demo", edSigner(signer), items))
			return items[0].Env
		}

		// As itself, Mallory is heard: it is a member.
		must(t, evil.Publish("secure/m", 1, false, prove(mallory.priv, "secure/m", seal(mallory.sender, "secure/m", []byte("mallory here")))))
		expect(t, sub, "secure/m", "mallory here")

		proper, aliceProof, _, err := envelope.SplitProof(captured.payload)
		must(t, err)
		opener := envelope.NewOpener(bob.ring, 1)
		_, plain, err := opener.Open(nil, "demo", captured.topic, captured.payload)
		must(t, err)
		own := seal(mallory.sender, captured.topic, []byte("open the valve"))
		asAlice := seal(alice.sender, "secure/valve", []byte("open the valve"))

		cases := []struct {
			name, topic string
			payload     []byte
			reason      string
		}{
			{"sealed under another member's sender id", "secure/valve", prove(mallory.priv, "secure/valve", asAlice), proxy.DropSenderAuth},
			{"another member's envelope signed again", captured.topic, prove(mallory.priv, captured.topic, slices.Clone(proper)), proxy.DropSenderAuth},
			{"another member's batch proof on its own envelope", captured.topic, aliceProof.AppendTo(slices.Clone(own)), proxy.DropSenderAuth},
			{"another member's proof on an envelope in its name", "secure/valve", aliceProof.AppendTo(slices.Clone(asAlice)), proxy.DropSenderAuth},
			{"another member's message sealed again for another topic", "secure/valve", aliceProof.AppendTo(seal(alice.sender, "secure/valve", plain)), proxy.DropSenderAuth},
			{"a proved message moved to another topic by the broker", "secure/valve", captured.payload, proxy.DropAuth},
			{"without a proof", "secure/valve", func() []byte {
				s, err := envelope.NewSealer("demo", keyclient.StaticEpoch, &key, mallory.sender)
				must(t, err)
				env, err := s.SealSeq(nil, "secure/valve", 0, 1<<41, []byte("open the valve"))
				must(t, err)
				return env
			}(), proxy.DropSenderAuth},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				before := bob.sc.DropCounts()["in/"+c.reason]
				must(t, evil.Publish(c.topic, 1, false, c.payload))
				waitFor(t, func() bool { return bob.sc.DropCounts()["in/"+c.reason] == before+1 }, "drop counted as %s (counts %v)", c.reason, bob.sc.DropCounts())
				expectNone(t, sub, 50*time.Millisecond)
			})
		}

		t.Run("revoked member", func(t *testing.T) {
			installRoster(t, 2, rings, alice, carol, bob)
			before := bob.sc.DropCounts()["in/"+proxy.DropSenderAuth]
			env := prove(mallory.priv, "secure/m", seal(mallory.sender, "secure/m", []byte("still here")))
			must(t, evil.Publish("secure/m", 1, false, env))
			waitFor(t, func() bool { return bob.sc.DropCounts()["in/"+proxy.DropSenderAuth] == before+1 }, "drop counted")
			expectNone(t, sub, 50*time.Millisecond)
			// An older roster does not bring it back.
			if err := bob.ring.InstallRoster("demo", 1, map[uint64]ed25519.PublicKey{mallory.sender: mallory.priv.Public().(ed25519.PublicKey)}); err == nil {
				t.Fatal("the ring installed an older roster")
			}
			must(t, pa.Publish("secure/a/x", 1, false, []byte("still heard")))
			expect(t, sub, "secure/a/x", "still heard")
		})

		t.Run("a batch reordered and partly lost", func(t *testing.T) {
			// What alice sent, given to a receiver that never saw it: in
			// another order, one of its envelopes missing.
			var batch []spied
			for _, s := range honest {
				h, _ := envelope.ParseHeader(s.payload)
				if h.Sender != alice.sender {
					continue
				}
				_, p, _, _ := envelope.SplitProof(s.payload)
				if p.Size == largestBatch(honest, alice.sender) {
					batch = append(batch, s)
				}
			}
			if len(batch) < 1 {
				t.Fatal("no batch of alice's captured")
			}
			dave := r.senderAuthSidecar(uniq("dave"), "")
			installRoster(t, 3, append(rings, dave.ring), alice, carol, bob, dave)
			sub2 := r.app(dave.sc, uniq("sub2"))
			must(t, sub2.Subscribe("secure/#", 1))
			mrand.Shuffle(len(batch), func(i, j int) { batch[i], batch[j] = batch[j], batch[i] })
			if len(batch) > 1 {
				batch = batch[1:]
			}
			var want []string
			for _, s := range batch {
				_, plain, err := opener.Open(nil, "demo", s.topic, s.payload)
				must(t, err)
				want = append(want, s.topic+" "+string(plain))
				must(t, evil.Publish(s.topic, 1, false, s.payload))
			}
			got := receive(t, sub2, len(want))
			sort.Strings(got)
			sort.Strings(want)
			if !slices.Equal(got, want) {
				t.Fatalf("got %q, want %q", got, want)
			}
			if n := dave.sc.DropCounts()["in/"+proxy.DropSenderAuth]; n != 0 {
				t.Fatalf("%d honest envelopes dropped", n)
			}
		})
	})
}

// largestBatch is the size of the largest batch of sender's among msgs.
func largestBatch(msgs []spied, sender uint64) uint16 {
	var n uint16
	for _, s := range msgs {
		h, err := envelope.ParseHeader(s.payload)
		if err != nil || h.Sender != sender {
			continue
		}
		_, p, _, _ := envelope.SplitProof(s.payload)
		n = max(n, p.Size)
	}
	return n
}
