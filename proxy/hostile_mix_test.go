package proxy_test

import (
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
)

// mixer is a hostile upstream that does everything at once to one stream
// of protected messages: for each message it draws (seeded) whether to pass
// it, delay it, hold it back behind the next one, duplicate it, replay an
// older one next to it, or send a truncated, corrupted or re-topiced copy
// (to another topic of the same group, or to a topic of another group) and
// then pass or drop the original. It keeps the books the test checks the
// receiving sidecar against: which messages must arrive, and how many
// tampered copies it sent for each drop reason.
type mixer struct {
	mqtt.HookBase
	server func() *mqtt.Server
	topic  string             // the stream's topic
	keys   envelope.KeyLookup // to read which message is which

	mu       sync.Mutex
	rng      *rand.Rand
	n        int            // genuine messages seen
	held     []heldCopy     // to deliver once a later message has gone
	passed   [][]byte       // envelopes delivered as they came: replay material
	arrives  map[int]bool   // message index -> its genuine envelope reaches the receiver
	tampered map[string]int // drop reason -> tampered or replayed copies sent
	did      map[string]int // action -> messages, for the log
	delays   sync.WaitGroup
}

type heldCopy struct {
	after   int // deliver after the genuine message with this number
	payload []byte
}

// Where a corruption lands decides how the receiver must classify it.
var corruptions = []struct {
	name   string
	first  int // byte range of the envelope, end 0: to the end
	end    int
	reason string
}{
	{"version", 0, 1, proxy.DropVersion},
	{"flags", 1, 2, proxy.DropMalformed}, // a reserved bit or reseal without retain; a valid flag: auth
	{"epoch", 2, 6, proxy.DropUnknownKey},
	{"sender", 6, 14, proxy.DropAuth},
	{"sequence high bytes", 14, 20, proxy.DropAuth}, // never down to 0
	{"ciphertext or tag", envelope.HeaderLen, 0, proxy.DropAuth},
}

func (m *mixer) ID() string { return "mixer" }
func (m *mixer) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnPublished
}

// OnPublish decides a genuine message's fate. Copies sent before the
// original reaches the receiver prove that a copy failing to open does not
// move the replay window.
func (m *mixer) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || pk.TopicName != m.topic {
		return pk, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.n++
	idx := m.index(pk.Payload)
	env := pk.Payload
	var inject []injection
	pass := true
	action := m.pick()
	m.did[action]++
	switch action {
	case "pass":
	case "delay":
		pass = false
		m.delays.Add(1)
		time.AfterFunc(time.Duration(5+m.rng.IntN(150))*time.Millisecond, func() {
			defer m.delays.Done()
			m.server().Publish(m.topic, env, false, 1)
		})
	case "reorder":
		pass = false
		m.held = append(m.held, heldCopy{after: m.n, payload: env})
	case "duplicate":
		m.held = append(m.held, heldCopy{after: m.n, payload: env})
		m.tampered[proxy.DropReplay]++
	case "replay":
		if len(m.passed) == 0 {
			m.did[action]--
			m.did["pass"]++
			break
		}
		inject = append(inject, injection{m.topic, m.passed[m.rng.IntN(len(m.passed))]})
		m.tampered[proxy.DropReplay]++
	default: // a tampered copy, then the original or nothing
		forged, topic, reason := m.tamper(action, env)
		inject = append(inject, injection{topic, forged})
		m.tampered[reason]++
		pass = m.rng.IntN(2) == 0
	}
	if action != "delay" && action != "reorder" {
		m.arrives[idx] = pass
	} else {
		m.arrives[idx] = true
	}
	if pass {
		m.passed = append(m.passed, env)
	}
	for _, in := range inject {
		m.server().Publish(in.topic, in.payload, false, 1)
	}
	if !pass {
		return pk, packets.CodeSuccessIgnore // acknowledged, delivered to no one
	}
	return pk, nil
}

type injection struct {
	topic   string
	payload []byte
}

// OnPublished delivers the copies held back behind earlier messages.
func (m *mixer) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline || pk.TopicName != m.topic {
		return
	}
	m.mu.Lock()
	var due [][]byte
	keep := m.held[:0]
	for _, h := range m.held {
		if h.after < m.n {
			due = append(due, h.payload)
		} else {
			keep = append(keep, h)
		}
	}
	m.held = keep
	m.mu.Unlock()
	for _, p := range due {
		m.server().Publish(m.topic, p, false, 1)
	}
}

// flush delivers whatever is still held or delayed.
func (m *mixer) flush() {
	m.mu.Lock()
	held := m.held
	m.held = nil
	m.mu.Unlock()
	for _, h := range held {
		m.server().Publish(m.topic, h.payload, false, 1)
	}
	m.delays.Wait()
}

var mixerActions = []struct {
	name   string
	weight int
}{
	{"pass", 40}, {"delay", 10}, {"reorder", 8}, {"duplicate", 8}, {"replay", 8},
	{"truncate", 6}, {"corrupt", 8}, {"move within group", 6}, {"move to another group", 6},
}

func (m *mixer) pick() string {
	total := 0
	for _, a := range mixerActions {
		total += a.weight
	}
	r := m.rng.IntN(total)
	for _, a := range mixerActions {
		if r < a.weight {
			return a.name
		}
		r -= a.weight
	}
	panic("unreachable")
}

