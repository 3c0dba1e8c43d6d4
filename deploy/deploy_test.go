package deploy

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/mosquitto"
)

const topicPrefix = "smqtt/v1"

// TestMosquittoACLConfinesMembersToTheirOwnTopics runs mosquitto/acl in a
// real Mosquitto with password authentication, with two members (usernames:
// their member ids) and the key server (username "keyserver"), on the topics
// the key-distribution code itself builds. Every refusal is proven by a
// marker: the refused message would have reached the watcher before a
// genuine one sent after it, so "the next message is the genuine one" shows
// the refused one never arrived, with no waiting for silence.
func TestMosquittoACLConfinesMembersToTheirOwnTopics(t *testing.T) {
	server, _ := newID(t)
	a, userA := newID(t)
	b, userB := newID(t)
	reqA := gkd.RequestTopic(topicPrefix, server, a)
	reqB := gkd.RequestTopic(topicPrefix, server, b)
	uniA := gkd.MemberTopic(topicPrefix, a)
	uniB := gkd.MemberTopic(topicPrefix, b)
	group := gkd.GroupTopic(topicPrefix, gkd.GroupID(server, "demo"))
	policy := gkd.PolicyTopic(topicPrefix, server)

	users := map[string]string{
		"keyserver": "ks-secret",
		userA:       "a-secret",
		userB:       "b-secret",
	}
	url := startMosquittoWithACL(t, users, filepath.Join("mosquitto", "acl"))
	ks := connect(t, url, "keyserver", users["keyserver"])
	memberA := connect(t, url, userA, users[userA])
	memberB := connect(t, url, userB, users[userB])

	ks.mustSubscribe(t, topicPrefix+"/s/#")
	memberA.mustSubscribe(t, uniA, group, policy)
	memberB.mustSubscribe(t, uniB, group, policy)

	t.Run("a member's requests reach the key server", func(t *testing.T) {
		memberA.publish(t, reqA, false, "join")
		ks.expectNext(t, reqA, "join")
	})

	t.Run("a member's Will on its own request topic reaches the key server", func(t *testing.T) {
		dieWithWill(t, url, userA, users[userA], reqA, "will: leave")
		ks.expectNext(t, reqA, "will: leave")
	})

	t.Run("a Will in another member's name is not delivered", func(t *testing.T) {
		// The broker handles the first connection's end before the second
		// connection's CONNECT, so a forged Will would arrive first.
		dieWithWill(t, url, userA, users[userA], reqB, "will: forged leave")
		dieWithWill(t, url, userA, users[userA], reqA, "will: genuine")
		ks.expectNext(t, reqA, "will: genuine")
	})

	t.Run("a member cannot publish in another member's name", func(t *testing.T) {
		memberA.publish(t, reqB, false, "forged leave")
		memberB.publish(t, reqB, false, "genuine")
		ks.expectNext(t, reqB, "genuine")
	})

	t.Run("a member cannot write the key server's topics", func(t *testing.T) {
		cases := []struct {
			name, topic string
			alsoToA     bool // A reads this topic too
		}{
			{"another member's unicast", uniB, false},
			{"a group broadcast", group, true},
			{"the topic policy (retained)", policy, true},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				memberA.publish(t, c.topic, c.topic == policy, "forged")
				ks.publish(t, c.topic, false, "genuine")
				memberB.expectNext(t, c.topic, "genuine")
				if c.alsoToA {
					memberA.expectNext(t, c.topic, "genuine")
				}
			})
		}
	})

	t.Run("a member cannot read another member's unicast", func(t *testing.T) {
		code := memberA.subscribe(t, uniB)
		t.Logf("SUBACK for %s as member A: %#x", uniB, code)
		ks.publish(t, uniB, false, "for B only")
		memberB.expectNext(t, uniB, "for B only")
		ks.publish(t, uniA, false, "for A")
		memberA.expectNext(t, uniA, "for A")
	})

	t.Run("a member cannot read other members' requests", func(t *testing.T) {
		code := memberA.subscribe(t, topicPrefix+"/s/#")
		t.Logf("SUBACK for %s/s/# as member A: %#x", topicPrefix, code)
		memberB.publish(t, reqB, false, "B's request")
		ks.expectNext(t, reqB, "B's request")
		ks.publish(t, uniA, false, "marker")
		memberA.expectNext(t, uniA, "marker")
	})

	t.Run("a member cannot read application topics the operator did not grant", func(t *testing.T) {
		code := memberA.subscribe(t, "secure/#")
		t.Logf("SUBACK for secure/# as member A: %#x", code)
		memberB.publish(t, "secure/x", false, "not granted")
		ks.publish(t, uniA, false, "marker 2")
		memberA.expectNext(t, uniA, "marker 2")
	})
}

// newID makes an identity and returns its member id, raw and as the 16 hex
// characters a member's MQTT username must be.
func newID(t *testing.T) ([8]byte, string) {
	t.Helper()
	id, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	if err != nil {
		t.Fatal(err)
	}
	return id.Public().RawID(), id.Public().ID()
}

