package mqttc

import (
	"bytes"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/mosquitto"
)

const wait = 5 * time.Second

// target is a broker the tests run against.
type target struct {
	name string
	addr string
}

// forEachBroker runs f against a fresh embedded mochi broker and, when
// Mosquitto is installed, a fresh Mosquitto.
func forEachBroker(t *testing.T, f func(t *testing.T, b target)) {
	t.Helper()
	t.Run("mochi", func(t *testing.T) {
		b, err := embedded.Start(embedded.Options{})
		if err != nil {
			t.Fatalf("start embedded broker: %v", err)
		}
		t.Cleanup(func() { b.Close() })
		f(t, target{"mochi", b.Addr()})
	})
	t.Run("mosquitto", func(t *testing.T) {
		if _, ok := mosquitto.Available(); !ok {
			t.Skip("mosquitto is not installed")
		}
		b, err := mosquitto.Start(t.TempDir())
		if err != nil {
			t.Fatalf("start mosquitto: %v", err)
		}
		t.Cleanup(func() { b.Close() })
		f(t, target{"mosquitto", b.URL()})
	})
}

var idSeq atomic.Int64

// uid makes client ids and topics unique within the test binary.
func uid(prefix string) string { return fmt.Sprintf("%s-%d", prefix, idSeq.Add(1)) }

func connect(t *testing.T, addr string, o Options) *Client {
	t.Helper()
	c, ack, err := Connect(addr, o)
	if err != nil {
		t.Fatalf("connect %q (v%d): %v", o.ClientID, o.Version, err)
	}
	if c == nil {
		t.Fatalf("connect %q (v%d): refused, CONNACK reason 0x%02x %q", o.ClientID, o.Version, ack.ReasonCode, ack.Properties.ReasonString)
	}
	t.Cleanup(c.Close)
	return c
}

func subscribe(t *testing.T, c *Client, props packets.Properties, subs ...packets.Subscription) packets.Packet {
	t.Helper()
	ack, err := c.Subscribe(props, subs...)
	if err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	if len(ack.ReasonCodes) != len(subs) {
		t.Fatalf("SUBACK has %d reason codes for %d filters", len(ack.ReasonCodes), len(subs))
	}
	for i, s := range subs {
		if ack.ReasonCodes[i] != s.Qos {
			t.Fatalf("SUBACK for %q: reason 0x%02x, want granted QoS %d", s.Filter, ack.ReasonCodes[i], s.Qos)
		}
	}
	// mochi sends the SUBACK before it looks up the retained messages for
	// the new subscription: a message retained meanwhile by another client
	// would come twice, as retained and live.
	barrier(t, c)
	return ack
}

// barrier makes a round trip on c: once it returns, the broker has
// processed everything c sent before, and c has handled everything the
// broker sent before the answer. It is an UNSUBSCRIBE, not a QoS 1
// PUBLISH: mochi 2.7.9 keeps the packet ids of both directions in one
// in-flight map, so the PUBACK of a client's PUBLISH with id n deletes its
// own in-flight message n to that client (and n is then reused while the
// client still holds it). (The UNSUBACK may say 0x91, packet identifier in
// use, for the same reason: the answer is all a barrier needs.)
func barrier(t *testing.T, c *Client) {
	t.Helper()
	if _, err := c.Unsubscribe(packets.Properties{}, "mqttc-barrier"); err != nil {
		t.Fatalf("barrier round trip: %v", err)
	}
}

func next(t *testing.T, c *Client, what string) packets.Packet {
	t.Helper()
	pk, ok := c.Next(wait)
	if !ok {
		t.Fatalf("no PUBLISH (%s) within %v (connection error: %v); received:%s", what, wait, c.Err(), describe(c.Log()))
	}
	return pk
}

func publish(topic string, qos byte, payload string) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:   topic,
		Payload:     []byte(payload),
	}
}

// messageProps encodes the message properties of p (those a broker
// forwards unchanged) with mochi's encoder, for a byte-for-byte comparison.
func messageProps(p packets.Properties) []byte {
	q := packets.Properties{
		PayloadFormat:     p.PayloadFormat,
		PayloadFormatFlag: p.PayloadFormatFlag,
		ContentType:       p.ContentType,
		ResponseTopic:     p.ResponseTopic,
		CorrelationData:   p.CorrelationData,
		User:              p.User,
	}
	var b bytes.Buffer
	q.Encode(packets.Publish, packets.Mods{AllowResponseInfo: true}, &b, 0)
	return b.Bytes()
}

func fullProps() packets.Properties {
	return packets.Properties{
		PayloadFormat:         1,
		PayloadFormatFlag:     true,
		MessageExpiryInterval: 3600,
		ContentType:           "application/json; charset=utf-8",
		ResponseTopic:         "reply/to/me",
		CorrelationData:       []byte{0, 1, 2, 0xfe, 0xff},
		User: []packets.UserProperty{
			{Key: "b", Val: "2"},
			{Key: "a", Val: "1"},
			{Key: "b", Val: "duplicate key, kept in order"},
			{Key: "", Val: ""},
		},
	}
}

