package main

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/internal/mosquitto"
	"github.com/smqtt/smqtt/internal/mqttc"
)

// killRig is a Mosquitto upstream and two sidecar processes in session mode
// (A for the publisher, B for the subscriber) sharing a static group key,
// each on a fixed port so that apps reconnect to it after a restart.
type killRig struct {
	t      *testing.T
	dir    string
	up     *mosquitto.Broker
	addr   map[string]string // sidecar name -> its listen address
	side   map[string]*sidecarProcess
	sideMu sync.Mutex
}

func newKillRig(t *testing.T) *killRig {
	t.Helper()
	up := startMosquitto(t)
	dir := t.TempDir()
	if r := smqtt(t, dir, "keygen", "--group", "-o", "demo.key"); r.code != 0 {
		t.Fatalf("keygen --group: %s", r.stderr)
	}
	k := &killRig{t: t, dir: dir, up: up, addr: map[string]string{}, side: map[string]*sidecarProcess{}}
	for _, name := range []string{"a", "b"} {
		k.addr[name] = freeAddr(t)
		cfg := fmt.Sprintf(`
sidecar:
  mode: session
  listen: ["tcp://%s"]
  upstream: {url: %q, client_id: sidecar-%s}
  protect:
    - {topics: ["secure/#"], group: demo}
  static_keys: {demo: demo.key}
  data_dir: data-%s
  queue: {sync: batch}
`, k.addr[name], up.URL(), name, name)
		if err := os.WriteFile(filepath.Join(dir, name+".yaml"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		k.start(name)
	}
	return k
}

// startMosquitto starts a Mosquitto broker for the test, or skips the test
// when Mosquitto is not installed.
func startMosquitto(t *testing.T) *mosquitto.Broker {
	t.Helper()
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed")
	}
	up, err := mosquitto.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	return up
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// start starts sidecar name and waits until it listens.
func (k *killRig) start(name string) {
	k.t.Helper()
	p := startSidecar(k.t, k.dir, name+".yaml")
	p.logged(k.t, "listening for local apps", "addr")
	k.sideMu.Lock()
	k.side[name] = p
	k.sideMu.Unlock()
}

// startAsync starts sidecar name from a goroutine other than the test's.
func (k *killRig) startAsync(name string) {
	p := startSidecar(k.t, k.dir, name+".yaml")
	k.sideMu.Lock()
	k.side[name] = p
	k.sideMu.Unlock()
}

// kill SIGKILLs sidecar name: no shutdown code runs, the kernel closes its
// connections.
func (k *killRig) kill(name string) {
	k.t.Helper()
	k.sideMu.Lock()
	p := k.side[name]
	k.sideMu.Unlock()
	if err := p.cmd.Process.Kill(); err != nil {
		k.t.Fatal(err)
	}
	<-p.done
}

// app connects a paho client to sidecar name, as an unmodified app that
// keeps a persistent session and reconnects by itself.
func (k *killRig) app(name, id string, onMessage paho.MessageHandler) paho.Client {
	k.t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + k.addr[name]).SetClientID(id).
		SetCleanSession(false).SetAutoReconnect(true).SetConnectRetry(true).
		SetConnectRetryInterval(50 * time.Millisecond).SetMaxReconnectInterval(100 * time.Millisecond).
		SetConnectTimeout(2 * time.Second).SetOrderMatters(false).SetKeepAlive(5 * time.Second).
		SetDefaultPublishHandler(onMessage)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		k.t.Fatalf("app %s on sidecar %s: %v", id, name, tok.Error())
	}
	k.t.Cleanup(func() { c.Disconnect(50) })
	return c
}

// TestSessionModeLosesNothingWhenASidecarIsKilled: a QoS 1 stream of 20,000
// messages at about 2,000 a second from an app on sidecar A to a
// persistent-session app on sidecar B, while one of the sidecars is
// SIGKILLed at five random points and started again. Every message
// arrives (QoS 1 may duplicate), and a witness on the broker sees only
// ciphertext.
func TestSessionModeLosesNothingWhenASidecarIsKilled(t *testing.T) {
	for _, victim := range []string{"b", "a"} {
		t.Run("kill "+map[string]string{"a": "the sending sidecar", "b": "the receiving sidecar"}[victim], func(t *testing.T) {
			killStream(t, victim, 20000, 1, 5)
		})
	}
}

