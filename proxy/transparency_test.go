package proxy_test

// Transparency: an app must not be able to tell that it talks through
// smqtt. Each scenario runs twice with the same clients (internal/mqttc):
// against Mosquitto alone, and through two sidecars in session mode in front
// of another Mosquitto (publishers on sidecar A, subscribers on sidecar B).
// It records what the apps observe (deliveries, order, properties byte for
// byte, reason codes, flags, session-present) and the two records must be
// equal. Topics under secure/ are protected, topics under plain/ are not;
// most scenarios run on both.

import (
	"context"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/mosquitto"
	"github.com/smqtt/smqtt/internal/mqttc"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

// world is where a scenario's apps connect: host A, host B, and the broker
// itself ("up": an app or device that talks to the broker directly).
type world struct {
	t     *testing.T
	smqtt bool
	up    *mosquitto.Broker
	addr  map[string]string
	sides map[string]*proxy.Sidecar
	rec   []string
	spy   *mqttc.Client // a client of the broker itself, subscribed to secure/#
}

// transparent runs scenario against Mosquitto alone and through smqtt, and
// fails if the two records differ.
func transparent(t *testing.T, scenario func(w *world)) {
	t.Helper()
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed")
	}
	t.Parallel()
	var records [2][]string
	var drops []map[string]int
	for i, through := range []bool{false, true} {
		w := newWorld(t, through)
		scenario(w)
		records[i] = w.rec
		w.checkWire()
		for _, h := range []string{"a", "b"} {
			if sc := w.sides[h]; sc != nil {
				drops = append(drops, sc.DropCounts())
			}
		}
	}
	if !slices.Equal(records[0], records[1]) {
		t.Errorf("through smqtt an app sees something else than with Mosquitto alone (sidecars' drops %v):\n%s", drops, diffRecords(records[0], records[1]))
	} else if len(records[0]) == 0 {
		t.Error("the scenario recorded nothing: it proves nothing")
	}
}

func diffRecords(direct, via []string) string {
	var b strings.Builder
	for i := range max(len(direct), len(via)) {
		d, s := "(none)", "(none)"
		if i < len(direct) {
			d = direct[i]
		}
		if i < len(via) {
			s = via[i]
		}
		mark := "  "
		if d != s {
			mark = "≠ "
		}
		fmt.Fprintf(&b, "%s%-3d mosquitto: %s\n      smqtt:     %s\n", mark, i, d, s)
	}
	return b.String()
}

func newWorld(t *testing.T, through bool) *world {
	t.Helper()
	up, err := mosquitto.Start(t.TempDir())
	must(t, err)
	t.Cleanup(func() { up.Close() })
	w := &world{t: t, smqtt: through, up: up, addr: map[string]string{"a": up.Addr(), "b": up.Addr(), "up": up.Addr()}, sides: map[string]*proxy.Sidecar{}}
	// Both worlds have the spy, so that it changes nothing between them
	// (it makes a publish on secure/ one that has a subscriber).
	spy, _, err := mqttc.Connect(up.Addr(), mqttc.Options{Version: 5, ClientID: "wire-spy", Clean: true})
	must(t, err)
	t.Cleanup(spy.Close)
	if _, err := spy.Subscribe(packets.Properties{}, sub("secure/#", 0)); err != nil {
		t.Fatal(err)
	}
	w.spy = spy
	if !through {
		return w
	}
	r := newRig(t, up)
	for _, host := range []string{"a", "b"} {
		ring := keyclient.NewRing()
		must(t, ring.AddStatic("demo", r.key))
		sc, err := proxy.New(proxy.Options{
			Mode:     proxy.ModeSession,
			Listen:   []string{"tcp://127.0.0.1:0"},
			Upstream: proxy.UpstreamOptions{URL: up.URL(), ClientID: "sidecar-" + host},
			Rules:    testRules,
			Keys:     ring,
			DataDir:  t.TempDir(),
			Queue:    queue.Options{Sync: queue.SyncBatch},
		})
		must(t, err)
		must(t, sc.Start())
		t.Cleanup(func() { sc.Close(context.Background()) })
		w.sides[host] = sc
		w.addr[host] = sc.Addrs()[0].String()
	}
	return w
}