func TestConnectSessionPresent(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		for _, v := range []byte{4, 5} {
			t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
				id := uid("sess")
				o := Options{Version: v, ClientID: id, Clean: true}
				if v == 5 {
					o.Properties = packets.Properties{SessionExpiryInterval: 300, SessionExpiryIntervalFlag: true}
				}
				// A clean start. A v5 session outlives its connection for the
				// session expiry (300 s); a 3.1.1 session only if it was begun
				// without Clean Session.
				c := connect(t, b.addr, o)
				if ack := c.Connack(); ack.SessionPresent || ack.ReasonCode != 0 {
					t.Fatalf("clean connect: session present %v reason 0x%02x, want false 0x00", ack.SessionPresent, ack.ReasonCode)
				}
				if err := c.Disconnect(0, packets.Properties{}); err != nil {
					t.Fatalf("disconnect: %v", err)
				}
				o.Clean = false
				c = connect(t, b.addr, o)
				if v == 4 && c.Connack().SessionPresent {
					t.Fatal("3.1.1: first clean=false connect after a clean session: session present true, want false")
				}
				if v == 5 && !c.Connack().SessionPresent {
					t.Fatal("v5: reconnect with clean start false within the session expiry: session present false, want true")
				}
				if err := c.Disconnect(0, packets.Properties{}); err != nil {
					t.Fatalf("disconnect: %v", err)
				}
				if c.Err() != ErrDisconnected {
					t.Fatalf("Err after Disconnect = %v, want ErrDisconnected", c.Err())
				}
				c = connect(t, b.addr, o)
				if !c.Connack().SessionPresent {
					t.Fatal("reconnect of a persistent session: session present false, want true")
				}
				c.Close()
				if c.Err() != ErrClosed {
					t.Fatalf("Err after Close = %v, want ErrClosed", c.Err())
				}
				o.Clean = true
				c = connect(t, b.addr, o)
				if c.Connack().SessionPresent {
					t.Fatal("clean connect over a stored session: session present true, want false")
				}
			})
		}
	})
}

func TestPublishSubscribeV311(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		topic := uid("v311/t")
		sub := connect(t, b.addr, Options{ClientID: uid("sub"), Clean: true})
		pub := connect(t, b.addr, Options{ClientID: uid("pub"), Clean: true})
		if sub.Version() != 4 {
			t.Fatalf("default version %d, want 4", sub.Version())
		}
		subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 2})
		for qos := byte(0); qos <= 2; qos++ {
			payload := fmt.Sprintf("qos %d \x00\xff", qos)
			ack, err := pub.Publish(publish(topic, qos, payload))
			if err != nil {
				t.Fatalf("publish QoS %d: %v", qos, err)
			}
			wantAck := []byte{0, packets.Puback, packets.Pubrec}[qos]
			if ack.FixedHeader.Type != wantAck {
				t.Fatalf("publish QoS %d returned %s, want %s", qos, packets.PacketNames[ack.FixedHeader.Type], packets.PacketNames[wantAck])
			}
			got := next(t, sub, payload)
			if got.TopicName != topic || string(got.Payload) != payload || got.FixedHeader.Qos != qos || got.FixedHeader.Retain || got.FixedHeader.Dup {
				t.Fatalf("QoS %d delivery: topic %q payload %q qos %d retain %v dup %v; want %q %q %d false false",
					qos, got.TopicName, got.Payload, got.FixedHeader.Qos, got.FixedHeader.Retain, got.FixedHeader.Dup, topic, payload, qos)
			}
			if (qos > 0) != (got.PacketID != 0) {
				t.Fatalf("QoS %d delivery has packet id %d", qos, got.PacketID)
			}
		}
		// Order: 50 QoS 1 messages arrive in publishing order.
		for i := range 50 {
			if _, err := pub.Publish(publish(topic, 1, fmt.Sprint(i))); err != nil {
				t.Fatalf("publish %d: %v", i, err)
			}
		}
		for i := range 50 {
			if got := next(t, sub, fmt.Sprint(i)); string(got.Payload) != fmt.Sprint(i) {
				t.Fatalf("delivery %d has payload %q: out of order", i, got.Payload)
			}
		}
		// A 3.1.1 UNSUBACK has no reason codes.
		uack, err := sub.Unsubscribe(packets.Properties{}, topic)
		if err != nil {
			t.Fatalf("unsubscribe: %v", err)
		}
		if uack.FixedHeader.Type != packets.Unsuback || len(uack.ReasonCodes) != 0 {
			t.Fatalf("UNSUBACK %s with reason codes %v, want a 3.1.1 UNSUBACK without", packets.PacketNames[uack.FixedHeader.Type], uack.ReasonCodes)
		}
	})
}

