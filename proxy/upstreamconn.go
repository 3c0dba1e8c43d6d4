package proxy

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/smqtt/smqtt/envelope"
)

// The bridge's upstream connection reads through a buffer and coalesces its
// writes. The bridge reads each packet's fixed header a byte at a time and
// writes every packet with a call of its own, from several goroutines: as
// system calls, at a few thousand messages a second, those would be most of
// the bridge's CPU. A batched connection changes how bytes reach the socket,
// never which bytes or in what order, so the ordering and resend guarantees
// (bridge.go) are those of the connection underneath.

const (
	upstreamReadBuffer = 32 << 10
	// upstreamWriteBacklog bounds the bytes written and waiting for the
	// socket; past it Write waits (backpressure, as a full socket would).
	// With the batch the writer holds in a socket write, a connection keeps
	// at most about twice this much.
	upstreamWriteBacklog = 64 << 10
	// closeFlushWait bounds how long Close waits for pending bytes (a
	// DISCONNECT) to reach the socket before it cuts the connection.
	closeFlushWait = time.Second
)

// batchedListener hands out batched connections: the local broker writes
// each PUBACK with a system call of its own, from the client's read loop.
// mochi buffers its reads already.
type batchedListener struct{ net.Listener }

// localWriteTimeout disconnects a local application whose socket takes no
// byte for this long. mochi holds a client's lock while it writes to it and
// takes the same lock to hand out packet ids for deliveries, so one
// application that never reads would otherwise stall delivery to every
// other local application.
const localWriteTimeout = 5 * time.Second

func (l batchedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newBatchedConn(c, 0, localWriteTimeout), nil
}

// dialUpstream opens the upstream connection as paho would, and batches it.
func dialUpstream(u *url.URL, o paho.ClientOptions, readBuffer int) (net.Conn, error) {
	dialer := o.Dialer
	if dialer == nil {
		dialer = &net.Dialer{Timeout: 30 * time.Second}
	}
	var (
		conn net.Conn
		err  error
	)
	switch u.Scheme {
	case "ws", "wss":
		d := *u
		d.User = nil // gorilla websocket refuses URLs with user info
		var tc *tls.Config
		if u.Scheme == "wss" {
			tc = o.TLSConfig
		}
		conn, err = paho.NewWebsocket(d.String(), tc, o.ConnectTimeout, o.HTTPHeaders, o.WebsocketOptions)
	case "mqtt", "tcp":
		conn, err = dialer.Dial("tcp", u.Host)
	case "unix":
		path := u.Host
		if path == "" {
			path = u.Path
		}
		conn, err = dialer.Dial("unix", path)
	case "ssl", "tls", "mqtts", "mqtt+ssl", "tcps":
		conn, err = tls.DialWithDialer(dialer, "tcp", u.Host, o.TLSConfig)
	default:
		return nil, fmt.Errorf("upstream %s: unsupported scheme %q", u.Redacted(), u.Scheme)
	}
	if err != nil {
		return nil, err
	}
	return newBatchedConn(conn, readBuffer, writeTimeout), nil
}

// proxyFromEnvironment reports whether paho would dial through a proxy
// named by the environment; dialUpstream does not, so the bridge then dials
// through the proxy itself (dialBridge).
func proxyFromEnvironment() bool {
	return os.Getenv("ALL_PROXY") != "" || os.Getenv("all_proxy") != ""
}

// growingReaderStart is the read buffer of a growingReader until a read
// fills it.
const growingReaderStart = 2 << 10

// growingReader buffers reads like bufio.Reader, in a buffer that starts
// small and doubles, up to max, each time one read from the socket fills
// it: an idle connection holds a small buffer, a busy one gets few reads.
type growingReader struct {
	r    io.Reader
	buf  []byte
	i, n int // buf[i:n] is buffered
	max  int
}

