package proxy_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/packets"
	dto "github.com/prometheus/client_model/go"

	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
)

// localListener is one kind of local listener: the URL the sidecar listens
// on, the URL an application connects to, and a raw connection to it: a
// stream to write MQTT to, and the socket underneath.
type localListener struct {
	kind   string
	listen func(t *testing.T) string
	url    func(addr net.Addr) string
	dial   func(t *testing.T, addr net.Addr) (io.Writer, net.Conn)
}

var localListeners = []localListener{
	{"tcp",
		func(*testing.T) string { return "tcp://127.0.0.1:0" },
		func(addr net.Addr) string { return "tcp://" + addr.String() },
		func(t *testing.T, addr net.Addr) (io.Writer, net.Conn) {
			c, err := net.Dial("tcp", addr.String())
			must(t, err)
			return c, c
		}},
	{"unix",
		func(t *testing.T) string { return "unix://" + filepath.Join(t.TempDir(), "local.sock") },
		func(addr net.Addr) string { return "unix://" + addr.String() },
		func(t *testing.T, addr net.Addr) (io.Writer, net.Conn) {
			c, err := net.Dial("unix", addr.String())
			must(t, err)
			return c, c
		}},
	{"ws",
		func(*testing.T) string { return "ws://127.0.0.1:0" },
		func(addr net.Addr) string { return "ws://" + addr.String() },
		func(t *testing.T, addr net.Addr) (io.Writer, net.Conn) {
			d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 5 * time.Second}
			c, _, err := d.Dial("ws://"+addr.String()+"/mqtt", nil)
			must(t, err)
			return wsStream{c}, c.NetConn()
		}},
}

// wsStream writes each call as one binary WebSocket message.
type wsStream struct{ *websocket.Conn }

func (w wsStream) Write(p []byte) (int, error) {
	if err := w.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// TestSubscriberThatNeverReads: a local application subscribes and then
// never reads its socket, over each kind of local listener, in each mode.
// Another application on the same listener keeps getting every message,
// the sidecar keeps relaying, and the stuck one is disconnected.
func TestSubscriberThatNeverReads(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		for _, l := range localListeners {
			t.Run(l.kind, func(t *testing.T) {
				t.Parallel()
				up := embeddedUpstream(t, false)
				r := newModeRig(t, mode, up)
				a := r.sidecar(uniq("a"), "")
				b := r.sidecar(uniq("b"), "", func(o *proxy.Options) { o.Listen = []string{l.listen(t)} })
				addr := b.Addrs()[0]

				stuck, stuckConn := l.dial(t, addr)
				defer stuckConn.Close()
				var buf bytes.Buffer
				connect := packets.Packet{
					FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
					Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 0, ClientIdentifier: uniq("stuck")},
				}
				must(t, connect.ConnectEncode(&buf))
				sub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
					Filters: packets.Subscriptions{{Filter: "#", Qos: 1}}}
				must(t, sub.SubscribeEncode(&buf))
				_, err := stuck.Write(buf.Bytes())
				must(t, err)
				// and from now on it never reads

				healthy, err := mqtttest.Connect(l.url(addr), uniq("healthy"), mqtttest.AppOptions{})
				must(t, err)
				defer healthy.Close()
				must(t, healthy.Subscribe("secure/slow/#", 1))
				pub := r.app(a, uniq("pub"))
				const n = 1000
				payload := bytes.Repeat([]byte("x"), 8000) // 8 MB in all: more than the stuck socket's buffers can take
				for i := 0; i < n; i++ {
					pub.Client.Publish("secure/slow/"+strconv.Itoa(i%10), 1, false, append([]byte(strconv.Itoa(i)+":"), payload...))
				}
				for i := 0; i < n; i++ {
					m, ok := healthy.Next(10 * time.Second)
					if !ok {
						t.Fatalf("the healthy subscriber got %d of %d messages while another never read; drops %v; reconnects a %v b %v", i, n, b.DropCounts(), reconnects(a), reconnects(b))
					}
					if !bytes.HasPrefix(m.Payload, []byte(strconv.Itoa(i)+":")) {
						t.Fatalf("message %d arrived as %.10q; drops %v; reconnects a %v b %v", i, m.Payload, b.DropCounts(), reconnects(a), reconnects(b))
					}
				}
				// the sidecar still relays new traffic
				must(t, pub.Publish("secure/slow/after", 1, false, []byte("after")))
				expect(t, healthy, "secure/slow/after", "after")
				if mode == proxy.ModeSession {
					// The stuck app has an upstream session of its own: the
					// broker holds what it does not read, as it would for the
					// app connected to it directly. The sidecar cuts it only
					// once its socket takes nothing for 5 s; here the
					// kernel's buffers take all 8 MB.
					return
				}
				// and it has cut the stuck one off: what the socket holds ends
				// in a closed connection
				stuckConn.SetReadDeadline(time.Now().Add(10 * time.Second))
				held, err := io.Copy(io.Discard, stuckConn)
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Fatalf("the stuck subscriber is still connected (%d bytes held for it)", held)
				}
				t.Logf("the stuck subscriber was cut off with %d bytes held for it", held)
			})
		}
	})
}