// checkWire fails the test if anything the spy saw on a protected topic
// was not an envelope, or if a scenario that used protected topics showed
// the spy nothing.
func (w *world) checkWire() {
	if !w.smqtt {
		return
	}
	used, seen := false, 0
	for _, r := range w.rec {
		used = used || strings.Contains(r, " secure/")
	}
	for {
		pk, ok := w.spy.Next(100 * time.Millisecond)
		if !ok {
			break
		}
		seen++
		if _, err := envelope.ParseHeader(pk.Payload); err != nil || pk.Properties.ContentType != "" || len(pk.Properties.User) > 0 || len(pk.Properties.CorrelationData) > 0 || pk.Properties.ResponseTopic != "" {
			w.t.Errorf("the broker saw on %s something else than an envelope: %q %+v (%v)", pk.TopicName, pk.Payload, pk.Properties, err)
		}
	}
	if used && seen == 0 {
		w.t.Error("the spy on the broker saw nothing of a scenario on protected topics")
	}
}

// record adds one observation.
func (w *world) record(format string, args ...any) {
	w.rec = append(w.rec, fmt.Sprintf(format, args...))
}

// connect connects a client to host, records its CONNACK and returns it.
func (w *world) connect(host, name string, o mqttc.Options) *mqttc.Client {
	w.t.Helper()
	o.ClientID = name
	c, ack, err := mqttc.Connect(w.addr[host], o)
	if err != nil {
		w.t.Fatalf("%s on %s: %v", name, host, err)
	}
	w.record("%s CONNACK %s", name, describeConnack(ack))
	if c != nil {
		w.t.Cleanup(c.Close)
	}
	return c
}

func describeConnack(ack packets.Packet) string {
	p := ack.Properties
	s := fmt.Sprintf("code 0x%02x present %v", ack.ReasonCode, ack.SessionPresent)
	if p.AssignedClientID != "" {
		s += " assigned-id"
	}
	if p.SessionExpiryIntervalFlag {
		s += fmt.Sprintf(" session-expiry %d", p.SessionExpiryInterval)
	}
	if p.ReceiveMaximum > 0 {
		s += fmt.Sprintf(" receive-max %d", p.ReceiveMaximum)
	}
	if p.TopicAliasMaximum > 0 {
		s += fmt.Sprintf(" topic-alias-max %d", p.TopicAliasMaximum)
	}
	if p.MaximumQosFlag {
		s += fmt.Sprintf(" max-qos %d", p.MaximumQos)
	}
	if p.RetainAvailableFlag {
		s += fmt.Sprintf(" retain %d", p.RetainAvailable)
	}
	if p.WildcardSubAvailableFlag {
		s += fmt.Sprintf(" wildcard %d", p.WildcardSubAvailable)
	}
	if p.SubIDAvailableFlag {
		s += fmt.Sprintf(" subid %d", p.SubIDAvailable)
	}
	if p.SharedSubAvailableFlag {
		s += fmt.Sprintf(" shared %d", p.SharedSubAvailable)
	}
	if p.ServerKeepAliveFlag {
		s += fmt.Sprintf(" keepalive %d", p.ServerKeepAlive)
	}
	return s
}