func TestPublishSubscribeV5Properties(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		topic := uid("v5/t")
		sub := connect(t, b.addr, Options{Version: 5, ClientID: uid("sub"), Clean: true, KeepLog: true})
		pub := connect(t, b.addr, Options{Version: 5, ClientID: uid("pub"), Clean: true})
		sack := subscribe(t, sub, packets.Properties{SubscriptionIdentifier: []int{42}},
			packets.Subscription{Filter: topic, Qos: 2})
		if sack.PacketID == 0 {
			t.Fatal("SUBACK without packet id")
		}
		props := fullProps()
		want := messageProps(props)
		// The user properties as encoded on the wire, in order: 0x26 key value...
		userWire := messageProps(packets.Properties{User: props.User})[1:]
		for qos := byte(0); qos <= 2; qos++ {
			pk := publish(topic, qos, fmt.Sprintf("v5 qos %d", qos))
			pk.Properties = props
			a, err := pub.PublishAcks(pk)
			if err != nil {
				t.Fatalf("publish QoS %d: %v", qos, err)
			}
			switch qos {
			case 1:
				// Success is < 0x80; mochi sends the QoS (0x01) where Mosquitto sends 0x00.
				if a.Puback.FixedHeader.Type != packets.Puback || a.Puback.ReasonCode >= 0x80 || a.Puback.PacketID == 0 {
					t.Fatalf("QoS 1: %s reason 0x%02x id %d, want a successful PUBACK", packets.PacketNames[a.Puback.FixedHeader.Type], a.Puback.ReasonCode, a.Puback.PacketID)
				}
			case 2:
				if a.Pubrec.FixedHeader.Type != packets.Pubrec || a.Pubrec.ReasonCode >= 0x80 ||
					a.Pubcomp.FixedHeader.Type != packets.Pubcomp || a.Pubcomp.ReasonCode != 0 ||
					a.Pubrec.PacketID != a.Pubcomp.PacketID || a.Final().FixedHeader.Type != packets.Pubcomp {
					t.Fatalf("QoS 2: PUBREC %v/0x%02x/id %d, PUBCOMP %v/0x%02x/id %d; want both successful, one id",
						a.Pubrec.FixedHeader.Type, a.Pubrec.ReasonCode, a.Pubrec.PacketID, a.Pubcomp.FixedHeader.Type, a.Pubcomp.ReasonCode, a.Pubcomp.PacketID)
				}
			}
			got := next(t, sub, "v5 message")
			if got.TopicName != topic || string(got.Payload) != string(pk.Payload) || got.FixedHeader.Qos != qos {
				t.Fatalf("QoS %d delivery: %q %q qos %d", qos, got.TopicName, got.Payload, got.FixedHeader.Qos)
			}
			if g := messageProps(got.Properties); !bytes.Equal(g, want) {
				t.Fatalf("QoS %d: message properties differ\n got %x %+v\nwant %x %+v", qos, g, got.Properties, want, props)
			}
			if !reflect.DeepEqual(got.Properties.User, props.User) {
				t.Fatalf("QoS %d: user properties %v, want %v in order", qos, got.Properties.User, props.User)
			}
			if e := got.Properties.MessageExpiryInterval; e == 0 || e > 3600 || e < 3600-10 {
				t.Fatalf("QoS %d: message expiry %d, want 3600 less the seconds in transit", qos, e)
			}
			if !reflect.DeepEqual(got.Properties.SubscriptionIdentifier, []int{42}) {
				t.Fatalf("QoS %d: subscription identifiers %v, want [42]", qos, got.Properties.SubscriptionIdentifier)
			}
			// The raw bytes of the delivery hold the user properties as sent
			// and the correlation data verbatim.
			log, raw := sub.Log(), sub.RawLog() // raw may have grown meanwhile
			if len(raw) < len(log) {
				t.Fatalf("raw log out of step with the log (%d vs %d entries)", len(raw), len(log))
			}
			last := len(log) - 1
			for log[last].FixedHeader.Type != packets.Publish { // a PUBREL may follow
				last--
			}
			if !bytes.Contains(raw[last], userWire) || !bytes.Contains(raw[last], append([]byte{packets.PropCorrelationData, 0, 5}, props.CorrelationData...)) {
				t.Fatalf("QoS %d: raw PUBLISH %x lacks the user properties %x or the correlation data as sent", qos, raw[last], userWire)
			}
			if raw[last][0] != packets.Publish<<4|qos<<1 {
				t.Fatalf("QoS %d: raw fixed header 0x%02x", qos, raw[last][0])
			}
		}
		// Without properties no message property is added (mochi adds its
		// default expiry, 86400 s).
		if _, err := pub.Publish(publish(topic, 1, "bare")); err != nil {
			t.Fatalf("publish: %v", err)
		}
		got := next(t, sub, "bare")
		wantExpiry := map[string]uint32{"mochi": 86400}[b.name]
		if g := messageProps(got.Properties); !bytes.Equal(g, []byte{0}) || got.Properties.MessageExpiryInterval != wantExpiry {
			t.Fatalf("a message without properties arrived with %x, expiry %d (want %d)", g, got.Properties.MessageExpiryInterval, wantExpiry)
		}
		// Reason codes below 0x80 other than 0: Mosquitto answers a QoS 1
		// PUBLISH nobody subscribed to with 0x10, mochi with 0x00.
		nobody, err := pub.Publish(publish(uid("nobody"), 1, "unheard"))
		if err != nil {
			t.Fatalf("publish to nobody: %v", err)
		}
		if want := map[string]byte{"mosquitto": 0x10}[b.name]; nobody.ReasonCode != want {
			t.Fatalf("PUBACK for no subscribers: reason 0x%02x, want 0x%02x", nobody.ReasonCode, want)
		}
		// v5 UNSUBACK carries a reason code per filter.
		uack, err := sub.Unsubscribe(packets.Properties{User: []packets.UserProperty{{Key: "k", Val: "v"}}}, topic)
		if err != nil {
			t.Fatalf("unsubscribe: %v", err)
		}
		if !bytes.Equal(uack.ReasonCodes, []byte{0}) {
			t.Fatalf("UNSUBACK reason codes %x, want 00", uack.ReasonCodes)
		}
	})
}