func reconnects(sc *proxy.Sidecar) float64 {
	var m dto.Metric
	sc.Metrics().Reconnects.Write(&m)
	return m.GetCounter().GetValue()
}

// TestSlowSubscriberKeepsMemoryBounded: a local application reads its
// socket slowly (at most 1 kB a millisecond, acknowledging what it reads)
// while 10 MB of QoS 1 messages flow to it and to a fast application on
// the same sidecar. The fast one gets every message in order, and the live
// heap of the whole process (upstream broker, both sidecars, the
// applications; less what the upstream broker's spy keeps) stays bounded:
// what the slow one has not read waits in its socket, in a bounded number
// of pending writes and upstream (backpressure), or it is cut off when it
// makes no progress. Measured on a loaded 2-core machine: 25 to 39 MiB at
// the peak (36 to 57 MiB with 20 MB); the bound leaves room for noise.
func TestSlowSubscriberKeepsMemoryBounded(t *testing.T) {
	const (
		n         = 2500
		size      = 4000     // bytes a message: 10 MB in all, more than the slow socket takes
		maxGrowth = 96 << 20 // bytes
	)
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")

	slow := dialRaw(t, b)
	slow.version = 4
	slow.connect(packets.ConnectParams{ClientIdentifier: uniq("slow"), Clean: true}, packets.Properties{})
	slow.subscribe("secure/flow/#", 1)
	slow.conn.SetReadDeadline(time.Time{})
	var slowGot atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		slowlyReadAndAck(slow.conn, &slowGot)
	}()
	defer func() { slow.conn.Close(); <-done }()

	fast := r.app(b, uniq("fast"))
	must(t, fast.Subscribe("secure/flow/#", 1))
	pub := r.app(a, uniq("pub"))

	up.Spy.Reset()
	base := liveHeap()
	var peak int64
	payload := bytes.Repeat([]byte("x"), size)
	go func() {
		for i := 0; i < n; i++ {
			tok := pub.Client.Publish("secure/flow/"+strconv.Itoa(i%10), 1, false, append([]byte(strconv.Itoa(i)+":"), payload...))
			if i%100 == 99 {
				tok.Wait() // keep the publisher's own store small
			}
		}
	}()
	for i := 0; i < n; i++ {
		m, ok := fast.Next(30 * time.Second)
		if !ok {
			t.Fatalf("the fast subscriber got %d of %d messages; drops %v", i, n, b.DropCounts())
		}
		if !bytes.HasPrefix(m.Payload, []byte(strconv.Itoa(i)+":")) {
			t.Fatalf("the fast subscriber's message %d arrived as %.10q; drops %v", i, m.Payload, b.DropCounts())
		}
		if i%500 == 499 {
			peak = max(peak, int64(liveHeap())-int64(base)-spyBytes(up))
		}
	}
	t.Logf("%d messages of %d bytes: the fast subscriber got all; the slow one read %d meanwhile; live heap growth at most %.1f MiB (bound %d MiB); drops %v",
		n, size, slowGot.Load(), float64(peak)/(1<<20), maxGrowth>>20, b.DropCounts())
	if peak > maxGrowth {
		t.Fatalf("the live heap grew by %.1f MiB with a slow subscriber, bound %d MiB", float64(peak)/(1<<20), maxGrowth>>20)
	}
}

