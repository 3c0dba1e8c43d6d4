package proxy

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// fakeBroker accepts the bridge's connections one at a time and lets a
// test read and write packets on the current one.
type fakeBroker struct {
	t     *testing.T
	ln    net.Listener
	conns chan net.Conn
}

func newFakeBroker(t *testing.T) *fakeBroker {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fb := &fakeBroker{t: t, ln: ln, conns: make(chan net.Conn, 4)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fb.conns <- c
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return fb
}

// accept takes the next connection and completes its CONNECT.
func (fb *fakeBroker) accept() net.Conn {
	fb.t.Helper()
	var c net.Conn
	select {
	case c = <-fb.conns:
	case <-time.After(10 * time.Second):
		fb.t.Fatal("the bridge did not connect")
	}
	fb.t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if hdr, _ := fb.read(c); hdr != 0x10 {
		fb.t.Fatalf("first packet %#x, want CONNECT", hdr)
	}
	fb.write(c, []byte{0x20, 2, 0, 0})
	return c
}

func (fb *fakeBroker) read(c net.Conn) (byte, []byte) {
	fb.t.Helper()
	var scratch []byte
	hdr, body, err := readPacket(c, &scratch, false)
	if err != nil {
		fb.t.Fatalf("broker read: %v", err)
	}
	return hdr, bytes.Clone(body)
}

func (fb *fakeBroker) write(c net.Conn, p []byte) {
	fb.t.Helper()
	if _, err := c.Write(p); err != nil {
		fb.t.Fatalf("broker write: %v", err)
	}
}

type bridgeRecorder struct {
	mu    sync.Mutex
	acks  []uint64
	acked chan struct{}
	msgs  chan paho.Message
}

func newTestBridge(t *testing.T, url string) (*bridge, *bridgeRecorder) {
	rec := &bridgeRecorder{acked: make(chan struct{}, 100), msgs: make(chan paho.Message, 100)}
	b := newBridge(UpstreamOptions{URL: url, ClientID: "bridge-test"}, slog.New(slog.DiscardHandler),
		func(id uint64) {
			rec.mu.Lock()
			rec.acks = append(rec.acks, id)
			rec.mu.Unlock()
			rec.acked <- struct{}{}
		},
		func() {}, func(error) {}, func(m paho.Message) { rec.msgs <- m })
	b.connect()
	t.Cleanup(func() { b.disconnect(0) })
	return b, rec
}

func (r *bridgeRecorder) waitAcks(t *testing.T, want ...uint64) {
	t.Helper()
	for {
		r.mu.Lock()
		got := slices.Clone(r.acks)
		r.mu.Unlock()
		if len(got) >= len(want) {
			if !slices.Equal(got, want) {
				t.Fatalf("records released %v, want %v", got, want)
			}
			return
		}
		select {
		case <-r.acked:
		case <-time.After(10 * time.Second):
			t.Fatalf("records released %v, want %v", got, want)
		}
	}
}

func noReseal(p []byte) []byte { return p }

// After a cut, every unacknowledged publish goes out again, in its first
// order and byte for byte but for DUP (a QoS 2 one past PUBREC as its
// PUBREL), before any new publish; a queue record is released only by
// upstream's PUBACK or PUBCOMP.
func TestBridgeResendsUnacknowledgedPublishesInOrder(t *testing.T) {
	fb := newFakeBroker(t)
	b, rec := newTestBridge(t, "tcp://"+fb.ln.Addr().String())
	c1 := fb.accept()
	ctx := context.Background()
	payloads := map[uint64][]byte{11: []byte("one"), 12: []byte("two"), 13: []byte("three"), 14: []byte("four")}
	for _, id := range []uint64{11, 12, 13} {
		if err := b.publishQueued(ctx, id, "t/x", 1, false, payloads[id], noReseal); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.publishQueued(ctx, 14, "t/y", 2, true, payloads[14], noReseal); err != nil {
		t.Fatal(err)
	}
	first := map[uint16][]byte{}
	var ids []uint16
	for range 4 {
		hdr, body := fb.read(c1)
		if hdr>>4 != 3 || hdr&0x08 != 0 {
			t.Fatalf("first write: packet %#x, want a PUBLISH without DUP", hdr)
		}
		m, err := parsePublish(hdr, body, &session{topics: make(topicCache)})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.id)
		first[m.id] = append([]byte{hdr}, body...)
	}
	fb.write(c1, ackPacket(0x40, ids[1])) // PUBACK of record 12, out of order
	rec.waitAcks(t, 12)
	fb.write(c1, ackPacket(0x50, ids[3])) // PUBREC of record 14
	if hdr, body := fb.read(c1); hdr != 0x62 || packetID(body) != ids[3] {
		t.Fatalf("after PUBREC: packet %#x id %d, want PUBREL %d", hdr, packetID(body), ids[3])
	}
	c1.Close()

	c2 := fb.accept()
	for _, want := range []uint16{ids[0], ids[2]} {
		hdr, body := fb.read(c2)
		resent := append([]byte{hdr &^ 0x08}, body...)
		if hdr&0x08 == 0 || !bytes.Equal(resent, first[want]) {
			t.Fatalf("resend of packet %d: %x, want %x with DUP", want, append([]byte{hdr}, body...), first[want])
		}
	}
	if hdr, body := fb.read(c2); hdr != 0x62 || packetID(body) != ids[3] {
		t.Fatalf("third resend: packet %#x id %d, want the PUBREL of %d", hdr, packetID(body), ids[3])
	}
	if err := b.publishQueued(ctx, 15, "t/x", 1, false, []byte("five"), noReseal); err != nil {
		t.Fatal(err)
	}
	hdr, body := fb.read(c2)
	m, err := parsePublish(hdr, body, &session{topics: make(topicCache)})
	if err != nil || string(m.payload) != "five" || m.dup {
		t.Fatalf("after the resends: %#x %q (%v), want the new publish", hdr, body, err)
	}
	fb.write(c2, ackPacket(0x40, ids[0]))
	fb.write(c2, ackPacket(0x40, ids[2]))
	fb.write(c2, ackPacket(0x70, ids[3])) // PUBCOMP
	fb.write(c2, ackPacket(0x40, m.id))
	rec.waitAcks(t, 12, 11, 13, 14, 15)
}

// An upstream publish reaches onMessage at once; its PUBACK is written only
// when the message is acknowledged. A refused subscription is an error.
func TestBridgeAcknowledgesUpstreamPublishesOnlyWhenAsked(t *testing.T) {
	fb := newFakeBroker(t)
	b, rec := newTestBridge(t, "tcp://"+fb.ln.Addr().String())
	c := fb.accept()
	fb.write(c, appendPublish(nil, "in/a", 1, true, 7, []byte("hello")))
	var m paho.Message
	select {
	case m = <-rec.msgs:
	case <-time.After(10 * time.Second):
		t.Fatal("no message delivered")
	}
	if m.Topic() != "in/a" || string(m.Payload()) != "hello" || m.Qos() != 1 || !m.Retained() {
		t.Fatalf("delivered %s %q qos %d retained %v", m.Topic(), m.Payload(), m.Qos(), m.Retained())
	}
	c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatal("the bridge acknowledged a message nobody acknowledged")
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	m.Ack()
	m.Ack() // once only
	if hdr, body := fb.read(c); hdr != 0x40 || packetID(body) != 7 {
		t.Fatalf("after Ack: packet %#x id %d, want PUBACK 7", hdr, packetID(body))
	}

	errc := make(chan error, 1)
	go func() { errc <- b.subscribe("no/such/#", 1) }()
	hdr, body := fb.read(c)
	if hdr != 0x82 {
		t.Fatalf("packet %#x, want SUBSCRIBE", hdr)
	}
	fb.write(c, []byte{0x90, 3, body[0], body[1], 0x80})
	if err := <-errc; err == nil {
		t.Fatal("a refused subscription returned no error")
	}
	c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := io.ReadFull(c, make([]byte, 1)); n != 0 {
		t.Fatal("the second Ack wrote another PUBACK")
	}
}