func TestSubscriptionIdentifiers(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		base := uid("subid")
		sub := connect(t, b.addr, Options{Version: 5, ClientID: uid("sub"), Clean: true})
		pub := connect(t, b.addr, Options{Version: 5, ClientID: uid("pub"), Clean: true})
		subscribe(t, sub, packets.Properties{SubscriptionIdentifier: []int{1}}, packets.Subscription{Filter: base + "/a/+", Qos: 1})
		// Identifier taken from the Subscription when props has none.
		subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: base + "/b/#", Qos: 1, Identifier: 268435455})
		subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: base + "/c", Qos: 1})
		for _, c := range []struct {
			topic string
			ids   []int
		}{
			{base + "/a/x", []int{1}},
			{base + "/b/y/z", []int{268435455}},
			{base + "/c", nil},
		} {
			if _, err := pub.Publish(publish(c.topic, 1, c.topic)); err != nil {
				t.Fatalf("publish %s: %v", c.topic, err)
			}
			got := next(t, sub, c.topic)
			if got.TopicName != c.topic {
				t.Fatalf("got %q, want %q", got.TopicName, c.topic)
			}
			if !reflect.DeepEqual(got.Properties.SubscriptionIdentifier, c.ids) && !(len(c.ids) == 0 && len(got.Properties.SubscriptionIdentifier) == 0) {
				t.Fatalf("%s: subscription identifiers %v, want %v", c.topic, got.Properties.SubscriptionIdentifier, c.ids)
			}
		}
	})
}

func TestRetainFlags(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		for _, v := range []byte{4, 5} {
			t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
				topic := uid("retain")
				pub := connect(t, b.addr, Options{Version: v, ClientID: uid("pub"), Clean: true})
				live := connect(t, b.addr, Options{Version: v, ClientID: uid("live"), Clean: true})
				subscribe(t, live, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 1})
				pk := publish(topic, 1, "retained")
				pk.FixedHeader.Retain = true
				if _, err := pub.Publish(pk); err != nil {
					t.Fatalf("publish retained: %v", err)
				}
				// MQTT-3.3.1-9 / MQTT-3.3.1-12: retain 0 on a live delivery.
				if got := next(t, live, "live"); got.FixedHeader.Retain {
					t.Fatal("live delivery to an existing subscription has the retain flag set")
				}
				late := connect(t, b.addr, Options{Version: v, ClientID: uid("late"), Clean: true})
				subscribe(t, late, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 1})
				if got := next(t, late, "retained"); !got.FixedHeader.Retain || string(got.Payload) != "retained" {
					t.Fatalf("retained delivery on subscribe: retain %v payload %q, want true \"retained\"", got.FixedHeader.Retain, got.Payload)
				}
				if v == 5 {
					rap := connect(t, b.addr, Options{Version: v, ClientID: uid("rap"), Clean: true})
					subscribe(t, rap, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 1, RetainAsPublished: true, RetainHandling: 2})
					if _, err := pub.Publish(pk); err != nil {
						t.Fatalf("publish retained: %v", err)
					}
					if got := next(t, rap, "retain as published"); !got.FixedHeader.Retain {
						t.Fatal("retain-as-published subscription: live delivery lost the retain flag")
					}
				}
			})
		}
	})
}

func TestTopicAlias(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		topic := uid("alias/t")
		sub := connect(t, b.addr, Options{Version: 5, ClientID: uid("sub"), Clean: true, KeepLog: true,
			Properties: packets.Properties{TopicAliasMaximum: 10}})
		pub := connect(t, b.addr, Options{Version: 5, ClientID: uid("pub"), Clean: true})
		subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 1})
		// Outgoing: define alias 1, then publish by alias alone.
		first := publish(topic, 1, "one")
		first.Properties.TopicAlias = 1
		second := publish("", 1, "two")
		second.Properties.TopicAlias = 1
		for _, pk := range []packets.Packet{first, second} {
			ack, err := pub.Publish(pk)
			if err != nil || ack.ReasonCode >= 0x80 {
				t.Fatalf("publish %q with topic alias: ack 0x%02x, err %v", pk.Payload, ack.ReasonCode, err)
			}
		}
		for _, want := range []string{"one", "two"} {
			got := next(t, sub, want)
			if got.TopicName != topic || string(got.Payload) != want {
				t.Fatalf("aliased publish delivered as %q %q, want %q %q", got.TopicName, got.Payload, topic, want)
			}
		}
		// Incoming: the log has the PUBLISHes as received, aliases unresolved.
		var received []packets.Packet
		for _, pk := range sub.Log() {
			if pk.FixedHeader.Type == packets.Publish {
				received = append(received, pk)
			}
		}
		if len(received) != 2 {
			t.Fatalf("log has %d PUBLISHes, want 2", len(received))
		}
		if b.name == "mochi" {
			// mochi assigns outbound aliases: the second arrives by alias only.
			if received[1].TopicName != "" || received[1].Properties.TopicAlias == 0 {
				t.Fatalf("mochi's second delivery: topic %q alias %d, want \"\" and an alias", received[1].TopicName, received[1].Properties.TopicAlias)
			}
		}
	})
}

