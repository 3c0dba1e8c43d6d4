package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
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