func (g *growingReader) Read(p []byte) (int, error) {
	if g.i == g.n {
		if len(p) >= len(g.buf) {
			return g.r.Read(p) // as large as the buffer: straight in
		}
		n, err := g.r.Read(g.buf)
		if n == 0 {
			return 0, err
		}
		g.i, g.n = 0, n
		if n == len(g.buf) && len(g.buf) < g.max {
			defer func() { // the next fill goes to a larger buffer
				nb := make([]byte, min(2*len(g.buf), g.max))
				g.n = copy(nb, g.buf[g.i:g.n])
				g.buf, g.i = nb, 0
			}()
		}
	}
	n := copy(p, g.buf[g.i:g.n])
	g.i += n
	return n, nil
}

// packetBuffered reports whether a whole MQTT packet is in the buffer
// already, so that reading it does not wait.
func (g *growingReader) packetBuffered() bool {
	b := g.buf[g.i:g.n]
	if len(b) < 2 {
		return false
	}
	n, size, ok := envelope.ParseVarint(b[1:])
	return ok && len(b) >= 1+size+n
}

// batchedConn is a net.Conn with a read buffer and a writer goroutine that
// hands everything written since its last system call to the socket in the
// next one. Write copies and returns; a failed socket write is returned by
// the next Write and by Read (so paho sees the connection fail), and the
// connection is unusable after it.
type batchedConn struct {
	net.Conn
	r       io.Reader     // Conn, or a buffer over it
	timeout time.Duration // per socket write; 0: the deadline set last

	mu       sync.Mutex
	drained  sync.Cond // pending shrank, or err was set
	pending  []byte
	deadline time.Time // for socket writes, when timeout is 0
	// readDeadline is the read deadline the socket has (SetReadDeadline).
	readDeadline time.Time
	err          error // the first socket write error
	closing      bool
	wake         chan struct{} // a token: pending became non-empty, or closing
	done         chan struct{} // the writer goroutine ended

	// barrier, when set, runs before every socket write; an error fails
	// the connection instead of writing. A local application's
	// acknowledgements wait behind it for the outbound queue's buffered
	// records (see holdAcks).
	barrier atomic.Pointer[func() error]
}

var errConnClosed = errors.New("upstream connection closed")

// newBatchedConn wraps c; readBuffer 0 leaves reads unbuffered (for a
// reader that buffers already); a negative readBuffer is a buffer that
// starts small and grows to -readBuffer bytes once a read fills it (for
// connections that are mostly idle). Each socket write is bounded by
// timeout when it is positive, and otherwise by the last deadline the
// caller set.
func newBatchedConn(c net.Conn, readBuffer int, timeout time.Duration) *batchedConn {
	b := &batchedConn{
		Conn:    c,
		r:       c,
		timeout: timeout,
		wake:    make(chan struct{}, 1),
		done:    make(chan struct{}),
	}
	if readBuffer < 0 {
		b.r = &growingReader{r: c, buf: make([]byte, growingReaderStart), max: -readBuffer}
	} else if readBuffer > 0 {
		b.r = bufio.NewReaderSize(c, readBuffer)
	}
	b.drained.L = &b.mu
	go b.writeLoop()
	return b
}

// packetBuffered reports whether a whole MQTT packet can be read without
// waiting (only for a connection with a growing read buffer).
func (b *batchedConn) packetBuffered() bool {
	g, ok := b.r.(*growingReader)
	return ok && g.packetBuffered()
}

func (b *batchedConn) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil {
		b.mu.Lock()
		if b.err != nil {
			err = b.err // the reader was woken because a write failed
		}
		b.mu.Unlock()
	}
	return n, err
}

func (b *batchedConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.err == nil && !b.closing && len(b.pending) >= upstreamWriteBacklog {
		b.drained.Wait()
	}
	switch {
	case b.err != nil:
		return 0, b.err
	case b.closing:
		return 0, errConnClosed
	}
	if len(b.pending) == 0 {
		b.signal()
	}
	b.pending = append(b.pending, p...)
	return len(p), nil
}