func TestWill(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		for _, v := range []byte{4, 5} {
			t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
				topic := uid("will")
				watch := connect(t, b.addr, Options{Version: v, ClientID: uid("watch"), Clean: true})
				pub := connect(t, b.addr, Options{Version: v, ClientID: uid("pub"), Clean: true})
				subscribe(t, watch, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 1})
				will := &Will{Topic: topic, Payload: []byte("gone"), QoS: 1}
				if v == 5 {
					will.Properties = fullProps()
				}
				o := Options{Version: v, ClientID: uid("mortal"), Clean: true, Will: will}

				// Close without DISCONNECT: the Will is published.
				c := connect(t, b.addr, o)
				c.Close()
				got := next(t, watch, "will after Close")
				if got.TopicName != topic || string(got.Payload) != "gone" || got.FixedHeader.Qos != 1 {
					t.Fatalf("will: %q %q qos %d, want %q \"gone\" 1", got.TopicName, got.Payload, got.FixedHeader.Qos, topic)
				}
				if v == 5 {
					// mochi forwards only the user properties of a Will.
					wantProps := will.Properties
					if b.name == "mochi" {
						wantProps = packets.Properties{User: will.Properties.User}
					}
					if !bytes.Equal(messageProps(got.Properties), messageProps(wantProps)) {
						t.Fatalf("will properties %+v, want %+v", got.Properties, wantProps)
					}
				}

				// DISCONNECT 0: no Will. The marker published afterwards is
				// the next message: nothing came before it.
				c = connect(t, b.addr, o)
				if err := c.Disconnect(0, packets.Properties{}); err != nil {
					t.Fatalf("disconnect: %v", err)
				}
				if _, err := pub.Publish(publish(topic, 1, "marker")); err != nil {
					t.Fatalf("publish marker: %v", err)
				}
				if got := next(t, watch, "marker"); string(got.Payload) != "marker" {
					t.Fatalf("after DISCONNECT 0 the watcher got %q before the marker: the Will was published", got.Payload)
				}

				if v == 5 {
					// DISCONNECT 0x04, "disconnect with Will Message".
					c = connect(t, b.addr, o)
					if err := c.Disconnect(0x04, packets.Properties{}); err != nil {
						t.Fatalf("disconnect 0x04: %v", err)
					}
					if got := next(t, watch, "will after DISCONNECT 0x04"); string(got.Payload) != "gone" {
						t.Fatalf("after DISCONNECT 0x04 got %q, want the Will", got.Payload)
					}
				}
			})
		}
	})
}

func TestManualAcksRedelivery(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		for _, v := range []byte{4, 5} {
			for _, qos := range []byte{1, 2} {
				t.Run(fmt.Sprintf("v%d/qos%d", v, qos), func(t *testing.T) {
					topic := uid("redeliver")
					// 3.1.1 keeps a session only without Clean Session; v5
					// keeps it for the session expiry interval.
					o := Options{Version: v, ClientID: uid("durable"), Clean: v == 5, ManualAcks: true, KeepLog: true}
					if v == 5 {
						o.Properties = packets.Properties{SessionExpiryInterval: 300, SessionExpiryIntervalFlag: true}
					}
					sub := connect(t, b.addr, o)
					if sub.Connack().SessionPresent {
						t.Fatal("new client id: session present true")
					}
					subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: topic, Qos: qos})
					o.Clean = false
					pub := connect(t, b.addr, Options{Version: v, ClientID: uid("pub"), Clean: true})
					pk := publish(topic, qos, "unacked")
					if _, err := pub.Publish(pk); err != nil {
						t.Fatalf("publish: %v", err)
					}
					first := next(t, sub, "first delivery")
					if first.FixedHeader.Dup || string(first.Payload) != "unacked" {
						t.Fatalf("first delivery: dup %v payload %q", first.FixedHeader.Dup, first.Payload)
					}
					sub.Close() // no acknowledgement

					sub = connect(t, b.addr, o)
					if !sub.Connack().SessionPresent {
						t.Fatal("reconnect: session present false, want true")
					}
					barrier(t, sub)
					again := next(t, sub, "redelivery")
					if !again.FixedHeader.Dup || string(again.Payload) != "unacked" || again.FixedHeader.Qos != qos || again.PacketID != first.PacketID {
						t.Fatalf("redelivery: dup %v payload %q qos %d id %d; want dup true %q qos %d id %d",
							again.FixedHeader.Dup, again.Payload, again.FixedHeader.Qos, again.PacketID, "unacked", qos, first.PacketID)
					}
					if err := sub.Ack(again); err != nil {
						t.Fatalf("ack: %v", err)
					}
					if _, err := pub.Publish(publish(topic, qos, "after")); err != nil {
						t.Fatalf("publish: %v", err)
					}
					got := next(t, sub, "after")
					if string(got.Payload) != "after" || got.FixedHeader.Dup {
						t.Fatalf("after the ack got %q dup %v, want \"after\" dup false", got.Payload, got.FixedHeader.Dup)
					}
					if err := sub.Ack(got); err != nil {
						t.Fatalf("ack: %v", err)
					}
					// Both acknowledged: a new connection gets nothing again.
					if err := sub.Disconnect(0, packets.Properties{}); err != nil {
						t.Fatalf("disconnect: %v", err)
					}
					sub = connect(t, b.addr, o)
					if _, err := pub.Publish(publish(topic, qos, "marker")); err != nil {
						t.Fatalf("publish: %v", err)
					}
					if got := next(t, sub, "marker"); string(got.Payload) != "marker" {
						t.Fatalf("acknowledged message %q delivered again", got.Payload)
					}
				})
			}
		}
	})
}

func TestRefusedConnack(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		type refusal struct {
			name string
			o    Options
			want map[string]byte // broker → reason code
		}
		for _, r := range []refusal{
			{"3.1.1 empty client id in a persistent session", Options{Version: 4, Clean: false},
				// 3.1.1 says 0x02; mochi sends its v5 0x80 unmapped.
				map[string]byte{"mosquitto": 0x02, "mochi": 0x80}},
			{"unknown protocol version", Options{Version: 6, ClientID: uid("v6"), Clean: true},
				map[string]byte{"mosquitto": 0x01, "mochi": 0x82}},
			{"v5 unsupported authentication method", Options{Version: 5, ClientID: uid("auth"), Clean: true,
				Properties: packets.Properties{AuthenticationMethod: "SCRAM-NOPE", AuthenticationData: []byte{1}}},
				map[string]byte{"mosquitto": 0x8c}},
			{"v5 password flag without password", Options{Version: 5, ClientID: uid("pw"), Clean: true, PasswordFlag: true},
				map[string]byte{"mochi": 0x82}},
		} {
			want, ok := r.want[b.name]
			if !ok {
				continue
			}
			t.Run(r.name, func(t *testing.T) {
				c, ack, err := Connect(b.addr, r.o)
				if err != nil {
					t.Fatalf("a refusal must not be an error: %v", err)
				}
				if c != nil {
					c.Close()
					t.Fatal("refused connection returned a client")
				}
				if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != want || ack.SessionPresent {
					t.Fatalf("CONNACK %s reason 0x%02x session present %v, want CONNACK 0x%02x false",
						packets.PacketNames[ack.FixedHeader.Type], ack.ReasonCode, ack.SessionPresent, want)
				}
			})
		}
	})
}

