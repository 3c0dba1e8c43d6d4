package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

func runDemo(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("demo", "demo [--scheme static] [--clients N] [--keep]", stderr)
	scheme := fs.String("scheme", "static", "group key scheme: static")
	clients := fs.Int("clients", 2, "number of sidecars, each with one legacy app (at least 2)")
	keep := fs.Bool("keep", false, "keep running after the checks so you can connect mosquitto_sub/mosquitto_pub to the printed addresses")
	newLog := logFlags(fs, stderr, "error")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log, err := newLog()
	if err != nil {
		return err
	}
	if *scheme != "static" {
		return fmt.Errorf("--scheme: %q is not available in this build yet (static)", *scheme)
	}
	if *clients < 2 || *clients > 100 {
		return fmt.Errorf("--clients: %d is out of range (2 to 100)", *clients)
	}
	d := &demo{out: stdout, log: log}
	defer d.cleanup()
	if err := d.run(*clients); err != nil {
		fmt.Fprintf(stdout, "\nVERDICT: FAIL — %s\n", err)
		return errors.New("a check failed")
	}
	fmt.Fprintf(stdout, "\nVERDICT: PASS — %d checks held; the broker saw no plaintext of any protected message.\n", d.checks)
	if *keep {
		fmt.Fprintln(stdout, "\nStill running (Ctrl-C to stop). Try:")
		fmt.Fprintf(stdout, "  mosquitto_sub -h %s -p %s -t 'secure/#' -v         # through sidecar 2: plaintext\n", host(d.sidecars[1]), port(d.sidecars[1]))
		fmt.Fprintf(stdout, "  mosquitto_pub -h %s -p %s -t secure/hello -m hi   # through sidecar 1\n", host(d.sidecars[0]), port(d.sidecars[0]))
		fmt.Fprintf(stdout, "  mosquitto_sub -h %s -p %s -t '#' -v               # the broker: ciphertext\n", host2(d.broker.Addr()), port2(d.broker.Addr()))
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		<-sig
	}
	return nil
}

type demo struct {
	out      io.Writer
	log      *slog.Logger
	dir      string
	broker   *embedded.Broker
	sidecars []*proxy.Sidecar
	apps     []*mqtttest.App
	checks   int
}

