package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"
)

// tcpPair is a connected loopback TCP pair.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestBatchedConnDeliversEveryWriteInOrderAndCloseFlushes(t *testing.T) {
	c, s := tcpPair(t)
	b := newBatchedConn(c, upstreamReadBuffer, time.Second)
	var want bytes.Buffer
	got := make(chan []byte, 1)
	go func() {
		all, _ := io.ReadAll(s) // until Close
		got <- all
	}()
	for i := range 20000 {
		p := []byte{byte(i), byte(i >> 8), byte(i >> 16), 0xa5}
		want.Write(p)
		if n, err := b.Write(p); n != len(p) || err != nil {
			t.Fatalf("write %d: %d, %v", i, n, err)
		}
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if all := <-got; !bytes.Equal(all, want.Bytes()) {
		t.Fatalf("peer read %d bytes, want the %d written, in order", len(all), want.Len())
	}
	if _, err := b.Write([]byte("late")); err == nil {
		t.Error("write after Close succeeded")
	}
}

func TestBatchedConnReadsThroughItsBuffer(t *testing.T) {
	c, s := tcpPair(t)
	b := newBatchedConn(c, upstreamReadBuffer, time.Second)
	defer b.Close()
	msg := []byte("\x30\x05a/b/cx") // what paho reads a byte at a time
	if _, err := s.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	for i := range got {
		if _, err := io.ReadFull(b, got[i:i+1]); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, msg) {
		t.Errorf("read %q, want %q", got, msg)
	}
}

// failingConn is a connection whose writes fail.
type failingConn struct{ net.Conn }

var errWriteBroken = errors.New("write broken")

func (failingConn) Write([]byte) (int, error) { return 0, errWriteBroken }

// A failed socket write must reach paho, which learns of a broken
// connection from its blocked Read and from its next Write.
func TestBatchedConnReportsAFailedWriteToTheReaderAndTheNextWrite(t *testing.T) {
	c, _ := net.Pipe()
	b := newBatchedConn(failingConn{c}, upstreamReadBuffer, time.Second)
	defer b.Close()
	readErr := make(chan error, 1)
	go func() {
		_, err := b.Read(make([]byte, 1))
		readErr <- err
	}()
	if _, err := b.Write([]byte("publish")); err != nil {
		t.Fatalf("first write: %v (it fails later, on the socket)", err)
	}
	if err := <-readErr; !errors.Is(err, errWriteBroken) {
		t.Errorf("blocked read returned %v, want the write's error", err)
	}
	<-b.done
	if _, err := b.Write([]byte("next")); !errors.Is(err, errWriteBroken) {
		t.Errorf("next write returned %v, want the write's error", err)
	}
}

// A peer that stops reading holds the writer (backpressure) until the
// socket write times out; the writer then fails rather than piling up bytes.
func TestBatchedConnBlocksWritersWhileThePeerDoesNotRead(t *testing.T) {
	c, _ := net.Pipe() // synchronous: nothing is read, so nothing is written
	b := newBatchedConn(c, 0, 100*time.Millisecond)
	defer b.Close()
	chunk := make([]byte, 4096)
	var err error
	written := 0
	for err == nil && written < 10*upstreamWriteBacklog {
		var n int
		n, err = b.Write(chunk)
		written += n
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("after %d bytes: %v, want the socket write's deadline error", written, err)
	}
	// One batch is stuck in the socket write, the next one waits behind it.
	if limit := 2 * (upstreamWriteBacklog + len(chunk)); written > limit {
		t.Errorf("accepted %d bytes for a peer that reads nothing, want at most %d (the batch in the socket write and the backlog)", written, limit)
	}
}

// The local broker's deadlines bound the socket writes of a listener's
// connections, which have no timeout of their own.
func TestBatchedConnWithoutTimeoutUsesTheCallersWriteDeadline(t *testing.T) {
	c, _ := net.Pipe()
	b := newBatchedConn(c, 0, 0)
	defer b.Close()
	if err := b.SetDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	var err error
	for err == nil {
		_, err = b.Write(make([]byte, 4096))
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("write: %v, want the deadline error", err)
	}
}

// The barrier runs before every socket write: no byte written after it was
// set reaches the peer before it returned. A barrier that fails cuts the
// connection instead of writing.
func TestBatchedConnRunsItsBarrierBeforeEachSocketWrite(t *testing.T) {
	c, s := tcpPair(t)
	b := newBatchedConn(c, 0, time.Second)
	defer b.Close()
	var calls int
	release := make(chan struct{})
	barrier := func() error {
		calls++
		if calls == 1 {
			<-release
		}
		if calls == 3 {
			return errWriteBroken
		}
		return nil
	}
	b.barrier.Store(&barrier)
	if _, err := b.Write([]byte("ack-1")); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, err := s.Read(make([]byte, 16)); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the peer read %d bytes (%v) while the barrier held the write", n, err)
	}
	close(release)
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, 5)
	if _, err := io.ReadFull(s, got); err != nil || string(got) != "ack-1" {
		t.Fatalf("peer read %q, %v after the barrier returned", got, err)
	}
	if _, err := b.Write([]byte("ack-2")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s, got); err != nil || string(got) != "ack-2" {
		t.Fatalf("peer read %q, %v", got, err)
	}
	if _, err := b.Write([]byte("ack-3")); err != nil {
		t.Fatal(err)
	}
	<-b.done // the failed barrier ends the writer
	if _, err := b.Write([]byte("ack-4")); !errors.Is(err, errWriteBroken) {
		t.Errorf("write after a failed barrier: %v, want the barrier's error", err)
	}
	if _, err := b.Read(make([]byte, 1)); !errors.Is(err, errWriteBroken) {
		t.Errorf("read after a failed barrier: %v, want the barrier's error", err)
	}
	s.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := s.Read(got); n != 0 {
		t.Errorf("the peer got %q, written after a failed barrier", got[:n])
	}
}