// describe renders a received PUBLISH: everything an app can observe of
// it except its packet id (the broker's choice). A message expiry is
// recorded as present, and checked against its bound by the scenario.
func describe(pk packets.Packet) string {
	p := pk.Properties
	var props []string
	if p.PayloadFormatFlag {
		props = append(props, fmt.Sprintf("format=%d", p.PayloadFormat))
	}
	if p.ContentType != "" {
		props = append(props, "type="+p.ContentType)
	}
	if p.ResponseTopic != "" {
		props = append(props, "response="+p.ResponseTopic)
	}
	if len(p.CorrelationData) > 0 {
		props = append(props, "correlation="+hex.EncodeToString(p.CorrelationData))
	}
	for _, u := range p.User {
		props = append(props, "user:"+u.Key+"="+u.Val)
	}
	if len(p.SubscriptionIdentifier) > 0 {
		ids := slices.Clone(p.SubscriptionIdentifier)
		slices.Sort(ids)
		props = append(props, fmt.Sprintf("subid=%v", ids))
	}
	if p.MessageExpiryInterval > 0 {
		props = append(props, "expiry")
	}
	return fmt.Sprintf("%s q%d retain=%v dup=%v %q [%s]", pk.TopicName, pk.FixedHeader.Qos, pk.FixedHeader.Retain, pk.FixedHeader.Dup, pk.Payload, strings.Join(props, " "))
}

// publish publishes and records the acknowledgement's reason codes.
func (w *world) publish(c *mqttc.Client, name string, pk packets.Packet) {
	w.t.Helper()
	pk.FixedHeader.Type = packets.Publish
	acks, err := c.PublishAcks(pk)
	if err != nil {
		w.t.Fatalf("%s publish %s: %v", name, pk.TopicName, err)
	}
	switch pk.FixedHeader.Qos {
	case 1:
		w.record("%s PUBACK 0x%02x", name, acks.Puback.ReasonCode)
	case 2:
		w.record("%s PUBREC 0x%02x PUBCOMP 0x%02x", name, acks.Pubrec.ReasonCode, acks.Pubcomp.ReasonCode)
	}
}

func pub(topic string, qos byte, retain bool, payload string) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: retain}, TopicName: topic, Payload: []byte(payload)}
}

// subscribe subscribes and records the SUBACK's codes.
func (w *world) subscribe(c *mqttc.Client, name string, props packets.Properties, subs ...packets.Subscription) {
	w.t.Helper()
	ack, err := c.Subscribe(props, subs...)
	if err != nil {
		w.t.Fatalf("%s subscribe: %v", name, err)
	}
	w.record("%s SUBACK %x", name, ack.ReasonCodes)
}

func sub(filter string, qos byte) packets.Subscription {
	return packets.Subscription{Filter: filter, Qos: qos}
}

// drain records every message c receives until marker arrives (published
// on topic by from; it travels the same path after everything before it).
func (w *world) drain(c *mqttc.Client, name string, from *mqttc.Client, topic string) {
	w.t.Helper()
	marker := "marker-" + topic
	if _, err := from.Publish(pub(topic, 1, false, marker)); err != nil {
		w.t.Fatalf("marker: %v", err)
	}
	w.drainUntil(c, name, marker)
}

// drainUntil records c's messages until one with payload marker.
func (w *world) drainUntil(c *mqttc.Client, name, marker string) {
	w.t.Helper()
	for {
		pk, ok := c.Next(10 * time.Second)
		if !ok {
			w.t.Fatalf("%s: no marker %q within 10 s (%v)", name, marker, c.Err())
		}
		if string(pk.Payload) == marker {
			return
		}
		w.record("%s got %s", name, describe(pk))
	}
}

// nothingFor records whatever c receives in d (it should be nothing).
func (w *world) nothingFor(c *mqttc.Client, name string, d time.Duration) {
	if pk, ok := c.Next(d); ok {
		w.record("%s got %s", name, describe(pk))
	}
}

var v5 = mqttc.Options{Version: 5}

func persistentV5(expiry uint32) mqttc.Options {
	return mqttc.Options{Version: 5, Properties: packets.Properties{SessionExpiryInterval: expiry, SessionExpiryIntervalFlag: true}}
}