func TestConnectErrors(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	if c, _, err := Connect("tcp://"+addr, Options{ClientID: "x", DialTimeout: time.Second}); err == nil || c != nil {
		t.Fatalf("connect to a closed port: client %v err %v, want an error", c != nil, err)
	} else if !strings.Contains(err.Error(), "dial") {
		t.Fatalf("error %q does not say the dial failed", err)
	}
}

func TestServerDisconnect(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		c := connect(t, b.addr, Options{Version: 5, ClientID: uid("bad"), Clean: true})
		// A wildcard in a topic name is a protocol error (MQTT-3.3.2-2).
		if _, err := c.Publish(publish("no/+/wildcards", 0, "x")); err != nil {
			t.Fatalf("publish: %v", err)
		}
		select {
		case <-c.Done():
		case <-time.After(wait):
			t.Fatal("the server did not end the connection")
		}
		d, ok := c.ServerDisconnect()
		if !ok || d.ReasonCode != packets.ErrProtocolViolation.Code {
			t.Fatalf("server DISCONNECT %v reason 0x%02x, want 0x82 protocol error", ok, d.ReasonCode)
		}
		if c.Err() == nil || !strings.Contains(c.Err().Error(), "DISCONNECT, reason 0x82") {
			t.Fatalf("Err %v does not report the server's DISCONNECT", c.Err())
		}
		if _, err := c.Publish(publish("x", 1, "late")); err == nil {
			t.Fatal("publish on an ended connection succeeded")
		}
		if _, ok := c.Next(0); ok {
			t.Fatal("Next on an ended, empty connection returned a message")
		}
	})
}

func TestSessionTakeover(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		o := Options{Version: 5, ClientID: uid("twin"), Clean: true}
		first := connect(t, b.addr, o)
		connect(t, b.addr, o)
		select {
		case <-first.Done():
		case <-time.After(wait):
			t.Fatal("the first connection was not ended by the takeover")
		}
		if first.Err() == nil {
			t.Fatal("ended connection without Err")
		}
		d, ok := first.ServerDisconnect()
		switch b.name {
		case "mochi":
			if !ok || d.ReasonCode != packets.ErrSessionTakenOver.Code {
				t.Fatalf("server DISCONNECT %v reason 0x%02x, want 0x8e session taken over", ok, d.ReasonCode)
			}
		default:
			// Mosquitto 2.0.11 closes without a DISCONNECT; later ones send 0x8e.
			if ok && d.ReasonCode != packets.ErrSessionTakenOver.Code {
				t.Fatalf("server DISCONNECT reason 0x%02x, want 0x8e session taken over", d.ReasonCode)
			}
		}
	})
}

func TestKeepalive(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		topic := uid("ka")
		c := connect(t, b.addr, Options{Version: 5, ClientID: uid("ka"), Clean: true, Keepalive: 1, KeepLog: true})
		subscribe(t, c, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 1})
		// Idle for 2.5 keep-alive periods: both brokers drop a silent client
		// after at most 1.5.
		if pk, ok := c.Next(2500 * time.Millisecond); ok {
			t.Fatalf("unexpected message %q", pk.Payload)
		}
		if err := c.Err(); err != nil {
			t.Fatalf("idle connection ended: %v", err)
		}
		pings := 0
		for _, pk := range c.Log() {
			if pk.FixedHeader.Type == packets.Pingresp {
				pings++
			}
		}
		if pings < 2 {
			t.Fatalf("%d PINGRESPs in 2.5s with a 1s keep alive, want at least 2", pings)
		}
		if _, err := c.Publish(publish(topic, 1, "alive")); err != nil {
			t.Fatalf("publish after idling: %v", err)
		}
		if got := next(t, c, "alive"); string(got.Payload) != "alive" {
			t.Fatalf("got %q", got.Payload)
		}
	})
}

func TestPublishAsyncAndConcurrency(t *testing.T) {
	forEachBroker(t, func(t *testing.T, b target) {
		topic := uid("async")
		sub := connect(t, b.addr, Options{Version: 5, ClientID: uid("sub"), Clean: true})
		pub := connect(t, b.addr, Options{Version: 5, ClientID: uid("pub"), Clean: true})
		subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 2})
		const n = 200
		chans := make([]<-chan Acks, 0, n)
		for i := range n {
			ch, err := pub.PublishAsync(publish(topic, byte(i%3), fmt.Sprint(i)))
			if err != nil {
				t.Fatalf("publish async %d: %v", i, err)
			}
			chans = append(chans, ch)
		}
		for i, ch := range chans {
			a := <-ch
			if a.Err != nil {
				t.Fatalf("publish %d: %v", i, a.Err)
			}
			if want := []byte{0, packets.Puback, packets.Pubcomp}[i%3]; a.Final().FixedHeader.Type != want {
				t.Fatalf("publish %d (QoS %d): final ack %s", i, i%3, packets.PacketNames[a.Final().FixedHeader.Type])
			}
		}
		seen := map[string]bool{}
		for range n {
			got := next(t, sub, "async")
			if seen[string(got.Payload)] {
				t.Fatalf("%q delivered twice", got.Payload)
			}
			seen[string(got.Payload)] = true
		}
	})
}