// tryWrite is Write with a bound on the wait: it takes p once fewer than
// limit bytes wait for the socket, and reports false if that takes longer
// than wait (the peer is slow). err is the connection's failure, if it has
// failed.
func (b *batchedConn) tryWrite(p []byte, limit int, wait time.Duration) (bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	timedOut := false
	for b.err == nil && !b.closing && len(b.pending) > 0 && len(b.pending)+len(p) > limit {
		if timedOut || wait <= 0 {
			return false, nil
		}
		t := time.AfterFunc(wait, func() {
			b.mu.Lock()
			timedOut = true
			b.drained.Broadcast()
			b.mu.Unlock()
		})
		defer t.Stop()
		wait = 0 // one timer
		for !timedOut && b.err == nil && !b.closing && len(b.pending)+len(p) > limit {
			b.drained.Wait()
		}
	}
	switch {
	case b.err != nil:
		return false, b.err
	case b.closing:
		return false, errConnClosed
	}
	if len(b.pending) == 0 {
		b.signal()
	}
	b.pending = append(b.pending, p...)
	return true, nil
}

// signal leaves the writer a wake-up token. Callers hold mu.
func (b *batchedConn) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (b *batchedConn) writeLoop() {
	defer close(b.done)
	var out []byte
	for range b.wake {
		for {
			// Let the writers that are running add what they have before
			// the system call: at a high rate that halves the writes.
			runtime.Gosched()
			b.mu.Lock()
			out, b.pending = b.pending, out[:0]
			closing, deadline := b.closing, b.deadline
			b.mu.Unlock()
			if len(out) == 0 {
				if closing {
					return
				}
				break
			}
			var err error
			if f := b.barrier.Load(); f != nil {
				if err = (*f)(); err != nil {
					err = fmt.Errorf("before writing to %s: %w", b.Conn.RemoteAddr(), err)
				}
			}
			if err == nil {
				if b.timeout > 0 {
					deadline = time.Now().Add(b.timeout)
				}
				_ = b.Conn.SetWriteDeadline(deadline)
				_, err = b.Conn.Write(out)
			}
			b.mu.Lock()
			if err != nil {
				b.err = err
				// Wake the reader: paho learns of a broken connection
				// from its reads.
				_ = b.Conn.SetReadDeadline(time.Unix(1, 0))
			}
			b.drained.Broadcast()
			b.mu.Unlock()
			if err != nil {
				return
			}
		}
	}
}

// Close hands what is pending (paho's DISCONNECT) to the socket, waiting
// at most closeFlushWait, then closes the connection.
func (b *batchedConn) Close() error {
	b.mu.Lock()
	if !b.closing {
		b.closing = true
		b.signal()
		b.drained.Broadcast()
	}
	b.mu.Unlock()
	t := time.NewTimer(closeFlushWait)
	defer t.Stop()
	select {
	case <-b.done:
	case <-t.C:
	}
	err := b.Conn.Close()
	<-b.done // a write still in progress fails now
	return err
}

// Deadlines for writes apply to the socket writes that start after they
// are set (and to none when the connection has a timeout of its own). A
// connection whose write failed keeps its reader woken.
func (b *batchedConn) SetDeadline(t time.Time) error {
	_ = b.SetWriteDeadline(t)
	return b.SetReadDeadline(t)
}

// The local broker moves a connection's read deadline (its keep-alive
// limit) forward on every packet, and each move costs a timer update in the
// runtime: a deadline set is pushed a sixteenth of its distance further,
// and a later request that it still covers, by no more than an eighth of
// that request's distance, leaves it alone. The deadline then fires at
// most that much late, never early.
func (b *batchedConn) SetReadDeadline(t time.Time) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return nil
	}
	if !t.IsZero() {
		left := time.Until(t)
		if cur := b.readDeadline; !cur.IsZero() && !t.After(cur) && cur.Sub(t) <= left/8 {
			return nil
		}
		if left > 0 {
			t = t.Add(left / 16)
		}
	}
	b.readDeadline = t
	return b.Conn.SetReadDeadline(t)
}

func (b *batchedConn) SetWriteDeadline(t time.Time) error {
	b.mu.Lock()
	b.deadline = t
	b.mu.Unlock()
	return nil
}