// tryWrite takes bytes while fewer than its limit wait for the socket,
// waits a bounded time for a slow peer to read, and then gives up without
// taking anything.
func TestBatchedConnTryWriteWaitsBoundedForRoom(t *testing.T) {
	c, s := net.Pipe() // synchronous: bytes leave only as the peer reads them
	b := newBatchedConn(c, 0, 5*time.Second)
	defer b.Close()
	chunk := make([]byte, 1000)
	if ok, err := b.tryWrite(chunk, 1500, 0); !ok || err != nil {
		t.Fatalf("first write: %v, %v", ok, err)
	}
	// Once the writer holds the first chunk in its socket write (which
	// never ends), a second one waits in pending and a third finds no room.
	deadline := time.Now().Add(5 * time.Second)
	for {
		b.mu.Lock()
		taken := len(b.pending) == 0
		b.mu.Unlock()
		if taken {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the writer never took the first chunk")
		}
		runtime.Gosched()
	}
	if ok, err := b.tryWrite(chunk, 1500, 0); !ok || err != nil {
		t.Fatalf("second write: %v, %v", ok, err)
	}
	if ok, err := b.tryWrite(chunk, 1500, 0); ok || err != nil {
		t.Fatalf("third write without waiting: %v, %v; want no room", ok, err)
	}
	start := time.Now()
	if ok, _ := b.tryWrite(chunk, 1500, 50*time.Millisecond); ok {
		t.Fatal("tryWrite took bytes past its limit")
	}
	if waited := time.Since(start); waited < 50*time.Millisecond {
		t.Errorf("gave up after %v, want the 50ms wait", waited)
	}
	go io.Copy(io.Discard, s) // the peer reads again
	if ok, err := b.tryWrite(chunk, 1500, 5*time.Second); !ok || err != nil {
		t.Fatalf("tryWrite once the peer reads: %v, %v", ok, err)
	}
}

// Read deadlines that keep moving forward reach the socket only now and
// then, never earlier than asked; an earlier one or none reaches it at once.
func TestBatchedConnReadDeadlineNeverFiresEarly(t *testing.T) {
	c, s := tcpPair(t)
	b := newBatchedConn(c, 0, time.Second)
	defer b.Close()
	asked := time.Now().Add(time.Hour)
	for i := range 100 {
		asked = time.Now().Add(time.Hour + time.Duration(i)*time.Millisecond)
		if err := b.SetReadDeadline(asked); err != nil {
			t.Fatal(err)
		}
	}
	b.mu.Lock()
	set := b.readDeadline
	b.mu.Unlock()
	if set.Before(asked) || set.Sub(asked) > time.Hour/8 {
		t.Errorf("socket deadline %v after the last one asked, want within [0, 1h/8]", set.Sub(asked))
	}
	if err := b.SetReadDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := b.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read: %v, want the earlier deadline's error", err)
	}
	if waited := time.Since(start); waited > 5*time.Second {
		t.Errorf("an earlier deadline fired after %v", waited)
	}
	if err := b.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	go s.Write([]byte("x"))
	if _, err := b.Read(make([]byte, 1)); err != nil {
		t.Errorf("read without a deadline: %v", err)
	}
}

// TestGrowingReaderReadsEverythingAndGrowsWhenBusy: whatever sizes the
// reads ask for, every byte comes out once and in order; the buffer stays
// small while reads do not fill it and grows (to its maximum, no further)
// when they do.
func TestGrowingReaderReadsEverythingAndGrowsWhenBusy(t *testing.T) {
	data := make([]byte, 200_000)
	for i := range data {
		data[i] = byte(i * 7)
	}
	g := &growingReader{r: bytes.NewReader(data), buf: make([]byte, growingReaderStart), max: 32 << 10}
	var out []byte
	sizes := []int{1, 2, 5, 300, 4096, 70_000, 3}
	for i := 0; len(out) < len(data); i++ {
		p := make([]byte, sizes[i%len(sizes)])
		n, err := g.Read(p)
		if err != nil {
			t.Fatalf("after %d bytes: %v", len(out), err)
		}
		out = append(out, p[:n]...)
	}
	if !bytes.Equal(out, data) {
		t.Fatal("the bytes came out changed or out of order")
	}
	if len(g.buf) != 32<<10 {
		t.Fatalf("a reader whose reads filled its buffer ended with %d bytes of buffer, want the maximum %d", len(g.buf), 32<<10)
	}

	idle := &growingReader{r: bytes.NewReader(data[:100]), buf: make([]byte, growingReaderStart), max: 32 << 10}
	p := make([]byte, 10)
	for {
		if _, err := idle.Read(p); err != nil {
			break
		}
	}
	if len(idle.buf) != growingReaderStart {
		t.Fatalf("a reader that never filled its buffer grew it to %d bytes", len(idle.buf))
	}
}