var bothTopics = []string{"secure", "plain"}

// TestTransparentPersistentSession311: an MQTT 3.1.1 app with a persistent
// session (clean session 0) gets, when it comes back, what was published
// while it was away; the session-present flag says so.
func TestTransparentPersistentSession311(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				s := w.connect("b", "away", mqttc.Options{Clean: false})
				w.subscribe(s, "away", packets.Properties{}, sub(root+"/x/+", 1))
				s.Disconnect(0, packets.Properties{})
				p := w.connect("a", "pub", mqttc.Options{Clean: true})
				w.publish(p, "pub", pub(root+"/x/y", 1, false, "while away"))
				w.publish(p, "pub", pub(root+"/x/z", 0, false, "qos 0 while away"))
				s = w.connect("b", "away", mqttc.Options{Clean: false})
				w.drain(s, "away", p, root+"/x/m")
			})
		})
	}
}

// TestTransparentIdenticalPayloads: a second message with the same topic
// and payload as the first is delivered like the first, at QoS 0 and 1,
// from an app behind a sidecar and from a client of the broker itself.
func TestTransparentIdenticalPayloads(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				s := w.connect("b", "sensor-reader", mqttc.Options{Clean: true})
				w.subscribe(s, "sensor-reader", packets.Properties{}, sub(root+"/temp", 1))
				p := w.connect("a", "sensor", mqttc.Options{Clean: true})
				for _, q := range []byte{0, 1, 0, 1} {
					w.publish(p, "sensor", pub(root+"/temp", q, false, "21.5"))
				}
				if root == "plain" { // a device on the broker itself
					d := w.connect("up", "device", mqttc.Options{Clean: true})
					w.publish(d, "device", pub(root+"/temp", 1, false, "21.5"))
					w.publish(d, "device", pub(root+"/temp", 0, false, "21.5"))
				}
				w.drain(s, "sensor-reader", p, root+"/temp")
			})
		})
	}
}

// TestTransparentMQTT5Properties: user properties (in their order, a key
// repeated), content type, response topic, correlation data, the payload
// format indicator and the message expiry reach a v5 subscriber as sent; a
// 3.1.1 subscriber of the same message gets none; the PUBACK is success.
func TestTransparentMQTT5Properties(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				s5 := w.connect("b", "v5-sub", v5)
				w.subscribe(s5, "v5-sub", packets.Properties{}, sub(root+"/props", 1))
				s3 := w.connect("b", "v3-sub", mqttc.Options{Clean: true})
				w.subscribe(s3, "v3-sub", packets.Properties{}, sub(root+"/props", 1))
				p := w.connect("a", "v5-pub", v5)
				m := pub(root+"/props", 1, false, `{"t":21.5}`)
				m.Properties = packets.Properties{
					User:            []packets.UserProperty{{Key: "z", Val: "1"}, {Key: "a", Val: "2"}, {Key: "z", Val: "3"}},
					ContentType:     "application/json",
					ResponseTopic:   root + "/reply/7",
					CorrelationData: []byte{0, 1, 0xfe, 0xff},
					PayloadFormat:   1, PayloadFormatFlag: true,
					MessageExpiryInterval: 3600,
				}
				w.publish(p, "v5-pub", m)
				q2 := m
				q2.FixedHeader.Qos = 2
				w.publish(p, "v5-pub", q2)
				w.drain(s5, "v5-sub", p, root+"/props")
				w.drain(s3, "v3-sub", p, root+"/props")
			})
		})
	}
}