// TestSessionModeQoS2ExactlyOnceWhenASidecarIsKilled: the same at QoS 2,
// with a subscriber that keeps its session state across reconnects as MQTT
// requires (the packet ids it acknowledged with PUBREC and awaits PUBREL
// for): every message exactly once.
func TestSessionModeQoS2ExactlyOnceWhenASidecarIsKilled(t *testing.T) {
	for _, victim := range []string{"b", "a"} {
		t.Run("kill "+map[string]string{"a": "the sending sidecar", "b": "the receiving sidecar"}[victim], func(t *testing.T) {
			killStream(t, victim, 20000, 2, 5)
		})
	}
}

// qos2Subscriber is an app that subscribes once with a persistent session
// and reconnects whenever its connection ends, carrying its session state
// over; it calls onMessage for every PUBLISH it takes.
func (k *killRig) qos2Subscriber(name, id, filter string, onMessage func(payload []byte)) {
	k.t.Helper()
	o := mqttc.Options{ClientID: id, Clean: false, Keepalive: 5, DialTimeout: 2 * time.Second}
	c, _, err := mqttc.Connect(k.addr[name], o)
	if err != nil || c == nil {
		k.t.Fatalf("subscriber: %v", err)
	}
	if _, err := c.Subscribe(packets.Properties{}, packets.Subscription{Filter: filter, Qos: 2}); err != nil {
		k.t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	k.t.Cleanup(func() { close(stop); <-done })
	go func() {
		defer close(done)
		for {
			for {
				pk, ok := c.Next(50 * time.Millisecond)
				if !ok {
					break
				}
				onMessage(pk.Payload)
			}
			select {
			case <-stop:
				c.Close()
				return
			case <-c.Done():
				for _, pk := range drainAll(c) {
					onMessage(pk.Payload)
				}
				o.Session = c.Session()
				for {
					nc, ack, err := mqttc.Connect(k.addr[name], o)
					if err == nil && nc != nil && ack.SessionPresent {
						c = nc
						break
					}
					select {
					case <-stop:
						return
					case <-time.After(50 * time.Millisecond):
					}
				}
			default:
			}
		}
	}()
}

func drainAll(c *mqttc.Client) []packets.Packet {
	var out []packets.Packet
	for {
		pk, ok := c.Next(0)
		if !ok {
			return out
		}
		out = append(out, pk)
	}
}

const plainMark = "PLAINTEXT-MARK-"

func killStream(t *testing.T, victim string, n int, qos byte, kills int) {
	k := newKillRig(t)
	var (
		mu   sync.Mutex
		seen = make([]int, n)
		got  atomic.Int64
	)
	count := func(payload []byte) {
		i, err := strconv.Atoi(strings.TrimPrefix(string(payload), plainMark))
		if err != nil || i < 0 || i >= n {
			t.Errorf("garbled payload %q", payload)
			return
		}
		mu.Lock()
		if seen[i] == 0 {
			got.Add(1)
		}
		seen[i]++
		mu.Unlock()
	}
	if qos == 2 {
		k.qos2Subscriber("b", "subscriber", "secure/stream", count)
	} else {
		k.app("b", "subscriber", func(_ paho.Client, m paho.Message) { count(m.Payload()) }).Subscribe("secure/stream", qos, nil).Wait()
	}

	// A witness on the broker itself: every payload must be an envelope.
	var leaked, witnessed atomic.Int64
	witness := paho.NewClient(paho.NewClientOptions().AddBroker(k.up.URL()).SetClientID("witness").
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
			witnessed.Add(1)
			if bytes.Contains(m.Payload(), []byte(plainMark)) {
				leaked.Add(1)
			}
		}))
	if tok := witness.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	defer witness.Disconnect(50)
	witness.Subscribe("secure/#", 0, nil).Wait()

	// QoS 1: paho, a common client. QoS 2: a client that keeps its
	// session's outbound state across reconnects as MQTT requires (paho
	// does not: it can send a PUBLISH again after its PUBREC, which a
	// broker takes for a new message, with or without smqtt).
	var publish func(i int) paho.Token
	var q2 *mqttc.Publisher
	if qos == 2 {
		var err error
		if q2, err = mqttc.NewPublisher(k.addr["a"], mqttc.Options{ClientID: "publisher", Keepalive: 5, DialTimeout: 2 * time.Second}, 1000); err != nil {
			t.Fatal(err)
		}
		defer q2.Close()
		publish = func(i int) paho.Token {
			if err := q2.Publish(packets.Packet{FixedHeader: packets.FixedHeader{Qos: 2}, TopicName: "secure/stream", Payload: []byte(plainMark + strconv.Itoa(i))}); err != nil {
				t.Error(err)
			}
			return nil
		}
	} else {
		pub := k.app("a", "publisher", nil)
		publish = func(i int) paho.Token { return pub.Publish("secure/stream", qos, false, plainMark+strconv.Itoa(i)) }
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	// Kill points at random, one in the middle half of each of kills
	// equal stretches of the stream.
	killAt := map[int]bool{}
	seg := n * 9 / 10 / kills
	for k := range kills {
		killAt[n/20+k*seg+seg/4+rng.IntN(seg/2)] = true
	}
	start := time.Now()
	var toks []paho.Token
	restarted := make(chan struct{}, 1)
	restarted <- struct{}{}
	for i := range n {
		if tok := publish(i); tok != nil {
			toks = append(toks, tok)
		}
		if killAt[i] {
			<-restarted
			down := time.Duration(200+rng.IntN(800)) * time.Millisecond
			t.Logf("message %d: SIGKILL sidecar %s, down %v", i, victim, down)
			k.kill(victim)
			time.AfterFunc(down, func() {
				k.startAsync(victim)
				restarted <- struct{}{}
			})
		}
		// about 2,000 messages a second
		if ahead := time.Until(start.Add(time.Duration(i) * time.Second / 2000)); ahead > 0 {
			time.Sleep(ahead)
		}
	}
	<-restarted
	for i, tok := range toks {
		if !tok.WaitTimeout(60 * time.Second) {
			t.Fatalf("publish %d never acknowledged", i)
		}
	}
	if q2 != nil && !q2.Wait(60*time.Second) {
		t.Fatal("QoS 2 publishes never acknowledged")
	}
	deadline := time.Now().Add(60 * time.Second)
	for got.Load() < int64(n) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // late duplicates
	mu.Lock()
	defer mu.Unlock()
	var lost, duped []int
	dups := 0
	for i, c := range seen {
		if c == 0 {
			lost = append(lost, i)
		}
		if c > 1 {
			duped = append(duped, i)
		}
		dups += max(c-1, 0)
	}
	if len(duped) > 0 {
		t.Logf("duplicated: %v", duped[:min(len(duped), 40)])
	}
	t.Logf("%d messages, QoS %d, %d kills of sidecar %s: lost %d, duplicated %d; the witness saw %d envelopes, %d in clear",
		n, qos, kills, victim, len(lost), dups, witnessed.Load(), leaked.Load())
	if len(lost) > 0 {
		t.Errorf("lost %d messages, the first %v", len(lost), lost[:min(len(lost), 20)])
	}
	if qos == 2 && dups > 0 {
		t.Errorf("%d duplicates at QoS 2", dups)
	}
	if leaked.Load() > 0 {
		t.Errorf("%d messages crossed the broker in clear", leaked.Load())
	}
	if witnessed.Load() == 0 {
		t.Error("the witness saw nothing: it proves nothing")
	}
}