// rejectHook makes the embedded broker fail the connection on the next
// packets of the given types, unprocessed (as if they were lost with the
// connection), records every packet it reads, and can set the reason code
// of the acknowledgements it sends.
type rejectHook struct {
	mqtt.HookBase
	mu      sync.Mutex
	reject  map[byte]int  // packet type → how many to reject
	rewrite map[byte]byte // packet type → reason code for the next one sent
	read    []packets.Packet
}

func (h *rejectHook) ID() string { return "mqttc-test-reject" }
func (h *rejectHook) Provides(b byte) bool {
	return b == mqtt.OnPacketRead || b == mqtt.OnPacketEncode
}

func (h *rejectHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	h.mu.Lock()
	defer h.mu.Unlock()
	if rc, ok := h.rewrite[pk.FixedHeader.Type]; ok {
		delete(h.rewrite, pk.FixedHeader.Type)
		pk.ReasonCode = rc
	}
	return pk
}

func (h *rejectHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.read = append(h.read, pk)
	if h.reject[pk.FixedHeader.Type] > 0 {
		h.reject[pk.FixedHeader.Type]--
		return pk, packets.ErrRejectPacket
	}
	return pk, nil
}

func (h *rejectHook) arm(typ byte) {
	h.mu.Lock()
	h.reject[typ]++
	h.mu.Unlock()
}

// sent is what the broker read of type typ from the client.
func (h *rejectHook) sent(typ byte) []packets.Packet {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []packets.Packet
	for _, pk := range h.read {
		if pk.FixedHeader.Type == typ {
			out = append(out, pk)
		}
	}
	return out
}

func startRejecting(t *testing.T) (*embedded.Broker, *rejectHook) {
	t.Helper()
	h := &rejectHook{reject: map[byte]int{}, rewrite: map[byte]byte{}}
	b, err := embedded.Start(embedded.Options{Hooks: []mqtt.Hook{h}})
	if err != nil {
		t.Fatalf("start embedded broker: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	return b, h
}

func ofType(log []packets.Packet, typ byte) []packets.Packet {
	var out []packets.Packet
	for _, pk := range log {
		if pk.FixedHeader.Type == typ {
			out = append(out, pk)
		}
	}
	return out
}

func awaitEnd(t *testing.T, c *Client, why string) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(wait):
		t.Fatalf("connection did not end (%s)", why)
	}
}

// The receiving side is exactly-once across a reconnect (MQTT 5 4.3.3
// method B): a QoS 2 PUBLISH whose PUBREC the broker never got is
// retransmitted with DUP; the client that resumes the session answers it
// with PUBREC again and does not deliver it a second time.
func TestExactlyOnceAcrossReconnect(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			b, hook := startRejecting(t)
			topic := uid("once")
			o := Options{Version: v, ClientID: uid("once"), Clean: v == 5, KeepLog: true}
			if v == 5 {
				o.Properties = packets.Properties{SessionExpiryInterval: 300, SessionExpiryIntervalFlag: true}
			}
			sub := connect(t, b.Addr(), o)
			subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 2})
			pub := connect(t, b.Addr(), Options{Version: v, ClientID: uid("pub"), Clean: true})

			hook.arm(packets.Pubrec) // the PUBREC is lost with the connection
			if _, err := pub.Publish(publish(topic, 2, "exactly once")); err != nil {
				t.Fatalf("publish: %v", err)
			}
			first := next(t, sub, "first delivery")
			awaitEnd(t, sub, "broker rejecting the PUBREC")
			sess := sub.Session()
			if !reflect.DeepEqual(sess.AwaitingPubrel, []uint16{first.PacketID}) {
				t.Fatalf("session awaiting PUBREL for %v, want [%d]", sess.AwaitingPubrel, first.PacketID)
			}

			o.Clean, o.Session = false, sess
			sub = connect(t, b.Addr(), o)
			if !sub.Connack().SessionPresent {
				t.Fatal("reconnect: session present false")
			}
			// mochi retransmits after the CONNACK and before it reads from the
			// connection: a round trip waits for the retransmission (a marker
			// published earlier would be caught in it and come twice).
			barrier(t, sub)
			if _, err := pub.Publish(publish(topic, 1, "marker")); err != nil {
				t.Fatalf("publish marker: %v", err)
			}
			if got := next(t, sub, "marker"); string(got.Payload) != "marker" {
				t.Fatalf("after the reconnect got %q dup %v before the marker: delivered twice", got.Payload, got.FixedHeader.Dup)
			}
			barrier(t, sub)
			// The retransmission did arrive, and was acknowledged and released.
			pubs := ofType(sub.Log(), packets.Publish)
			if len(pubs) < 2 || !pubs[0].FixedHeader.Dup || pubs[0].PacketID != first.PacketID || string(pubs[0].Payload) != "exactly once" {
				t.Fatalf("the broker's first PUBLISH after the reconnect was not the DUP retransmission of id %d: %s", first.PacketID, describe(sub.Log()))
			}
			rels := ofType(sub.Log(), packets.Pubrel)
			if len(rels) == 0 || rels[0].PacketID != first.PacketID {
				t.Fatalf("no PUBREL for id %d after the retransmission", first.PacketID)
			}
			recs := hook.sent(packets.Pubrec)
			if len(recs) < 2 || recs[1].PacketID != first.PacketID {
				t.Fatalf("the client did not answer the retransmission with a PUBREC for id %d", first.PacketID)
			}
			if s := sub.Session(); len(s.AwaitingPubrel) != 0 {
				t.Fatalf("session still awaits PUBREL for %v after PUBCOMP", s.AwaitingPubrel)
			}
		})
	}
}

