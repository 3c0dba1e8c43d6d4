package proxy_test

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

// A sidecar that must really die runs in a process of its own: the test
// binary started again to run TestKilledSidecarChild, which reads its
// configuration from the environment and serves until it is killed.

const childSidecarEnv = "SMQTT_TEST_CHILD_SIDECAR"

type childSidecarConfig struct {
	Listen   string // tcp://127.0.0.1:port, the same across restarts
	Upstream string
	ClientID string
	DataDir  string
	Key      string // the rig's group key, hex
}

// TestKilledSidecarChild is the child process's body; run by itself it
// does nothing.
func TestKilledSidecarChild(t *testing.T) {
	raw := os.Getenv(childSidecarEnv)
	if raw == "" {
		t.Skip("the sidecar process of TestSIGKILLedSidecarKeepsPersistentSessions; not a test by itself")
	}
	var c childSidecarConfig
	must(t, json.Unmarshal([]byte(raw), &c))
	keyBytes, err := hex.DecodeString(c.Key)
	must(t, err)
	var key envelope.GroupKey
	copy(key[:], keyBytes)
	ring := keyclient.NewRing()
	must(t, ring.AddStatic("demo", key))
	sc, err := proxy.New(proxy.Options{
		Mode:     proxy.ModeBridge,
		Listen:   []string{c.Listen},
		Upstream: proxy.UpstreamOptions{URL: c.Upstream, ClientID: c.ClientID, MaxReconnectInterval: 200 * time.Millisecond},
		Rules:    testRules,
		Keys:     ring,
		DataDir:  c.DataDir,
		Queue:    queue.Options{Sync: queue.SyncBatch},
		Logger:   slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	must(t, err)
	must(t, sc.Start())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	must(t, sc.WaitConnected(ctx)) // a SUBACK before then would not be mirrored upstream yet
	fmt.Println("ready")
	select {} // until SIGKILL: no Close, nothing written on the way out
}

// childSidecar is one run of the sidecar process.
type childSidecar struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// startChildSidecar starts the sidecar process and waits until it serves.
// The process is killed when the test ends, if it is still running.
func startChildSidecar(t *testing.T, c childSidecarConfig, logPath string) (*childSidecar, error) {
	raw, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestKilledSidecarChild$", "-test.timeout=0")
	cmd.Env = append(os.Environ(), childSidecarEnv+"="+string(raw))
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		logf.Close()
		return nil, fmt.Errorf("start the sidecar process: %w", err)
	}
	cs := &childSidecar{cmd: cmd, done: make(chan struct{})}
	t.Cleanup(cs.kill)
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "ready" {
				ready <- true
			}
		}
		ready <- false
	}()
	go func() { cmd.Wait(); logf.Close(); close(cs.done) }()
	select {
	case ok := <-ready:
		if !ok {
			<-cs.done
			log, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("the sidecar process ended before serving:\n%s", log)
		}
	case <-time.After(20 * time.Second):
		return nil, errors.New("the sidecar process did not start serving within 20 s")
	}
	return cs, nil
}

// kill sends SIGKILL (no shutdown code runs) and waits for the process to
// end.
func (cs *childSidecar) kill() {
	_ = cs.cmd.Process.Kill()
	<-cs.done
}