// tamper returns the tampered copy of env, the topic it goes to, and the
// reason the receiver must drop it for.
func (m *mixer) tamper(action string, env []byte) ([]byte, string, string) {
	c := append([]byte(nil), env...)
	switch action {
	case "truncate":
		c = c[:m.rng.IntN(len(c))]
		if len(c) < envelope.Overhead {
			return c, m.topic, proxy.DropMalformed
		}
		return c, m.topic, proxy.DropAuth
	case "corrupt":
		where := corruptions[m.rng.IntN(len(corruptions))]
		end := where.end
		if end == 0 {
			end = len(c)
		}
		bit := byte(1) << m.rng.IntN(8)
		if where.name == "flags" {
			bit = byte(1) << (1 + m.rng.IntN(7))
		}
		c[where.first+m.rng.IntN(end-where.first)] ^= bit
		m.did["corrupt "+where.name]++
		if where.name == "flags" && envelope.Flags(c[1]).Valid() {
			return c, m.topic, proxy.DropAuth // will or props set: the AEAD check fails
		}
		return c, m.topic, where.reason
	case "move within group":
		return c, "secure/elsewhere", proxy.DropAuth
	case "move to another group":
		return c, "other/mix", proxy.DropAuth
	}
	panic("unknown action " + action)
}

// index reads which message of the stream env is ("m-<i>").
func (m *mixer) index(env []byte) int {
	_, plain, err := envelope.NewOpener(m.keys, 1).Open(nil, "demo", m.topic, env)
	if err != nil {
		return -1
	}
	i, err := strconv.Atoi(strings.TrimPrefix(string(plain), "m-"))
	if err != nil {
		return -1
	}
	return i
}

// TestHostileBrokerMixesEveryTamperingInOneStream: in one stream of 300
// protected QoS 1 messages the broker delays, reorders, duplicates,
// replays, truncates, corrupts and re-topics messages (to another topic of
// the group and to another group whose key has the same bytes), at random.
// The receiving application gets exactly the genuine messages the broker
// let through, on their own topic, each once; every copy the broker made
// is dropped and counted under its reason.
func TestHostileBrokerMixesEveryTamperingInOneStream(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		const (
			n    = 300
			seed = 20260601
		)
		var up *embedded.Broker
		mix := &mixer{
			server: func() *mqtt.Server { return up.Server() }, topic: "secure/mix",
			rng:     rand.New(rand.NewPCG(seed, seed)),
			arrives: map[int]bool{}, tampered: map[string]int{}, did: map[string]int{},
		}
		up, err := embedded.Start(embedded.Options{Hooks: []mqtt.Hook{mix}})
		must(t, err)
		t.Cleanup(func() { up.Close() })
		r := newModeRig(t, mode, up)
		ring := keyclient.NewRing()
		must(t, ring.AddStatic("demo", r.key))
		mix.mu.Lock()
		mix.keys = ring
		mix.mu.Unlock()

		// The receiver also protects other/# for a group "other" whose key has
		// the same bytes: only the group's binding in the envelope tells them
		// apart.
		otherGroup := func(o *proxy.Options) {
			o.Rules = append(slices.Clone(o.Rules), proxy.Rule{Filters: []string{"other/#"}, Group: "other"})
			must(t, o.Keys.(*keyclient.Ring).AddStatic("other", r.key))
		}
		a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "", otherGroup)
		pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/#", 1))
		must(t, sub.Subscribe("other/#", 1))

		for i := range n {
			must(t, pub.Publish(mix.topic, 1, false, []byte("m-"+strconv.Itoa(i))))
		}
		waitFor(t, func() bool { return a.QueueLen() == 0 }, "the stream reaches the broker")
		mix.flush()

		mix.mu.Lock()
		arrives, tampered, did := maps.Clone(mix.arrives), maps.Clone(mix.tampered), maps.Clone(mix.did)
		mix.mu.Unlock()
		if len(arrives) != n {
			t.Fatalf("the broker saw %d messages of the stream, want %d (index -1: unreadable)", len(arrives), n)
		}
		want := 0
		for _, ok := range arrives {
			if ok {
				want++
			}
		}
		t.Logf("seed %d: %d messages, %d let through; actions %v; tampered copies by drop reason %v", seed, n, want, did, tampered)

		got := map[int]bool{}
		for range want {
			msg, ok := sub.Next(5 * time.Second)
			if !ok {
				t.Fatalf("%d of %d messages delivered, then nothing", len(got), want)
			}
			i, err := strconv.Atoi(strings.TrimPrefix(string(msg.Payload), "m-"))
			switch {
			case msg.Topic != mix.topic || err != nil || string(msg.Payload) != "m-"+strconv.Itoa(i):
				t.Fatalf("delivered %s %q: not a message published on %s", msg.Topic, msg.Payload, mix.topic)
			case got[i]:
				t.Fatalf("message %d delivered twice", i)
			case !arrives[i]:
				t.Fatalf("message %d delivered, but the broker only sent tampered copies of it", i)
			}
			got[i] = true
		}
		expectNone(t, sub, 300*time.Millisecond)

		wantDrops := map[string]int{}
		for reason, c := range tampered {
			wantDrops["in/"+reason] = c
		}
		inDrops := func() map[string]int {
			out := map[string]int{}
			for k, v := range b.DropCounts() {
				if strings.HasPrefix(k, "in/") && v > 0 {
					out[k] = v
				}
			}
			return out
		}
		waitFor(t, func() bool { return maps.Equal(inDrops(), wantDrops) }, "drops counted by reason: %v, want %v", inDrops(), wantDrops)
		t.Logf("receiver's drop counters: %v", inDrops())
		for k, v := range a.DropCounts() {
			if v > 0 {
				t.Errorf("the publishing sidecar dropped %d messages (%s)", v, k)
			}
		}
		// the seed exercised every kind of tampering
		for _, act := range mixerActions {
			if did[act.name] == 0 {
				t.Errorf("the broker never did %q: the run proves nothing about it", act.name)
			}
		}
		for _, c := range corruptions {
			if did["corrupt "+c.name] == 0 {
				t.Errorf("no corruption of the %s: the run proves nothing about it", c.name)
			}
		}
	})
}
