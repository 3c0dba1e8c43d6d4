package main

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/internal/mqtttest"
)

func runDemo(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("demo", "demo [--scheme static|update|slotted|lkh] [--clients N] [--sender-auth] [--keep]", stderr)
	scheme := fs.String("scheme", "update", "group key scheme: static, update, slotted or lkh")
	clients := fs.Int("clients", 2, "number of sidecars, each with one legacy app (2 to 50)")
	senderAuth := fs.Bool("sender-auth", false, "run the group with sender_auth and add a member that forges the others' messages: none may be delivered")
	keep := fs.Bool("keep", false, "keep running after the checks so you can point mosquitto_sub/mosquitto_pub at the printed addresses")
	newLog := logFlags(fs, stderr, "error")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log, err := newLog()
	if err != nil {
		return err
	}
	if *scheme != "static" && *scheme != "update" && *scheme != "slotted" && *scheme != "lkh" {
		return fmt.Errorf("--scheme: %q is not a scheme (static, update, slotted, lkh)", *scheme)
	}
	if *clients < 2 || *clients > 50 {
		return fmt.Errorf("--clients: %d is out of range (2 to 50)", *clients)
	}
	d := &demo{out: stdout, log: log, scheme: *scheme, senderAuth: *senderAuth}
	defer d.cleanup()
	if err := d.run(*clients); err != nil {
		fmt.Fprintf(stdout, "\nVERDICT: FAIL — %s\n", err)
		return errors.New("a check failed")
	}
	fmt.Fprintf(stdout, "\nVERDICT: PASS — %d checks held; the broker saw no plaintext of any protected message.\n", d.checks)
	if *keep {
		a, b := d.nodes[0].Side.Addrs()[0].String(), d.nodes[1].Side.Addrs()[0].String()
		fmt.Fprintln(stdout, "\nStill running (Ctrl-C to stop). Try:")
		fmt.Fprintf(stdout, "  mosquitto_sub -h %s -p %s -t 'secure/#' -v          # through sidecar 2: plaintext\n", host(b), port(b))
		fmt.Fprintf(stdout, "  mosquitto_pub -h %s -p %s -t secure/hello -m hi    # through sidecar 1\n", host(a), port(a))
		fmt.Fprintf(stdout, "  mosquitto_sub -h %s -p %s -t '#' -v                # the broker itself: ciphertext\n", host(d.broker.Addr()), port(d.broker.Addr()))
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		<-sig
	}
	return nil
}

type demo struct {
	out        io.Writer
	log        *slog.Logger
	scheme     string
	senderAuth bool
	dir        string
	broker     *embedded.Broker
	fleet      *fleet.Fleet
	nodes      []*fleet.Node
	checks     int

	dropsBefore []int // --sender-auth: each receiver's sender_auth drops at the last check
}