// startMosquittoWithACL runs mosquitto on a free loopback port with
// anonymous access off, a password file holding users, and the ACL file at
// aclPath. It skips the test when mosquitto or mosquitto_passwd is missing.
func startMosquittoWithACL(t *testing.T, users map[string]string, aclPath string) string {
	t.Helper()
	bin, ok := mosquitto.Available()
	if !ok {
		t.Skip("mosquitto not installed (.ci/run installs it)")
	}
	passwdBin, err := exec.LookPath("mosquitto_passwd")
	if err != nil {
		t.Skip("mosquitto_passwd not installed (package mosquitto)")
	}
	acl, err := filepath.Abs(aclPath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	passwd := filepath.Join(dir, "passwd")
	first := true
	for user, pass := range users {
		args := []string{"-b", passwd, user, pass}
		if first {
			args = append([]string{"-c"}, args...)
			first = false
		}
		if out, err := exec.Command(passwdBin, args...).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_passwd %s: %v: %s", user, err, out)
		}
	}
	port := freePort(t)
	conf := fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous false\npassword_file %s\nacl_file %s\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n",
		port, passwd, acl)
	if os.Geteuid() == 0 {
		// As root, mosquitto would switch to the "mosquitto" user, which
		// cannot read this test's private directory.
		conf += "user root\n"
	}
	confPath := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", confPath)
	var log strings.Builder
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatalf("start mosquitto: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return "tcp://" + addr
		}
		select {
		case <-done:
			t.Fatalf("mosquitto exited at start: %s", log.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("mosquitto did not listen within 10 s")
		}
	}
}

// dieWithWill connects as user with a Will (QoS 1) on topic and drops the
// connection without DISCONNECT, so that the broker publishes the Will. A
// broker may refuse the connection outright for a Will it does not allow.
func dieWithWill(t *testing.T, url, user, pass, topic, payload string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "tcp://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName:     []byte("MQTT"),
			Clean:            true,
			Keepalive:        30,
			ClientIdentifier: fmt.Sprintf("acl-test-doomed-%d", time.Now().UnixNano()),
			UsernameFlag:     true,
			Username:         []byte(user),
			PasswordFlag:     true,
			Password:         []byte(pass),
			WillFlag:         true,
			WillTopic:        topic,
			WillPayload:      []byte(payload),
			WillQos:          1,
		},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(conn, ack); err != nil || ack[0]>>4 != packets.Connack {
		t.Fatalf("no CONNACK: %v %x", err, ack)
	}
	t.Logf("CONNACK return code with a Will on %s: %#x", topic, ack[3])
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

type message struct{ topic, payload string }

// client is an authenticated MQTT 3.1.1 client that records what it
// receives.
type client struct {
	name  string
	paho  paho.Client
	inbox chan message
}

func connect(t *testing.T, url, user, pass string) *client {
	t.Helper()
	c := &client{name: user, inbox: make(chan message, 100)}
	opts := paho.NewClientOptions().
		AddBroker(url).
		SetClientID(fmt.Sprintf("acl-test-%s-%d", user, time.Now().UnixNano())).
		SetUsername(user).
		SetPassword(pass).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetOrderMatters(true).
		SetConnectTimeout(5 * time.Second).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
			c.inbox <- message{m.Topic(), string(m.Payload())}
		})
	c.paho = paho.NewClient(opts)
	if tok := c.paho.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect as %s: %v", user, tok.Error())
	}
	t.Cleanup(func() { c.paho.Disconnect(50) })
	return c
}

// subscribe subscribes filter at QoS 1 and returns the broker's SUBACK code
// (0x80: refused).
func (c *client) subscribe(t *testing.T, filter string) byte {
	t.Helper()
	tok := c.paho.Subscribe(filter, 1, nil)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("%s: subscribe %s: %v", c.name, filter, tok.Error())
	}
	return tok.(*paho.SubscribeToken).Result()[filter]
}

// mustSubscribe subscribes to filters the ACL grants.
func (c *client) mustSubscribe(t *testing.T, filters ...string) {
	t.Helper()
	for _, f := range filters {
		if code := c.subscribe(t, f); code != 1 {
			t.Fatalf("%s: subscribe %s: SUBACK %#x, want 0x01 (granted)", c.name, f, code)
		}
	}
}

// publish publishes at QoS 1 and waits for the PUBACK: once it is back, the
// broker has routed the message (or refused it).
func (c *client) publish(t *testing.T, topic string, retain bool, payload string) {
	t.Helper()
	tok := c.paho.Publish(topic, 1, retain, payload)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("%s: publish %s: %v", c.name, topic, tok.Error())
	}
}

// expectNext fails unless the next message c receives is payload on topic.
func (c *client) expectNext(t *testing.T, topic, payload string) {
	t.Helper()
	select {
	case m := <-c.inbox:
		if m.topic != topic || m.payload != payload {
			t.Fatalf("%s received %q on %s, want %q on %s", c.name, m.payload, m.topic, payload, topic)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s received nothing within 5 s, want %q on %s", c.name, payload, topic)
	}
}