func (d *demo) cleanup() {
	for _, a := range d.apps {
		a.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, s := range d.sidecars {
		s.Close(ctx)
	}
	if d.broker != nil {
		d.broker.Close()
	}
	if d.dir != "" {
		os.RemoveAll(d.dir)
	}
}

func (d *demo) check(ok bool, format string, args ...any) error {
	if !ok {
		return fmt.Errorf(format, args...)
	}
	d.checks++
	fmt.Fprintf(d.out, "  ✔ "+format+"\n", args...)
	return nil
}

func (d *demo) run(n int) error {
	var err error
	if d.dir, err = os.MkdirTemp("", "smqtt-demo-"); err != nil {
		return err
	}
	if d.broker, err = embedded.Start(embedded.Options{}); err != nil {
		return err
	}
	fmt.Fprintf(d.out, "untrusted broker   %s (embedded mochi-mqtt)\n", d.broker.URL())
	var key envelope.GroupKey
	if _, err := rand.Read(key[:]); err != nil {
		return err
	}
	rules := []proxy.Rule{{Filters: []string{"secure/#"}, Group: "demo"}}
	for i := 0; i < n; i++ {
		ring := keyclient.NewRing()
		if err := ring.AddStatic("demo", key); err != nil {
			return err
		}
		sc, err := proxy.New(proxy.Options{
			Listen:   []string{"tcp://127.0.0.1:0"},
			Upstream: proxy.UpstreamOptions{URL: d.broker.URL(), ClientID: fmt.Sprintf("sidecar-%d", i+1)},
			Rules:    rules,
			Keys:     ring,
			DataDir:  filepath.Join(d.dir, fmt.Sprintf("sidecar-%d", i+1)),
			Queue:    queue.Options{Sync: queue.SyncBatch},
			Logger:   d.log,
		})
		if err != nil {
			return err
		}
		if err := sc.Start(); err != nil {
			return err
		}
		d.sidecars = append(d.sidecars, sc)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err = sc.WaitConnected(ctx)
		cancel()
		if err != nil {
			return err
		}
		app, err := mqtttest.Connect("tcp://"+sc.Addrs()[0].String(), fmt.Sprintf("legacy-app-%d", i+1), mqtttest.AppOptions{})
		if err != nil {
			return err
		}
		d.apps = append(d.apps, app)
		fmt.Fprintf(d.out, "sidecar %-3d        tcp://%s  (protects secure/#, group demo, static key)  ← legacy-app-%d\n", i+1, sc.Addrs()[0], i+1)
	}
	for _, a := range d.apps[1:] {
		if err := a.Subscribe("secure/#", 1); err != nil {
			return err
		}
		if err := a.Subscribe("public/#", 1); err != nil {
			return err
		}
	}

	fmt.Fprintln(d.out, "\nExchange (legacy-app-1 publishes; the others subscribe to secure/# and public/#):")
	sent := []struct {
		topic, payload string
		protected      bool
	}{
		{"secure/door/front", "unlock code 4711", true},
		{"secure/meter/42", `{"kWh": 1234.5}`, true},
		{"public/weather", "sunny, 21°C", false},
	}
	for _, m := range sent {
		if err := d.apps[0].Publish(m.topic, 1, false, []byte(m.payload)); err != nil {
			return err
		}
	}
	for i, a := range d.apps[1:] {
		for _, m := range sent {
			got, ok := a.Next(5 * time.Second)
			if err := d.check(ok && got.Topic == m.topic && string(got.Payload) == m.payload,
				"legacy-app-%d received %-18s %q", i+2, m.topic, m.payload); err != nil {
				return err
			}
		}
	}
	fmt.Fprintln(d.out, "\nWhat the broker saw:")
	seen := d.broker.Spy.All()
	for _, m := range sent {
		var wire []byte
		for _, s := range seen {
			if s.Topic == m.topic {
				wire = s.Payload
				break
			}
		}
		fmt.Fprintf(d.out, "  %-18s %3d bytes  %s\n", m.topic, len(wire), excerpt(wire))
		if m.protected {
			if err := d.check(len(wire) > 0 && !d.broker.Spy.Contains([]byte(m.payload)),
				"broker saw only ciphertext on %s (%d bytes of overhead)", m.topic, len(wire)-len(m.payload)); err != nil {
				return err
			}
		} else if err := d.check(bytes.Equal(wire, []byte(m.payload)), "broker saw %s unchanged (not protected)", m.topic); err != nil {
			return err
		}
	}

	fmt.Fprintln(d.out, "\nThe broker tampers with a protected message and replays another:")
	up, err := mqtttest.Connect(d.broker.URL(), "evil-insider", mqtttest.AppOptions{})
	if err != nil {
		return err
	}
	defer up.Close()
	var captured []byte
	for _, s := range seen {
		if s.Topic == "secure/door/front" {
			captured = s.Payload
		}
	}
	tampered := append([]byte(nil), captured...)
	tampered[len(tampered)-1] ^= 1
	_ = up.Publish("secure/door/front", 1, false, tampered)
	_ = up.Publish("secure/door/front", 1, false, captured)
	_ = up.Publish("secure/door/front", 1, false, []byte("forged plaintext: unlock"))
	for i, a := range d.apps[1:] {
		got, ok := a.Next(time.Second)
		if err := d.check(!ok, "legacy-app-%d received none of the tampered, replayed or forged messages", i+2); err != nil {
			return fmt.Errorf("%w (got %s %q)", err, got.Topic, got.Payload)
		}
	}
	return nil
}

func excerpt(b []byte) string {
	if len(b) > 24 {
		return hex.EncodeToString(b[:24]) + "…"
	}
	if printable(b) {
		return fmt.Sprintf("%q", b)
	}
	return hex.EncodeToString(b)
}

func printable(b []byte) bool {
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

func host(sc *proxy.Sidecar) string { return host2(sc.Addrs()[0].String()) }
func port(sc *proxy.Sidecar) string { return port2(sc.Addrs()[0].String()) }
func host2(addr string) string {
	h, _, _ := netSplit(addr)
	return h
}
func port2(addr string) string {
	_, p, _ := netSplit(addr)
	return p
}