// slowlyReadAndAck reads an MQTT 3.1.1 subscriber's connection at 1 kB a
// millisecond, acknowledging each QoS 1 message, until the connection ends.
func slowlyReadAndAck(conn net.Conn, got *atomic.Int64) {
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	rd := bufio.NewReader(throttledReader{conn, tick.C})
	for {
		h, err := rd.ReadByte()
		if err != nil {
			return
		}
		n, mul := 0, 1
		for {
			c, err := rd.ReadByte()
			if err != nil {
				return
			}
			n += int(c&0x7f) * mul
			if c&0x80 == 0 {
				break
			}
			mul *= 128
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(rd, body); err != nil {
			return
		}
		if h>>4 != packets.Publish {
			continue
		}
		got.Add(1)
		if qos := h >> 1 & 3; qos == 1 && len(body) >= 2 {
			tl := int(body[0])<<8 | int(body[1])
			if len(body) >= tl+4 {
				_, _ = conn.Write([]byte{packets.Puback << 4, 2, body[tl+2], body[tl+3]})
			}
		}
	}
}

// throttledReader reads at most 1 kB a tick.
type throttledReader struct {
	r    io.Reader
	tick <-chan time.Time
}

func (t throttledReader) Read(p []byte) (int, error) {
	<-t.tick
	return t.r.Read(p[:min(len(p), 1024)])
}

// spyBytes is what the upstream broker's spy keeps of the payloads it saw.
func spyBytes(up *embedded.Broker) int64 {
	var n int64
	for _, s := range up.Spy.All() {
		n += int64(cap(s.Payload))
	}
	return n
}

// TestUnixListenerReplacesStaleSocket: a socket file left by a run that did
// not stop cleanly is replaced; any other file at the path is kept, and the
// sidecar refuses to start, releasing the listeners it had opened.
func TestUnixListenerReplacesStaleSocket(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		dir := t.TempDir()

		stale := filepath.Join(dir, "stale.sock")
		ln, err := net.Listen("unix", stale)
		must(t, err)
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
		sc := r.sidecar(uniq("a"), "", func(o *proxy.Options) { o.Listen = []string{"unix://" + stale} })
		app, err := mqtttest.Connect("unix://"+stale, uniq("app"), mqtttest.AppOptions{})
		must(t, err)
		app.Close()
		_ = sc

		regular := filepath.Join(dir, "data")
		must(t, os.WriteFile(regular, []byte("keep me"), 0o600))
		tcpAddr := freeAddr(t)
		_, err = proxy.New(proxy.Options{Listen: []string{"tcp://" + tcpAddr, "unix://" + regular}, Keys: keyclient.NewRing(), DataDir: t.TempDir(),
			Upstream: proxy.UpstreamOptions{URL: up.URL(), ClientID: uniq("b")}})
		if err == nil {
			t.Fatal("a sidecar listened on a path that holds a regular file")
		}
		if got, _ := os.ReadFile(regular); string(got) != "keep me" {
			t.Fatalf("the regular file at the listen path was changed: %q", got)
		}
		again, err := net.Listen("tcp", tcpAddr)
		if err != nil {
			t.Fatalf("the sidecar that failed to start kept its other listener: %v", err)
		}
		again.Close()
	})
}

// TestSecureWebSocketListener: a wss:// listener speaks MQTT over
// WebSocket over TLS with the sidecar's listen certificate.
func TestSecureWebSocketListener(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		ca, caKey := newCA(t)
		cert := issue(t, ca, caKey, "127.0.0.1", false)
		sc := r.sidecar(uniq("a"), "", func(o *proxy.Options) {
			o.Listen = []string{"wss://127.0.0.1:0"}
			o.ListenTLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		})
		roots := x509.NewCertPool()
		roots.AddCert(ca)
		d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 5 * time.Second, TLSClientConfig: &tls.Config{RootCAs: roots}}
		c, _, err := d.Dial("wss://"+sc.Addrs()[0].String()+"/mqtt", nil)
		must(t, err)
		defer c.Close()
		var buf bytes.Buffer
		connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: uniq("wss")}}
		must(t, connect.ConnectEncode(&buf))
		_, err = wsStream{c}.Write(buf.Bytes())
		must(t, err)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, msg, err := c.ReadMessage()
		must(t, err)
		if !bytes.Equal(msg, []byte{packets.Connack << 4, 2, 0, 0}) {
			t.Fatalf("CONNACK over wss: %x", msg)
		}
	})
}

// A web page of another origin cannot open the sidecar's WebSocket listener
// (a browser sends its Origin); MQTT clients without an Origin, and pages of
// the listener's own origin, can.
func TestWebSocketListenerRefusesOtherOrigins(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		sc := r.sidecar(uniq("a"), "", func(o *proxy.Options) { o.Listen = []string{"ws://127.0.0.1:0"} })
		addr := sc.Addrs()[0].String()
		d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 5 * time.Second}
		for _, c := range []struct {
			origin string
			ok     bool
		}{{"", true}, {"http://" + addr, true}, {"http://evil.example", false}} {
			h := http.Header{}
			if c.origin != "" {
				h.Set("Origin", c.origin)
			}
			conn, resp, err := d.Dial("ws://"+addr+"/mqtt", h)
			if c.ok != (err == nil) {
				t.Errorf("origin %q: error %v, want accepted %t", c.origin, err, c.ok)
			}
			if err == nil {
				conn.Close()
			} else if resp == nil || resp.StatusCode != http.StatusForbidden {
				t.Errorf("origin %q refused without 403: %v", c.origin, resp)
			}
		}
	})
}
