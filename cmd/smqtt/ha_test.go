package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/etcdtest"
	"github.com/smqtt/smqtt/internal/mosquitto"
)

// haRig is three key server processes sharing one identity, one etcd
// prefix and one Mosquitto, two sidecar processes in a group of scheme
// update, and a witness on the broker that reads every key-server message:
// it checks signatures, opens what is sealed to the sidecars (the test holds
// their identities), and fails the test if one epoch ever travels with two
// keys or a group's heartbeat counter ever goes back.
type haRig struct {
	t      *testing.T
	dir    string
	up     *mosquitto.Broker
	etcd   *etcdtest.Cluster
	ks     []*sidecarProcess // key servers, by index
	ksCmd  []string          // their config files
	health []string          // their /healthz URLs
	side   map[string]*sidecarProcess
	addr   map[string]string

	mu       sync.Mutex
	keys     map[uint32][]byte // epoch -> key, as seen on the wire
	beats    []time.Time       // arrival of every heartbeat
	counter  uint64            // the last heartbeat counter
	problems []string
}

func newHARig(t *testing.T, etcdNodes int) *haRig {
	t.Helper()
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed")
	}
	etcdtest.Binary(t)
	dir := t.TempDir()
	up, err := mosquitto.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	h := &haRig{t: t, dir: dir, up: up, etcd: etcdtest.Start(t, etcdNodes), side: map[string]*sidecarProcess{}, addr: map[string]string{}, keys: map[uint32][]byte{}}
	for _, k := range []string{"keyserver", "sidecar-a", "sidecar-b"} {
		if r := smqtt(t, dir, "keygen", "--kem", "x25519", "-o", k+".key"); r.code != 0 {
			t.Fatalf("keygen: %s", r.stderr)
		}
	}
	eps := ""
	for i, ep := range h.etcd.Endpoints() {
		if i > 0 {
			eps += ", "
		}
		eps += strconv.Quote(ep)
	}
	for i := range 3 {
		metrics := freeAddr(t)
		cfg := fmt.Sprintf(`
keyserver:
  identity: keyserver.key
  kem: x25519
  upstream: {url: %q, client_id: keyserver}
  store:
    etcd: {endpoints: [%s], prefix: /smqtt-test/}
  metrics_listen: %s
  members:
    - {name: sidecar-a, public_key_file: sidecar-a.key.pub}
    - {name: sidecar-b, public_key_file: sidecar-b.key.pub}
  groups:
    - {name: demo, topics: ["secure/#"], scheme: update, members: [sidecar-a, sidecar-b], rekey_batch: 200ms}
`, up.URL(), eps, metrics)
		name := fmt.Sprintf("ks%d.yaml", i)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		h.ksCmd = append(h.ksCmd, name)
		h.health = append(h.health, "http://"+metrics+"/healthz")
		h.ks = append(h.ks, nil)
	}
	h.witness()
	for i := range h.ks {
		h.startKS(i)
	}
	for _, name := range []string{"a", "b"} {
		h.addr[name] = freeAddr(t)
		cfg := fmt.Sprintf(`
sidecar:
  identity: sidecar-%s.key
  mode: session
  listen: ["tcp://%s"]
  upstream: {url: %q, client_id: sidecar-%s}
  keyserver: {public_key_file: keyserver.key.pub}
  protect:
    - {topics: ["secure/#"], group: demo}
  data_dir: data-%s
`, name, h.addr[name], up.URL(), name, name)
		if err := os.WriteFile(filepath.Join(dir, name+".yaml"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		p := startSidecar(t, dir, name+".yaml")
		p.logged(t, "listening for local apps", "addr")
		h.side[name] = p
	}
	for _, p := range h.side {
		p.logged(t, "joined group", "group")
	}
	return h
}

func (h *haRig) startKS(i int) {
	h.ks[i] = startRole(h.t, h.dir, "keyserver", h.ksCmd[i])
}

// leader returns the index of the key server whose /healthz says it leads,
// waiting up to d.
func (h *haRig) leader(d time.Duration, not int) int {
	h.t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		for i, u := range h.health {
			if i == not {
				continue
			}
			if body := get(u); bytes.Contains(body, []byte("ok: leader")) {
				return i
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	h.t.Fatalf("no key server leads after %v", d)
	return -1
}

func get(u string) []byte {
	cl := http.Client{Timeout: time.Second}
	resp, err := cl.Get(u)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return b
}

// witness subscribes to every key-distribution message on the broker.
func (h *haRig) witness() {
	t := h.t
	ks, err := gkd.LoadPublicKey(filepath.Join(h.dir, "keyserver.key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	ids := map[[8]byte]*gkd.Identity{}
	for _, n := range []string{"sidecar-a", "sidecar-b"} {
		id, err := gkd.LoadIdentity(filepath.Join(h.dir, n+".key"))
		if err != nil {
			t.Fatal(err)
		}
		ids[id.Public().RawID()] = id
	}
	o := paho.NewClientOptions().AddBroker(h.up.URL()).SetClientID("witness").SetOrderMatters(true)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(50) })
	tok := c.Subscribe("smqtt/v1/#", 1, func(_ paho.Client, m paho.Message) {
		msg, err := gkd.Parse(m.Payload())
		if err != nil || msg.Verify(ks) != nil {
			return // members' requests, or not from the key server
		}
		now := time.Now()
		h.mu.Lock()
		defer h.mu.Unlock()
		switch msg.Type {
		case gkd.TypeHeartbeat:
			hb, err := gkd.ParseHeartbeat(msg.Body)
			if err != nil {
				return
			}
			if hb.Counter <= h.counter {
				h.problems = append(h.problems, fmt.Sprintf("heartbeat counter %d after %d", hb.Counter, h.counter))
			}
			h.counter = max(h.counter, hb.Counter)
			h.beats = append(h.beats, now)
		case gkd.TypeRekey, gkd.TypeJoinResponse:
			id := ids[msg.Recipient]
			if id == nil {
				return
			}
			body, err := id.OpenBody(msg)
			if err != nil {
				h.problems = append(h.problems, "a sealed message does not open: "+err.Error())
				return
			}
			var epoch uint32
			var key []byte
			if msg.Type == gkd.TypeRekey {
				r, err := gkd.ParseRekey(body)
				if err != nil {
					return
				}
				epoch, key = r.Epoch, r.Key[:]
			} else {
				r, err := gkd.ParseJoinResponse(body)
				if err != nil {
					return
				}
				epoch, key = r.Epoch, r.Key[:]
			}
			if old, ok := h.keys[epoch]; ok && !bytes.Equal(old, key) {
				h.problems = append(h.problems, fmt.Sprintf("epoch %d travelled with two keys", epoch))
			}
			h.keys[epoch] = slices.Clone(key)
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
}

// firstBeatAfter waits up to d for a heartbeat that arrived after t0.
func (h *haRig) firstBeatAfter(t0 time.Time, d time.Duration) time.Duration {
	h.t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		h.mu.Lock()
		for _, b := range h.beats {
			if b.After(t0) {
				h.mu.Unlock()
				return b.Sub(t0)
			}
		}
		h.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
	h.t.Fatalf("no heartbeat within %v", d)
	return 0
}

func (h *haRig) check() {
	h.t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, p := range h.problems {
		h.t.Error(p)
	}
	if len(h.keys) == 0 {
		h.t.Error("the witness saw no key")
	}
}

// streamQoS1 sends n QoS 1 messages from an app on A to an app on B, pause
// apart, and returns a function waiting for the stream to end that reports
// how many distinct messages B got.
func (h *haRig) streamQoS1(n int, pause time.Duration) func() int {
	var mu sync.Mutex
	got := map[string]bool{}
	sub := (&killRig{t: h.t, addr: h.addr}).app("b", "app-b", func(_ paho.Client, m paho.Message) {
		mu.Lock()
		got[string(m.Payload())] = true
		mu.Unlock()
	})
	if tok := sub.Subscribe("secure/s", 1, nil); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		h.t.Fatal(tok.Error())
	}
	pub := (&killRig{t: h.t, addr: h.addr}).app("a", "app-a", nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range n {
			pub.Publish("secure/s", 1, false, strconv.Itoa(i)).WaitTimeout(30 * time.Second)
			time.Sleep(pause)
		}
	}()
	return func() int {
		defer func() {
			var missing []int
			for i := range n {
				if !got[strconv.Itoa(i)] {
					missing = append(missing, i)
				}
			}
			if len(missing) > 0 {
				h.t.Logf("missing: %v", missing)
			}
		}()
		<-done
		deadline := time.Now().Add(60 * time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			k := len(got)
			mu.Unlock()
			if k == n {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		mu.Lock()
		defer mu.Unlock()
		return len(got)
	}
}

// TestKeyServerFailover: three key servers on etcd; the leader is
// SIGKILLed, then SIGSTOPped past its lease and resumed, while sidecars
// stream QoS 1 traffic. Nothing is lost, a new leader heartbeats within the
// goal, no epoch ever travels with two keys, and heartbeat counters never
// go back (the resumed ex-leader publishes nothing).
func TestKeyServerFailover(t *testing.T) {
	h := newHARig(t, 1)
	first := h.leader(20*time.Second, -1)
	// the second join's rekey activates after rekey_lead: from then on
	// both sidecars seal and open under one epoch
	time.Sleep(4 * time.Second)
	wait := h.streamQoS1(300, 50*time.Millisecond)
	time.Sleep(2 * time.Second)

	// (a) SIGKILL
	t0 := time.Now()
	h.ks[first].cmd.Process.Signal(syscall.SIGKILL)
	<-h.ks[first].done
	took := h.firstBeatAfter(t0, 20*time.Second)
	second := h.leader(10*time.Second, first)
	t.Logf("SIGKILL: the new leader's first heartbeat %v after the kill", took)
	h.startKS(first)

	// (b) SIGSTOP past the lease, then SIGCONT
	h.ks[second].cmd.Process.Signal(syscall.SIGSTOP)
	t1 := time.Now()
	took = h.firstBeatAfter(t1, 20*time.Second)
	third := h.leader(10*time.Second, second)
	t.Logf("SIGSTOP: the new leader (ks%d) heartbeats %v after the stop", third, took)
	time.Sleep(2 * time.Second)
	h.ks[second].cmd.Process.Signal(syscall.SIGCONT)
	h.ks[second].logged(t, "key server leader: this instance no longer leads", "reason")

	if got := wait(); got != 300 {
		t.Errorf("B got %d of 300 messages", got)
	}
	h.check()
}

// startRole starts `smqtt ROLE -c config` with JSON logs.
func startRole(t *testing.T, dir, role, config string) *sidecarProcess {
	t.Helper()
	p := &sidecarProcess{done: make(chan struct{}), news: make(chan struct{}, 1)}
	p.cmd = exec.Command(smqttBin, role, "-c", config, "--log-format", "json")
	p.cmd.Dir = dir
	return p.run(t)
}
