package proxy_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/mosquitto"
	"github.com/smqtt/smqtt/internal/mqttc"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
)

// gatekeeper is an upstream broker's authentication: it records every
// CONNECT it sees and admits only alice with her password.
type gatekeeper struct {
	mqtt.HookBase
	mu   sync.Mutex
	seen []string // "client-id user:password"
}

func (g *gatekeeper) ID() string { return "gatekeeper" }
func (g *gatekeeper) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (g *gatekeeper) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	g.mu.Lock()
	g.seen = append(g.seen, pk.Connect.ClientIdentifier+" "+string(pk.Connect.Username)+":"+string(pk.Connect.Password))
	g.mu.Unlock()
	return string(pk.Connect.Username) == "alice" && string(pk.Connect.Password) == "alice's secret"
}
func (g *gatekeeper) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

func (g *gatekeeper) last() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.seen) == 0 {
		return ""
	}
	return g.seen[len(g.seen)-1]
}

// startGatekept starts a mochi broker with the gatekeeper.
func startGatekept(t *testing.T) (*gatekeeper, string) {
	t.Helper()
	g := &gatekeeper{}
	s := mqtt.New(&mqtt.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	must(t, s.AddHook(g, nil))
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	must(t, s.AddListener(listeners.NewNet("gate", nl)))
	must(t, s.Serve())
	t.Cleanup(func() { s.Close() })
	return g, nl.Addr().String()
}

func identitySidecar(t *testing.T, upAddr string, f func(*proxy.Options)) string {
	t.Helper()
	ring := keyclient.NewRing()
	o := proxy.Options{
		Mode:     proxy.ModeSession,
		Listen:   []string{"tcp://127.0.0.1:0"},
		Upstream: proxy.UpstreamOptions{URL: "tcp://" + upAddr, ClientID: "sidecar"},
		Keys:     ring,
		DataDir:  t.TempDir(),
	}
	if f != nil {
		f(&o)
	}
	sc, err := proxy.New(o)
	must(t, err)
	must(t, sc.Start())
	t.Cleanup(func() { sc.Close(context.Background()) })
	return sc.Addrs()[0].String()
}

// TestSessionModeUpstreamIdentity: each app's upstream session carries its
// own client id (behind the configured prefix) and credentials, or the
// credentials the configuration maps its local user to; the broker's
// refusal reaches the app as the broker sent it; an unreachable broker is
// "server unavailable".
func TestSessionModeUpstreamIdentity(t *testing.T) {
	gate, upAddr := startGatekept(t)
	local := identitySidecar(t, upAddr, func(o *proxy.Options) {
		o.ClientIDPrefix = "host1-"
	})
	mapped := identitySidecar(t, upAddr, func(o *proxy.Options) {
		o.Users = map[string]string{"app": "local secret"}
		o.UpstreamCredentials = map[string]proxy.Credentials{"app": {Username: "alice", Password: "alice's secret"}}
	})

	for _, version := range []byte{4, 5} {
		o := mqttc.Options{Version: version, Clean: true, ClientID: "dev-1", Username: "alice", Password: "alice's secret"}
		c, ack, err := mqttc.Connect(local, o)
		must(t, err)
		if c == nil || ack.ReasonCode != 0 {
			t.Fatalf("v%d: refused: 0x%02x", version, ack.ReasonCode)
		}
		c.Disconnect(0, packets.Properties{})
		if got := gate.last(); got != "host1-dev-1 alice:alice's secret" {
			t.Fatalf("v%d: upstream saw %q", version, got)
		}

		// A wrong password: the broker's own answer, as when connecting
		// to it directly.
		o.Password = "wrong"
		_, direct, err := mqttc.Connect(upAddr, o)
		must(t, err)
		c, via, err := mqttc.Connect(local, o)
		must(t, err)
		if c != nil || via.ReasonCode != direct.ReasonCode || direct.ReasonCode == 0 {
			t.Fatalf("v%d: a wrong password: through the sidecar 0x%02x, directly 0x%02x", version, via.ReasonCode, direct.ReasonCode)
		}

		// A local user whose upstream credentials the configuration maps.
		m := mqttc.Options{Version: version, Clean: true, ClientID: "dev-2", Username: "app", Password: "local secret"}
		c, ack, err = mqttc.Connect(mapped, m)
		must(t, err)
		if c == nil {
			t.Fatalf("v%d: mapped credentials refused: 0x%02x", version, ack.ReasonCode)
		}
		c.Disconnect(0, packets.Properties{})
		if got := gate.last(); got != "dev-2 alice:alice's secret" {
			t.Fatalf("v%d: with mapped credentials upstream saw %q", version, got)
		}
		before := gate.last()
		m.Password = "not the local secret"
		c, ack, err = mqttc.Connect(mapped, m)
		must(t, err)
		want := map[byte]byte{4: 4, 5: 0x86}[version]
		if c != nil || ack.ReasonCode != want {
			t.Fatalf("v%d: a wrong local password: CONNACK 0x%02x, want 0x%02x", version, ack.ReasonCode, want)
		}
		if gate.last() != before {
			t.Fatalf("v%d: a locally refused app reached upstream", version)
		}
	}

	// An app that asks to be named is named by the sidecar (behind the
	// prefix), and its session comes back under that name.
	o := mqttc.Options{Version: 5, ClientID: "", Username: "alice", Password: "alice's secret",
		Properties: packets.Properties{SessionExpiryInterval: 60, SessionExpiryIntervalFlag: true}}
	c, ack, err := mqttc.Connect(local, o)
	must(t, err)
	name := ack.Properties.AssignedClientID
	if c == nil || !strings.HasPrefix(name, "smqtt-") || gate.last() != "host1-"+name+" alice:alice's secret" {
		t.Fatalf("assigned client id %q; upstream saw %q", name, gate.last())
	}
	c.Disconnect(0, packets.Properties{})
	o.ClientID = name
	c, ack, err = mqttc.Connect(local, o)
	must(t, err)
	if c == nil || !ack.SessionPresent {
		t.Fatalf("the named app's session did not come back: present %v", ack.SessionPresent)
	}
	c.Disconnect(0, packets.Properties{})

	// Nothing listens upstream.
	down := identitySidecar(t, "127.0.0.1:1", nil)
	for version, want := range map[byte]byte{4: 3, 5: 0x88} {
		c, ack, err := mqttc.Connect(down, mqttc.Options{Version: version, Clean: true, ClientID: "lonely"})
		must(t, err)
		if c != nil || ack.ReasonCode != want {
			t.Fatalf("v%d with upstream down: CONNACK 0x%02x, want server unavailable 0x%02x", version, ack.ReasonCode, want)
		}
	}
}

// TestSessionModeRespectsTheBrokersMaximumPacketSize: an MQTT 5 app is
// told the broker's maximum packet size less what sealing adds; a protected
// publish within it reaches the broker sealed; one above it ends the app's
// connection with DISCONNECT 0x95, as the broker itself does to a client
// that exceeds its limit, and never reaches the broker, truncated or not.
func TestSessionModeRespectsTheBrokersMaximumPacketSize(t *testing.T) {
	const limit = 1024
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed")
	}
	up, err := mosquitto.StartWith(t.TempDir(), fmt.Sprintf("max_packet_size %d", limit))
	must(t, err)
	t.Cleanup(func() { up.Close() })
	upAddr := up.Addr()
	var key envelope.GroupKey
	sc := identitySidecar(t, upAddr, func(o *proxy.Options) {
		ring := keyclient.NewRing()
		must(t, ring.AddStatic("demo", key))
		o.Keys, o.Rules = ring, testRules
	})

	witness, _, err := mqttc.Connect(upAddr, mqttc.Options{Version: 5, Clean: true, ClientID: "witness"})
	must(t, err)
	defer witness.Close()
	_, err = witness.Subscribe(packets.Properties{}, packets.Subscription{Filter: "secure/big", Qos: 1})
	must(t, err)

	// The broker alone, for reference: above its limit, DISCONNECT 0x95.
	direct, dack, err := mqttc.Connect(upAddr, mqttc.Options{Version: 5, Clean: true, ClientID: "direct"})
	must(t, err)
	if dack.Properties.MaximumPacketSize != limit {
		t.Fatalf("the broker advertises %d", dack.Properties.MaximumPacketSize)
	}
	direct.PublishAsync(packets.Packet{FixedHeader: packets.FixedHeader{Qos: 1}, TopicName: "secure/big", Payload: bytes.Repeat([]byte("d"), limit)})
	<-direct.Done()
	ref, _ := direct.ServerDisconnect()

	c, ack, err := mqttc.Connect(sc, mqttc.Options{Version: 5, Clean: true, ClientID: "app"})
	must(t, err)
	told := ack.Properties.MaximumPacketSize
	if told != limit-45 {
		t.Fatalf("the app is told a maximum packet size of %d, want %d", told, limit-45)
	}
	// the largest publish it may send: a 2-byte topic length, 10 bytes of
	// topic, 2 of packet id, 1 of property length, 2 of remaining length,
	// 1 of header
	fits := int(told) - (1 + 2 + 2 + 10 + 2 + 1)
	if _, err := c.Publish(packets.Packet{FixedHeader: packets.FixedHeader{Qos: 1}, TopicName: "secure/big", Payload: bytes.Repeat([]byte("f"), fits)}); err != nil {
		t.Fatalf("a publish of exactly the maximum it was told: %v", err)
	}
	c.PublishAsync(packets.Packet{FixedHeader: packets.FixedHeader{Qos: 1}, TopicName: "secure/big", Payload: bytes.Repeat([]byte("x"), fits+1)})
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("an app above its maximum packet size is still connected")
	}
	d, ok := c.ServerDisconnect()
	if !ok || d.ReasonCode != ref.ReasonCode || d.ReasonCode != 0x95 {
		t.Fatalf("DISCONNECT %v 0x%02x, the broker alone sends 0x%02x", ok, d.ReasonCode, ref.ReasonCode)
	}
	// The broker got the publish that fit, whole and sealed, and nothing else.
	pk, ok := witness.Next(5 * time.Second)
	if !ok || len(pk.Payload) != fits+envelope.Overhead {
		t.Fatalf("the broker got %v a payload of %d bytes, want the sealed %d", ok, len(pk.Payload), fits+envelope.Overhead)
	}
	if pk, ok := witness.Next(300 * time.Millisecond); ok {
		t.Fatalf("the broker got a second publish of %d bytes", len(pk.Payload))
	}
}

// allowAll admits every client.
type allowAll struct{ mqtt.HookBase }

func (allowAll) ID() string { return "allow-all" }
func (allowAll) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (allowAll) OnACLCheck(*mqtt.Client, string, bool) bool              { return true }