// TestTransparentRequestResponse: an MQTT 5 request/response exchange
// through the response topic and correlation data works end to end.
func TestTransparentRequestResponse(t *testing.T) {
	transparent(t, func(w *world) {
		server := w.connect("b", "server", v5)
		w.subscribe(server, "server", packets.Properties{}, sub("secure/rpc/req", 1))
		client := w.connect("a", "client", v5)
		w.subscribe(client, "client", packets.Properties{}, sub("secure/rpc/resp/client", 1))
		req := pub("secure/rpc/req", 1, false, "what time is it")
		req.Properties = packets.Properties{ResponseTopic: "secure/rpc/resp/client", CorrelationData: []byte("call-42")}
		w.publish(client, "client", req)
		got, ok := server.Next(10 * time.Second)
		if !ok {
			w.t.Fatal("no request")
		}
		w.record("server got %s", describe(got))
		resp := pub(got.Properties.ResponseTopic, 1, false, "noon")
		resp.Properties = packets.Properties{CorrelationData: got.Properties.CorrelationData}
		w.publish(server, "server", resp)
		reply, ok := client.Next(10 * time.Second)
		if !ok {
			w.t.Fatal("no response")
		}
		w.record("client got %s", describe(reply))
	})
}

// TestTransparentMessageExpiry: a message published with an expiry
// interval waits for an offline session only that long, and is delivered
// with the interval counted down.
func TestTransparentMessageExpiry(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				s := w.connect("b", "offline", persistentV5(60))
				w.subscribe(s, "offline", packets.Properties{}, sub(root+"/exp", 1))
				s.Disconnect(0, packets.Properties{})
				p := w.connect("a", "pub", v5)
				short, long := pub(root+"/exp", 1, false, "expires in 1 s"), pub(root+"/exp", 1, false, "expires in 60 s")
				short.Properties.MessageExpiryInterval, long.Properties.MessageExpiryInterval = 1, 60
				w.publish(p, "pub", short)
				w.publish(p, "pub", long)
				time.Sleep(2500 * time.Millisecond)
				s = w.connect("b", "offline", persistentV5(60))
				pk, ok := s.Next(10 * time.Second)
				if !ok {
					w.t.Fatal("nothing after the reconnect")
				}
				w.record("offline got %s", describe(pk))
				if e := pk.Properties.MessageExpiryInterval; e == 0 || e > 58 {
					w.t.Errorf("delivered with expiry %d after 2.5 s offline, want it counted down from 60 to at most 58", e)
				}
				w.drain(s, "offline", p, root+"/exp")
			})
		})
	}
}

// TestTransparentSubscriptionOptions: No Local, Retain As Published and
// Retain Handling 0, 1 and 2 behave as with the broker alone.
func TestTransparentSubscriptionOptions(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				p := w.connect("a", "pub", v5)
				w.publish(p, "pub", pub(root+"/opt/state", 1, true, "retained value"))

				self := w.connect("b", "self", v5)
				w.subscribe(self, "self", packets.Properties{}, packets.Subscription{Filter: root + "/opt/#", Qos: 1, NoLocal: true, RetainHandling: 2})
				w.publish(self, "self", pub(root+"/opt/chat", 1, false, "my own, not for me"))
				w.publish(p, "pub", pub(root+"/opt/chat", 1, false, "someone else's"))
				w.drain(self, "self", p, root+"/opt/chat")

				rap := w.connect("b", "rap", v5)
				w.subscribe(rap, "rap", packets.Properties{}, packets.Subscription{Filter: root + "/opt/state", Qos: 1, RetainAsPublished: true})
				plain := w.connect("b", "norap", v5)
				w.subscribe(plain, "norap", packets.Properties{}, packets.Subscription{Filter: root + "/opt/state", Qos: 1})
				w.publish(p, "pub", pub(root+"/opt/state", 1, true, "live retained"))
				w.drain(rap, "rap", p, root+"/opt/state")
				w.drain(plain, "norap", p, root+"/opt/state")

				for rh := byte(0); rh <= 2; rh++ {
					name := fmt.Sprintf("handling-%d", rh)
					c := w.connect("b", name, v5)
					s := packets.Subscription{Filter: root + "/opt/state", Qos: 1, RetainHandling: rh}
					w.subscribe(c, name, packets.Properties{}, s)
					w.subscribe(c, name, packets.Properties{}, s) // again: not a new subscription
					w.drain(c, name, p, root+"/opt/state")
				}
			})
		})
	}
}