// A PUBREL for a packet id the client does not know is answered with
// PUBCOMP, reason 0x92 (Packet Identifier not found) in MQTT 5.
func TestPubrelForUnknownID(t *testing.T) {
	for _, v := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			b, hook := startRejecting(t)
			topic := uid("rel")
			o := Options{Version: v, ClientID: uid("rel"), Clean: v == 5, KeepLog: true}
			if v == 5 {
				o.Properties = packets.Properties{SessionExpiryInterval: 300, SessionExpiryIntervalFlag: true}
			}
			sub := connect(t, b.Addr(), o)
			subscribe(t, sub, packets.Properties{}, packets.Subscription{Filter: topic, Qos: 2})
			pub := connect(t, b.Addr(), Options{Version: v, ClientID: uid("pub"), Clean: true})

			hook.arm(packets.Pubcomp) // the PUBCOMP is lost with the connection
			if _, err := pub.Publish(publish(topic, 2, "released")); err != nil {
				t.Fatalf("publish: %v", err)
			}
			first := next(t, sub, "first delivery")
			awaitEnd(t, sub, "broker rejecting the PUBCOMP")

			o.Clean = false // and no Session: the id is unknown
			sub = connect(t, b.Addr(), o)
			if !sub.Connack().SessionPresent {
				t.Fatal("reconnect: session present false")
			}
			// mochi retransmits after the CONNACK and before it reads from the
			// connection: a round trip waits for the retransmission (a marker
			// published earlier would be caught in it and come twice).
			barrier(t, sub)
			if _, err := pub.Publish(publish(topic, 1, "marker")); err != nil {
				t.Fatalf("publish marker: %v", err)
			}
			if got := next(t, sub, "marker"); string(got.Payload) != "marker" {
				t.Fatalf("got %q before the marker", got.Payload)
			}
			barrier(t, sub)
			rels := ofType(sub.Log(), packets.Pubrel)
			if len(rels) == 0 || rels[0].PacketID != first.PacketID {
				t.Fatalf("the broker did not retransmit the PUBREL for id %d", first.PacketID)
			}
			comps := hook.sent(packets.Pubcomp)
			var answer *packets.Packet
			for i := range comps {
				if comps[i].PacketID == first.PacketID {
					answer = &comps[i] // the last one: the answer after the reconnect
				}
			}
			if answer == nil || len(comps) < 2 {
				t.Fatalf("no PUBCOMP for id %d after the reconnect (broker read %d PUBCOMPs); client log %s", first.PacketID, len(comps), describe(sub.Log()))
			}
			want := byte(0)
			if v == 5 {
				want = packets.ErrPacketIdentifierNotFound.Code
			}
			if answer.ReasonCode != want {
				t.Fatalf("PUBCOMP for unknown id: reason 0x%02x, want 0x%02x", answer.ReasonCode, want)
			}
			if err := sub.Err(); err != nil {
				t.Fatalf("connection ended: %v", err)
			}
		})
	}
}

// describe lists packets for failure messages.
func describe(log []packets.Packet) string {
	var b strings.Builder
	for _, pk := range log {
		fmt.Fprintf(&b, "\n  %s id %d dup %v reason 0x%02x topic %q payload %q", packets.PacketNames[pk.FixedHeader.Type], pk.PacketID, pk.FixedHeader.Dup, pk.ReasonCode, pk.TopicName, pk.Payload)
	}
	return b.String()
}

// A PUBREC with a reason code >= 0x80 ends the QoS 2 flow: Publish returns
// it, and no PUBREL follows. A PUBACK's reason code is returned as sent.
func TestRefusingAcks(t *testing.T) {
	b, hook := startRejecting(t)
	c := connect(t, b.Addr(), Options{Version: 5, ClientID: uid("refused"), Clean: true})
	topic := uid("refused")

	hook.mu.Lock()
	hook.rewrite[packets.Pubrec] = packets.ErrQuotaExceeded.Code
	hook.mu.Unlock()
	a, err := c.PublishAcks(publish(topic, 2, "refused"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if a.Pubrec.FixedHeader.Type != packets.Pubrec || a.Pubrec.ReasonCode != 0x97 || a.Pubcomp.FixedHeader.Type != 0 {
		t.Fatalf("refused QoS 2: PUBREC reason 0x%02x, PUBCOMP %v; want PUBREC 0x97 and no PUBCOMP", a.Pubrec.ReasonCode, a.Pubcomp.FixedHeader.Type != 0)
	}
	if a.Final().ReasonCode != 0x97 {
		t.Fatalf("Final of a refused flow: reason 0x%02x", a.Final().ReasonCode)
	}
	barrier(t, c)
	if rels := hook.sent(packets.Pubrel); len(rels) != 0 {
		t.Fatalf("the client sent PUBREL for id %d after a refusing PUBREC", rels[0].PacketID)
	}

	hook.mu.Lock()
	hook.rewrite[packets.Puback] = packets.ErrPayloadFormatInvalid.Code
	hook.mu.Unlock()
	ack, err := c.Publish(publish(topic, 1, "refused too"))
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if ack.FixedHeader.Type != packets.Puback || ack.ReasonCode != 0x99 {
		t.Fatalf("PUBACK reason 0x%02x, want 0x99", ack.ReasonCode)
	}
}