func (d *demo) cleanup() {
	if d.fleet != nil {
		d.fleet.Close()
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
	var names []string
	for i := 1; i <= n; i++ {
		names = append(names, fmt.Sprintf("sidecar-%d", i))
	}
	members := append(names, "sidecar-late")
	if d.senderAuth {
		members = append(members, rogueName)
	}
	d.fleet, err = fleet.New(fleet.Options{
		UpstreamURL: d.broker.URL(), UpstreamAddr: d.broker.Addr(), Dir: d.dir,
		Scheme: d.scheme, Suite: gkd.SuiteHybrid, Logger: d.log, SenderAuth: d.senderAuth,
		Members: members,
		// slotted: short slots, so that the demo crosses a few of them
		Slot: 2 * time.Second, MemberInterval: time.Minute, SkewSlots: 1,
	})
	if err != nil {
		return err
	}
	auth := ""
	if d.senderAuth {
		auth = ", sender_auth: members sign what they seal"
	}
	fmt.Fprintf(d.out, "key server         id %s, group %q (scheme %s%s), identities ML-KEM-768 + X25519 (hybrid HPKE)\n",
		d.fleet.Server.Public().ID(), fleet.Group, d.scheme, auth)
	for i, name := range names {
		node, err := d.fleet.Join(name)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		d.nodes = append(d.nodes, node)
		fmt.Fprintf(d.out, "%-18s %s  protects secure/#, %s mode  ← legacy-app-%d\n", name, node.URL(), node.Side.Mode(), i+1)
	}
	epoch, err := fleet.Settle(10*time.Second, d.nodes...)
	if err != nil {
		return err
	}
	if err := d.check(true, "%d sidecars joined group %q and seal with %s", n, fleet.Group, d.epochName(epoch)); err != nil {
		return err
	}
	for _, node := range d.nodes[1:] {
		if err := node.App.Subscribe("secure/#", 1); err != nil {
			return err
		}
		if err := node.App.Subscribe("public/#", 1); err != nil {
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
		if err := d.nodes[0].App.Publish(m.topic, 1, false, []byte(m.payload)); err != nil {
			return err
		}
	}
	for i, node := range d.nodes[1:] {
		for _, m := range sent {
			got, ok := node.App.Next(5 * time.Second)
			if err := d.check(ok && got.Topic == m.topic && string(got.Payload) == m.payload,
				"legacy-app-%d received %-18s %q", i+2, m.topic, m.payload); err != nil {
				return err
			}
		}
	}
	fmt.Fprintln(d.out, "\nWhat the broker saw:")
	for _, m := range sent {
		wire := d.seen(m.topic)
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

	fmt.Fprintln(d.out, "\nThe broker tampers with a protected message, replays another and forges a third:")
	evil, err := mqtttest.Connect(d.broker.URL(), "evil-insider", mqtttest.AppOptions{})
	if err != nil {
		return err
	}
	defer evil.Close()
	captured := d.seen("secure/door/front")
	tampered := append([]byte(nil), captured...)
	tampered[len(tampered)-1] ^= 1
	for _, p := range [][]byte{tampered, captured, []byte("forged plaintext: unlock")} {
		if err := evil.Publish("secure/door/front", 1, false, p); err != nil {
			return err
		}
	}
	for i, node := range d.nodes[1:] {
		got, ok := node.App.Next(time.Second)
		if err := d.check(!ok, "legacy-app-%d received none of them", i+2); err != nil {
			return fmt.Errorf("%w (got %s %q)", err, got.Topic, got.Payload)
		}
	}
	if d.senderAuth {
		if err := d.forgery(); err != nil {
			return err
		}
	}
	return d.membership(epoch, captured)
}

// membership shows a join and a leave: with update or lkh, each rekeys the
// group, and neither the newcomer can read the past nor the leaver the future.
func (d *demo) membership(epoch uint32, past []byte) error {
	fmt.Fprintln(d.out, "\nMembership changes:")
	if d.scheme == "slotted" {
		return d.slottedMembership(past)
	}
	late, err := d.fleet.Join("sidecar-late")
	if err != nil {
		return err
	}
	all := append(append([]*fleet.Node(nil), d.nodes...), late)
	joined, err := fleet.Settle(10*time.Second, all...)
	if err != nil {
		return err
	}
	if d.scheme == "static" {
		if err := d.check(joined == epoch, "sidecar-late joined; static keys do not change (epoch %d): it can read past traffic", joined); err != nil {
			return err
		}
		late.Close()
		return nil
	}
	if err := d.check(joined > epoch, "sidecar-late joined: the group rekeyed from epoch %d to %d", epoch, joined); err != nil {
		return err
	}
	if err := d.check(!opens(late, "secure/door/front", past), "sidecar-late cannot open a message sent before it joined"); err != nil {
		return err
	}
	late.Close()
	left, err := fleet.Settle(10*time.Second, d.nodes...)
	for err == nil && left == joined {
		time.Sleep(20 * time.Millisecond)
		left, err = fleet.Settle(10*time.Second, d.nodes...)
	}
	if err != nil {
		return err
	}
	if err := d.check(left > joined, "sidecar-late left: the group rekeyed from epoch %d to %d", joined, left); err != nil {
		return err
	}
	if err := d.nodes[0].App.Publish("secure/door/front", 1, false, []byte("new code 0815")); err != nil {
		return err
	}
	for i, node := range d.nodes[1:] {
		got, ok := node.App.Next(5 * time.Second)
		if err := d.check(ok && string(got.Payload) == "new code 0815", "legacy-app-%d received the next message under epoch %d", i+2, left); err != nil {
			return err
		}
	}
	return d.check(!opens(late, "secure/door/front", d.seen("secure/door/front")), "sidecar-late cannot open it")
}

// epochName says what an epoch is: a slotted epoch packs a slot and a K2
// generation.
func (d *demo) epochName(e uint32) string {
	if d.scheme == "slotted" {
		return fmt.Sprintf("slot %d, K2 generation %d", e&(1<<gkd.SlotEpochBits-1), e>>gkd.SlotEpochBits)
	}
	return fmt.Sprintf("epoch %d", e)
}

// slottedMembership shows slotted's join and leave: a join costs no
// message to the others and gives no slot before the current one; a leave
// refreshes K2, so the leaver's tree covers open nothing later.
func (d *demo) slottedMembership(past []byte) error {
	// Let the slot of the past message end: backward secrecy is per slot.
	start := d.nodes[0].Epoch()
	for d.nodes[0].Epoch() == start {
		time.Sleep(20 * time.Millisecond)
	}
	gen, _ := d.fleet.KS.GroupEpoch(fleet.Group)
	late, err := d.fleet.Join("sidecar-late")
	if err != nil {
		return err
	}
	now, _ := d.fleet.KS.GroupEpoch(fleet.Group)
	if err := d.check(now == gen, "sidecar-late joined with a grant of slots from now on; nobody was rekeyed (K2 generation %d)", now); err != nil {
		return err
	}
	if err := d.check(!opens(late, "secure/door/front", past), "sidecar-late cannot open a message from an earlier slot"); err != nil {
		return err
	}
	late.Close()
	for deadline := time.Now().Add(10 * time.Second); now == gen && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		now, _ = d.fleet.KS.GroupEpoch(fleet.Group)
	}
	if err := d.check(now > gen, "sidecar-late left before its grant ended: K2 refreshed from generation %d to %d", gen, now); err != nil {
		return err
	}
	for _, n := range d.nodes {
		for deadline := time.Now().Add(10 * time.Second); n.Epoch()>>gkd.SlotEpochBits != now&0xff && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err := d.nodes[0].App.Publish("secure/door/front", 1, false, []byte("new code 0815")); err != nil {
		return err
	}
	for i, node := range d.nodes[1:] {
		got, ok := node.App.Next(5 * time.Second)
		if err := d.check(ok && string(got.Payload) == "new code 0815", "legacy-app-%d received the next message under %s", i+2, d.epochName(d.nodes[0].Epoch())); err != nil {
			return err
		}
	}
	return d.check(!opens(late, "secure/door/front", d.seen("secure/door/front")), "sidecar-late cannot open it, although it holds tree keys for the coming slots")
}

// seen returns the last payload the broker saw on topic.
func (d *demo) seen(topic string) []byte {
	var last []byte
	for _, s := range d.broker.Spy.All() {
		if s.Topic == topic {
			last = s.Payload
		}
	}
	return last
}

func opens(n *fleet.Node, topic string, env []byte) bool {
	_, _, err := envelope.NewOpener(n.Ring, 16).Open(nil, fleet.Group, topic, env)
	return err == nil
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

func host(addr string) string {
	h, _, _ := net.SplitHostPort(addr)
	return h
}

func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}