// TestTransparentSubscriptionIdentifiersAndOverlaps: overlapping MQTT 5
// subscriptions, with and without identifiers, get what the broker gives
// them (Mosquitto: one copy per subscription); a 3.1.1 app one copy.
func TestTransparentSubscriptionIdentifiersAndOverlaps(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				ids := w.connect("b", "ids", v5)
				w.subscribe(ids, "ids", packets.Properties{SubscriptionIdentifier: []int{7}}, packets.Subscription{Filter: root + "/ov/#", Qos: 1, Identifier: 7})
				w.subscribe(ids, "ids", packets.Properties{SubscriptionIdentifier: []int{9}}, packets.Subscription{Filter: root + "/ov/+/b", Qos: 1, Identifier: 9})
				noids := w.connect("b", "noids", v5)
				w.subscribe(noids, "noids", packets.Properties{}, sub(root+"/ov/#", 1), sub(root+"/ov/a/+", 0))
				v3 := w.connect("b", "v3", mqttc.Options{Clean: true})
				w.subscribe(v3, "v3", packets.Properties{}, sub(root+"/ov/#", 1), sub(root+"/ov/a/+", 1))
				p := w.connect("a", "pub", v5)
				w.publish(p, "pub", pub(root+"/ov/a/b", 1, false, "overlapping"))
				for _, c := range []struct {
					c    *mqttc.Client
					name string
				}{{ids, "ids"}, {noids, "noids"}, {v3, "v3"}} {
					w.drain(c.c, c.name, p, root+"/ov/a/b")
				}
			})
		})
	}
}

// TestTransparentSharedSubscriptionAcrossHosts: a $share group with one
// member behind each sidecar gets each message once, in all.
func TestTransparentSharedSubscriptionAcrossHosts(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				m1 := w.connect("a", "member-1", v5)
				m2 := w.connect("b", "member-2", v5)
				for _, m := range []*mqttc.Client{m1, m2} {
					w.subscribe(m, "member", packets.Properties{}, sub("$share/workers/"+root+"/jobs", 1))
				}
				p := w.connect("a", "pub", v5)
				const n = 40
				for i := range n {
					if _, err := p.Publish(pub(root+"/jobs", 1, false, fmt.Sprintf("job %d", i))); err != nil {
						w.t.Fatal(err)
					}
				}
				got := map[string]int{}
				deadline := time.Now().Add(10 * time.Second)
				for len(got) < n && time.Now().Before(deadline) {
					for _, m := range []*mqttc.Client{m1, m2} {
						if pk, ok := m.Next(20 * time.Millisecond); ok {
							got[string(pk.Payload)]++
						}
					}
				}
				for _, m := range []*mqttc.Client{m1, m2} { // late copies
					for pk, ok := m.Next(200 * time.Millisecond); ok; pk, ok = m.Next(200 * time.Millisecond) {
						got[string(pk.Payload)]++
					}
				}
				dup := 0
				for _, c := range got {
					dup += c - 1
				}
				w.record("the group got %d distinct jobs, %d twice", len(got), dup)
			})
		})
	}
}

