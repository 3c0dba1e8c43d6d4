package proxy_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/proxy"
)

// TestNoNonceReuseAcrossRestarts restarts a sidecar twenty times in quick
// succession on one data directory while it publishes, and checks every
// envelope the broker saw: under one key, a (sender, sequence number) pair
// — which fixes the per-sender subkey and the nonce — never carries two
// different ciphertexts. (The same pair with the same bytes is a resend of
// one sealed message, which is safe.)
func TestNoNonceReuseAcrossRestarts(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		name, dir := uniq("restarting"), t.TempDir()
		for i := 0; i < 20; i++ {
			sc := r.sidecar(name, dir)
			app := r.app(sc, uniq("pub"))
			for j := 0; j < 5; j++ {
				must(t, app.Publish("secure/nonce", 1, false, []byte(fmt.Sprintf("run %d message %d", i, j))))
			}
			app.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			sc.Close(ctx)
			cancel()
		}
		type use struct {
			epoch  uint32
			sender uint64
			seq    uint64
		}
		seen := map[use][]byte{}
		senders := map[uint64]bool{}
		n := 0
		for _, s := range up.Spy.All() {
			if s.Topic != "secure/nonce" {
				continue
			}
			h, err := envelope.ParseHeader(s.Payload)
			must(t, err)
			n++
			senders[h.Sender] = true
			k := use{h.Epoch, h.Sender, h.Seq}
			if prev, ok := seen[k]; ok && !bytes.Equal(prev, s.Payload) {
				t.Fatalf("nonce reuse: sender %x seq %d carried two different ciphertexts", h.Sender, h.Seq)
			}
			seen[k] = s.Payload
		}
		if n < 100 {
			t.Fatalf("only %d envelopes seen, want at least 100", n)
		}
		if len(senders) != 20 {
			t.Fatalf("%d sender ids over 20 process starts, want a fresh one per start", len(senders))
		}
	})
}
