package main

import (
	"fmt"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyserver"
	"github.com/smqtt/smqtt/proxy"
)

// rogueName is the member of `smqtt demo --sender-auth` that forges.
const rogueName = "sidecar-rogue"

// forgery shows sender authentication: a member of the group (it holds the
// group key, so every envelope it seals opens) forges the messages of
// sidecar-1 in every way it can, and none is delivered; as itself it is
// heard until it is revoked, and after that not even as itself.
func (d *demo) forgery() error {
	fmt.Fprintf(d.out, "\n%s, a member of the group (it holds the group key), forges sidecar-1's messages:\n", rogueName)
	rogue, err := d.fleet.KeyClient(rogueName, nil, 15*time.Second)
	if err != nil {
		return fmt.Errorf("%s: %w", rogueName, err)
	}
	if _, err := fleet.Settle(10*time.Second, append([]*fleet.Node{rogue}, d.nodes...)...); err != nil {
		return err
	}
	id := d.fleet.Members[rogueName]
	wire, err := mqtttest.Connect(d.broker.URL(), rogueName+"-raw", mqtttest.AppOptions{})
	if err != nil {
		return err
	}
	defer wire.Close()
	own, err := rogue.Ring.Sealer(fleet.Group)
	if err != nil {
		return err
	}
	victim, err := d.nodes[0].Ring.Sealer(fleet.Group)
	if err != nil {
		return err
	}
	key, ok := rogue.Ring.GroupKey(fleet.Group, own.Epoch())
	if !ok {
		return fmt.Errorf("%s holds no key for epoch %d", rogueName, own.Epoch())
	}
	// Sealing under sidecar-1's sender id: the AEAD holds for any member.
	posing, err := envelope.NewSealer(fleet.Group, own.Epoch(), key, victim.Sender())
	if err != nil {
		return err
	}
	prove := func(topic string, env []byte) ([]byte, error) {
		items := []envelope.BatchItem{{Topic: topic, Env: env}}
		err := envelope.ProveBatch(fleet.Group, id, items)
		return items[0].Env, err
	}
	seal := func(s *envelope.Sealer, topic, plain string) ([]byte, error) {
		return s.SealSeq(nil, topic, envelope.FlagProof, 1<<40+uint64(time.Now().UnixNano()%(1<<30)), []byte(plain))
	}
	sealProved := func(s *envelope.Sealer, topic, plain string) ([]byte, error) {
		env, err := seal(s, topic, plain)
		if err != nil {
			return nil, err
		}
		return prove(topic, env)
	}
	// A message of sidecar-1's under the epoch the rogue holds (it cannot
	// read what was sent before it joined), captured with its proof.
	if err := d.nodes[0].App.Publish("secure/lock", 1, false, []byte("locked")); err != nil {
		return err
	}
	for i, node := range d.nodes[1:] {
		got, ok := node.App.Next(5 * time.Second)
		if err := d.check(ok && string(got.Payload) == "locked", "legacy-app-%d received secure/lock %q from legacy-app-1", i+2, "locked"); err != nil {
			return err
		}
	}
	captured := d.seen("secure/lock")
	_, victimProof, _, err := envelope.SplitProof(captured)
	if err != nil {
		return err
	}

	type forged struct{ what, topic string }
	var attempts []forged
	send := func(what, topic string, env []byte, err error) error {
		if err != nil {
			return err
		}
		attempts = append(attempts, forged{what, topic})
		fmt.Fprintf(d.out, "  → %-62s on %s\n", what, topic)
		return wire.Publish(topic, 1, false, env)
	}
	env, err := sealProved(posing, "secure/door/front", "unlock code 0000")
	if err := send("sealed under sidecar-1's sender id, signed with its own key", "secure/door/front", env, err); err != nil {
		return err
	}
	env, err = seal(posing, "secure/valve", "open")
	if err := send("sealed under sidecar-1's sender id, with sidecar-1's proof", "secure/valve", victimProof.AppendTo(env), err); err != nil {
		return err
	}
	env, err = seal(own, "secure/door/front", "unlock code 0000")
	if err := send("its own message, with sidecar-1's proof", "secure/door/front", victimProof.AppendTo(env), err); err != nil {
		return err
	}
	plain, err := d.open(rogue, "secure/lock", captured)
	if err == nil {
		env, err = seal(posing, "secure/door/back", plain)
	}
	if err := send("sidecar-1's message moved to another topic, its proof kept", "secure/door/back", victimProof.AppendTo(env), err); err != nil {
		return err
	}
	if err := d.expectDrops(len(attempts), "legacy-app-%d received none of them; its sidecar dropped all %d (reason sender_auth)"); err != nil {
		return err
	}

	// As itself the rogue is a member like any other.
	env, err = sealProved(own, "secure/hello", "hello from the rogue")
	if err != nil {
		return err
	}
	if err := wire.Publish("secure/hello", 1, false, env); err != nil {
		return err
	}
	for i, node := range d.nodes[1:] {
		got, ok := node.App.Next(5 * time.Second)
		if err := d.check(ok && string(got.Payload) == "hello from the rogue", "legacy-app-%d received what %s sent as itself: sender_auth does not stop a member speaking for itself", i+2, rogueName); err != nil {
			return err
		}
	}

	// Revoked, it keeps its keys and signs on: refused.
	opts := d.fleet.KSOpts
	opts.Groups = append([]keyserver.GroupConfig(nil), opts.Groups...)
	var kept []string
	for _, m := range opts.Groups[0].Members {
		if m != rogueName {
			kept = append(kept, m)
		}
	}
	opts.Groups[0].Members = kept
	if err := d.fleet.KS.Reload(opts); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, node := range d.nodes {
		for _, listed := node.Ring.SenderKey(fleet.Group, own.Sender()); listed; _, listed = node.Ring.SenderKey(fleet.Group, own.Sender()) {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s still lists %s's sender id after its revocation", node.Name, rogueName)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err := d.check(true, "%s revoked: every sidecar installed the key server's new roster without it", rogueName); err != nil {
		return err
	}
	env, err = sealProved(own, "secure/hello", "still here")
	if err != nil {
		return err
	}
	fmt.Fprintf(d.out, "  → %-62s on %s\n", "after its revocation, its own message, signed with its own key", "secure/hello")
	if err := wire.Publish("secure/hello", 1, false, env); err != nil {
		return err
	}
	return d.expectDrops(1, "legacy-app-%d received nothing from the revoked member; its sidecar dropped it (%d, sender_auth)")
}

// open opens an envelope with a node's keys.
func (d *demo) open(n *fleet.Node, topic string, env []byte) (string, error) {
	_, plain, err := envelope.NewOpener(n.Ring, 16).Open(nil, fleet.Group, topic, env)
	return string(plain), err
}

// senderAuthDrops is each receiving sidecar's count of sender_auth drops.
func (d *demo) senderAuthDrops() []int {
	var out []int
	for _, node := range d.nodes[1:] {
		out = append(out, node.Side.DropCounts()["in/"+proxy.DropSenderAuth])
	}
	return out
}

// expectDrops checks that every receiving sidecar dropped n more envelopes
// under sender_auth than at the last check, and that its app got nothing.
func (d *demo) expectDrops(n int, format string) error {
	before := d.dropsBefore
	if before == nil {
		before = make([]int, len(d.nodes)-1)
	}
	deadline := time.Now().Add(5 * time.Second)
	for i, node := range d.nodes[1:] {
		for node.Side.DropCounts()["in/"+proxy.DropSenderAuth] < before[i]+n && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		got, delivered := node.App.Next(200 * time.Millisecond)
		dropped := node.Side.DropCounts()["in/"+proxy.DropSenderAuth] - before[i]
		if err := d.check(!delivered && dropped == n, format, i+2, dropped); err != nil {
			if delivered {
				return fmt.Errorf("%w (got %s %q)", err, got.Topic, got.Payload)
			}
			return err
		}
	}
	d.dropsBefore = d.senderAuthDrops()
	return nil
}