// TestTransparentWills: a Will with MQTT 5 properties goes when the
// connection drops, not on a normal DISCONNECT, and with DISCONNECT 0x04;
// a 3.1.1 Will likewise; a delayed Will waits, and a session that resumes
// within the delay cancels it.
func TestTransparentWills(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				watch := w.connect("b", "watcher", v5)
				w.subscribe(watch, "watcher", packets.Properties{}, sub(root+"/will/#", 1))
				will := func(name string, props packets.Properties) *mqttc.Will {
					return &mqttc.Will{Topic: root + "/will/" + name, Payload: []byte(name + " is gone"), QoS: 1, Properties: props}
				}
				rich := packets.Properties{User: []packets.UserProperty{{Key: "reason", Val: "lost"}, {Key: "site", Val: "7"}},
					ContentType: "text/plain", PayloadFormat: 1, PayloadFormatFlag: true, MessageExpiryInterval: 600}

				o := v5
				o.Will = will("dropped", rich)
				w.connect("a", "dropped", o).Close()
				w.drainUntil(watch, "watcher", "dropped is gone")
				w.record("watcher got the dropped Will")

				o.Will = will("polite", rich)
				w.connect("a", "polite", o).Disconnect(0, packets.Properties{})
				o.Will = will("with-will", rich)
				w.connect("a", "with-will", o).Disconnect(0x04, packets.Properties{})
				w.drainUntil(watch, "watcher", "with-will is gone")
				w.record("watcher got the Will of DISCONNECT 0x04")

				o3 := mqttc.Options{Clean: true, Will: will("v3", packets.Properties{})}
				w.connect("a", "v3", o3).Close()
				w.drainUntil(watch, "watcher", "v3 is gone")
				w.record("watcher got the 3.1.1 Will")

				delayed := persistentV5(60)
				delayed.Will = will("delayed", packets.Properties{WillDelayInterval: 2})
				start := time.Now()
				w.connect("a", "delayed", delayed).Close()
				w.nothingFor(watch, "watcher", 1200*time.Millisecond)
				w.drainUntil(watch, "watcher", "delayed is gone")
				w.record("watcher got the delayed Will after at least 2 s: %v", time.Since(start) >= 2*time.Second)

				delayed.Will = will("back", packets.Properties{WillDelayInterval: 2})
				w.connect("a", "back", delayed).Close()
				back := delayed
				back.Will = nil
				w.connect("a", "back", back)
				w.nothingFor(watch, "watcher", 3*time.Second)
			})
		})
	}
}

// TestTransparentAcknowledgements: reason codes of PUBACK, PUBREC/PUBCOMP
// (QoS 2, exactly one delivery), SUBACK (a granted QoS lower than asked)
// and UNSUBACK (a filter never subscribed), for MQTT 5 and 3.1.1 apps.
func TestTransparentAcknowledgements(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				for _, o := range []mqttc.Options{v5, {Clean: true}} {
					name := fmt.Sprintf("v%d", max(o.Version, 4))
					p := w.connect("a", name+"-pub", o)
					m := pub(root+"/ack/"+name, 1, false, "nobody listens")
					m.Properties.User = []packets.UserProperty{{Key: "k", Val: "v"}}
					w.publish(p, name+"-pub", m)
					s := w.connect("b", name+"-sub", o)
					w.subscribe(s, name+"-sub", packets.Properties{}, sub(root+"/ack/"+name, 2), sub(root+"/ack/"+name+"/low", 0))
					w.publish(p, name+"-pub", m)
					w.publish(p, name+"-pub", pub(root+"/ack/"+name, 2, false, "exactly once"))
					w.drain(s, name+"-sub", p, root+"/ack/"+name)
					ack, err := s.Unsubscribe(packets.Properties{}, root+"/ack/"+name, root+"/never/subscribed")
					if err != nil {
						w.t.Fatal(err)
					}
					w.record("%s-sub UNSUBACK %x", name, ack.ReasonCodes)
				}
			})
		})
	}
}

// TestTransparentConnack: session present, the broker's properties, an
// assigned client id, and refusals reach the app as the broker sent them.
func TestTransparentConnack(t *testing.T) {
	transparent(t, func(w *world) {
		w.connect("a", "fresh", persistentV5(30)).Disconnect(0, packets.Properties{})
		w.connect("a", "fresh", persistentV5(30)).Disconnect(0, packets.Properties{})
		w.connect("a", "", v5).Disconnect(0, packets.Properties{})
		w.connect("a", "old-3.1", mqttc.Options{Version: 3, Clean: true}).Disconnect(0, packets.Properties{})
		w.connect("a", "unknown-version", mqttc.Options{Version: 6, Clean: true})
		bad := v5
		bad.Properties.AuthenticationMethod = "SCRAM-SHA-512"
		w.connect("a", "auth-method", bad)
	})
}