func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestSIGKILLedSidecarKeepsPersistentSessions: an app on sidecar A streams
// QoS 1 messages to an app with a persistent session on sidecar B, and B's
// process is SIGKILLed and started again three times during the stream,
// each time while the broker goes on queueing for it. The restarted B
// resumes its upstream session and gets the backlog at once, before the
// app is back; the app, like mosquitto_sub, reconnects with the same client
// id and subscribes again. Every message must reach it (duplicates are
// allowed at QoS 1).
func TestSIGKILLedSidecarKeepsPersistentSessions(t *testing.T) {
	m := startMosquitto(t)
	r := newRig(t, m)
	a := r.sidecar(uniq("a"), "", bridgeMode)
	dir := t.TempDir()
	cfg := childSidecarConfig{
		Listen:   "tcp://127.0.0.1:" + strconv.Itoa(freeLoopbackPort(t)),
		Upstream: m.URL(),
		ClientID: uniq("killed-b"),
		DataDir:  filepath.Join(dir, "data"),
		Key:      hex.EncodeToString(r.key[:]),
	}
	logPath := filepath.Join(dir, "sidecar.log")
	t.Cleanup(func() {
		if t.Failed() {
			log, _ := os.ReadFile(logPath)
			t.Logf("sidecar B's log:\n%s", log)
		}
	})
	b, err := startChildSidecar(t, cfg, logPath)
	must(t, err)

	const filter, topic = "secure/killed/#", "secure/killed/stream"
	var (
		mu         sync.Mutex
		received   = map[int]int{}
		progress   = make(chan struct{}, 1)
		subscribed = make(chan error, 1)
	)
	opts := paho.NewClientOptions().AddBroker(cfg.Listen).SetClientID(uniq("sub")).
		SetCleanSession(false).SetAutoReconnect(true).SetMaxReconnectInterval(100 * time.Millisecond).
		SetOnConnectHandler(func(c paho.Client) { // subscribes on every connection, as mosquitto_sub does
			tok := c.Subscribe(filter, 1, nil)
			go func() {
				tok.Wait()
				select {
				case subscribed <- tok.Error():
				default:
				}
			}()
		}).
		SetDefaultPublishHandler(func(_ paho.Client, msg paho.Message) {
			v, err := strconv.Atoi(string(msg.Payload()))
			if err != nil {
				t.Errorf("garbled payload %q", msg.Payload())
				return
			}
			mu.Lock()
			received[v]++
			mu.Unlock()
			select {
			case progress <- struct{}{}:
			default:
			}
		})
	app := paho.NewClient(opts)
	if tok := app.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("app on sidecar B: connect: %v", tok.Error())
	}
	t.Cleanup(func() { app.Disconnect(50) })
	select {
	case err := <-subscribed:
		must(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the app on sidecar B: no SUBACK")
	}
	pub := r.app(a, uniq("pub"))
	must(t, pub.Publish(topic, 1, false, []byte("0")))
	select {
	case <-progress:
	case <-time.After(10 * time.Second):
		t.Fatal("the app on sidecar B got nothing before any kill")
	}

	const n, kills = 5000, 3
	restarted := make(chan error, 1)
	restarted <- nil
	toks := make([]paho.Token, 0, n)
	pace := time.NewTicker(400 * time.Microsecond) // about 2,500 messages a second
	defer pace.Stop()
	for i := 1; i <= n; i++ {
		<-pace.C
		toks = append(toks, pub.Client.Publish(topic, 1, false, []byte(strconv.Itoa(i))))
		if i%(n/(kills+1)) == 0 && i < n {
			must(t, <-restarted) // the previous restart is complete
			b.kill()
			t.Logf("sidecar B SIGKILLed after message %d was published", i)
			go func() {
				time.Sleep(300 * time.Millisecond) // the broker queues for B meanwhile
				var err error
				b, err = startChildSidecar(t, cfg, logPath)
				restarted <- err
			}()
		}
	}
	must(t, <-restarted)
	for i, tok := range toks {
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d not acknowledged by sidecar A: %v", i+1, tok.Error())
		}
	}
	missing := func() []int {
		mu.Lock()
		defer mu.Unlock()
		var out []int
		for i := 0; i <= n; i++ {
			if received[i] == 0 {
				out = append(out, i)
			}
		}
		return out
	}
	for len(missing()) > 0 {
		select {
		case <-progress:
		case <-time.After(15 * time.Second):
			lost := missing()
			t.Fatalf("lost %d of %d messages (nothing more arrived for 15 s); first missing: %v", len(lost), n+1, lost[:min(len(lost), 20)])
		}
	}
	mu.Lock()
	dups := 0
	for _, c := range received {
		dups += c - 1
	}
	mu.Unlock()
	t.Logf("%d messages through %d SIGKILLs of the receiving sidecar: lost 0, duplicates %d", n+1, kills, dups)
}