// TestWillFiresWhenTheSendingSidecarIsKilled: an app on sidecar A has a
// Will on a protected topic; A is SIGKILLed (the app's connection and A's
// upstream connection drop, no DISCONNECT). The broker publishes the Will,
// which a subscriber behind sidecar B reads in clear, while the broker saw
// only its envelope.
func TestWillFiresWhenTheSendingSidecarIsKilled(t *testing.T) {
	k := newKillRig(t)
	wills := make(chan paho.Message, 10)
	k.app("b", "watcher", func(_ paho.Client, m paho.Message) { wills <- m }).Subscribe("secure/presence/+", 1, nil).Wait()
	spy := make(chan []byte, 10)
	witness := paho.NewClient(paho.NewClientOptions().AddBroker(k.up.URL()).SetClientID("witness").
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { spy <- m.Payload() }))
	if tok := witness.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	defer witness.Disconnect(50)
	witness.Subscribe("secure/presence/+", 1, nil).Wait()

	o := paho.NewClientOptions().AddBroker("tcp://"+k.addr["a"]).SetClientID("device-7").
		SetWill("secure/presence/device-7", plainMark+"device-7 went away", 1, false).SetAutoReconnect(false)
	dev := paho.NewClient(o)
	if tok := dev.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	select {
	case m := <-wills:
		t.Fatalf("a Will before anything died: %q", m.Payload())
	case <-time.After(200 * time.Millisecond):
	}
	killed := time.Now()
	k.kill("a")
	select {
	case m := <-wills:
		if string(m.Payload()) != plainMark+"device-7 went away" || m.Topic() != "secure/presence/device-7" {
			t.Fatalf("got %s %q", m.Topic(), m.Payload())
		}
		t.Logf("the Will reached the subscriber behind sidecar B %v after sidecar A was killed", time.Since(killed).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("no Will 10 s after the sidecar was killed")
	}
	select {
	case p := <-spy:
		if bytes.Contains(p, []byte(plainMark)) {
			t.Fatalf("the broker saw the Will in clear: %q", p)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the witness on the broker saw no Will")
	}
}