// TestTransparentTopicAliases: an MQTT 5 app may publish with topic
// aliases (set, then used alone); subscribers get whole topics.
func TestTransparentTopicAliases(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				s := w.connect("b", "sub", v5)
				w.subscribe(s, "sub", packets.Properties{}, sub(root+"/alias/#", 1))
				o := v5
				p := w.connect("a", "pub", o)
				first := pub(root+"/alias/long/topic/name", 1, false, "with alias set")
				first.Properties.TopicAlias, first.Properties.TopicAliasFlag = 1, true
				w.publish(p, "pub", first)
				again := pub("", 1, false, "by alias only")
				again.Properties.TopicAlias, again.Properties.TopicAliasFlag = 1, true
				w.publish(p, "pub", again)
				w.drain(s, "sub", p, root+"/alias/long/topic/name")
			})
		})
	}
}

// TestTransparentRetainedMessages: a retained value reaches later
// subscribers with the retain flag; clearing it (an empty retained
// publish) leaves nothing for the next ones.
func TestTransparentRetainedMessages(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				p := w.connect("a", "pub", mqttc.Options{Clean: true})
				w.publish(p, "pub", pub(root+"/ret/door", 1, true, "open"))
				late := w.connect("b", "late", mqttc.Options{Clean: true})
				w.subscribe(late, "late", packets.Properties{}, sub(root+"/ret/#", 1))
				w.publish(p, "pub", pub(root+"/ret/door", 1, true, ""))
				w.drain(late, "late", p, root+"/ret/x")
				later := w.connect("b", "later", mqttc.Options{Clean: true})
				w.subscribe(later, "later", packets.Properties{}, sub(root+"/ret/#", 1))
				w.drain(later, "later", p, root+"/ret/x")
			})
		})
	}
}

// TestTransparentMaximumPacketSize: a message larger than an app's
// maximum packet size is not delivered to it; others get it.
func TestTransparentMaximumPacketSize(t *testing.T) {
	for _, root := range bothTopics {
		t.Run(root, func(t *testing.T) {
			transparent(t, func(w *world) {
				small := v5
				small.Properties.MaximumPacketSize = 200
				s := w.connect("b", "small", small)
				w.subscribe(s, "small", packets.Properties{}, sub(root+"/size", 1))
				p := w.connect("a", "pub", v5)
				w.publish(p, "pub", pub(root+"/size", 1, false, strings.Repeat("x", 150)))
				w.publish(p, "pub", pub(root+"/size", 1, false, strings.Repeat("y", 300)))
				w.drain(s, "small", p, root+"/size")
			})
		})
	}
}

// TestTransparentSessionTakeoverAcrossHosts: an app that connects with
// the client id of an app on another host takes its session over, as on
// the broker alone (the broker does it: each app has its own upstream
// client id).
func TestTransparentSessionTakeoverAcrossHosts(t *testing.T) {
	for _, o := range []mqttc.Options{{Clean: false}, persistentV5(60)} {
		t.Run(fmt.Sprintf("v%d", max(o.Version, 4)), func(t *testing.T) {
			transparent(t, func(w *world) {
				first := w.connect("a", "roaming", o)
				w.connect("b", "roaming", o)
				select {
				case <-first.Done():
					d, sent := first.ServerDisconnect()
					w.record("the first connection ended; DISCONNECT sent %v, reason 0x%02x", sent, d.ReasonCode)
				case <-time.After(10 * time.Second):
					w.record("the first connection is still open")
				}
			})
		})
	}
}
