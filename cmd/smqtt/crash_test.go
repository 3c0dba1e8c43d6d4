package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/faultnet"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
)

// TestSidecarSIGKILLKeepsQueuedMessages: QoS 1 messages a sidecar has
// acknowledged while upstream was unreachable survive a SIGKILL of the
// sidecar process (sync: batch writes each record before the
// acknowledgement) and go out, sealed, after it starts again.
func TestSidecarSIGKILLKeepsQueuedMessages(t *testing.T) {
	dir := t.TempDir()
	if r := smqtt(t, dir, "keygen", "--group", "-o", "demo.key"); r.code != 0 {
		t.Fatalf("keygen --group: %s", r.stderr)
	}
	up, err := embedded.Start(embedded.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	relay, err := faultnet.New(up.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	relay.Down()
	cfg := fmt.Sprintf(`
sidecar:
  mode: bridge                  # the store-and-forward queue is bridge mode's
  listen: ["tcp://127.0.0.1:0"]
  upstream: {url: %q, client_id: crashing-sidecar}
  protect:
    - {topics: ["secure/#"], group: demo}
  static_keys: {demo: demo.key}
  data_dir: data
  queue: {sync: batch}
`, relay.URL())
	if err := os.WriteFile(filepath.Join(dir, "sidecar.yaml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}

	sc := startSidecar(t, dir, "sidecar.yaml")
	app, err := mqtttest.Connect("tcp://"+sc.logged(t, "listening for local apps", "addr"), "legacy", mqtttest.AppOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const n = 50
	for i := 0; i < n; i++ {
		if err := app.Publish("secure/crash", 1, false, []byte(fmt.Sprintf("message %d", i))); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	app.Close()
	for _, s := range up.Spy.All() {
		if s.Topic == "secure/crash" {
			t.Fatal("a message reached the broker while it was unreachable: the test proves nothing")
		}
	}
	if err := sc.cmd.Process.Kill(); err != nil { // SIGKILL: no shutdown code runs
		t.Fatal(err)
	}
	<-sc.done

	relay.Up()
	startSidecar(t, dir, "sidecar.yaml")
	key, err := gkd.LoadGroupKey(filepath.Join(dir, "demo.key"))
	if err != nil {
		t.Fatal(err)
	}
	ring := keyclient.NewRing()
	if err := ring.AddStatic("demo", envelope.GroupKey(key)); err != nil {
		t.Fatal(err)
	}
	opener := envelope.NewOpener(ring, 16)
	deadline := time.Now().Add(15 * time.Second)
	for {
		got := map[string]bool{}
		for _, s := range up.Spy.All() {
			if s.Topic != "secure/crash" {
				continue
			}
			_, plain, err := opener.Open(nil, "demo", s.Topic, s.Payload)
			if err != nil {
				t.Fatalf("an envelope on the wire does not open: %v", err)
			}
			got[string(plain)] = true
		}
		if len(got) == n {
			for i := 0; i < n; i++ {
				if !got[fmt.Sprintf("message %d", i)] {
					t.Fatalf("message %d missing", i)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d messages reached the broker after the SIGKILL and restart", len(got), n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
