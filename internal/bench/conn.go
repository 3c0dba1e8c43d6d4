package bench

import (
	"bufio"
	"errors"
	"net"
	"net/url"
	"runtime"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// The benchmark's apps are paho clients, and left alone paho is a slow load
// generator: it reads each packet's fixed header a byte at a time straight
// from the socket (one read(2) per byte: three or four per packet) and
// writes every packet, each PUBACK too, with a write(2) of its own. On
// direct Mosquitto that made the apps, not the broker, the limit (see
// docs/PERFORMANCE.md). The apps' connections therefore read through a
// buffer and coalesce their writes, as the sidecar's own connections do
// (proxy/upstreamconn.go): the bytes and their order are unchanged, only
// how many system calls carry them.

const (
	appReadBuffer   = 64 << 10
	appWriteBacklog = 256 << 10 // past it Write waits, as on a full socket
	appCloseWait    = time.Second
)

// dialApp opens a buffered connection for tcp://, mqtt:// and unix://
// URLs (bufferedScheme); paho dials the others itself.
func dialApp(u *url.URL, o paho.ClientOptions) (net.Conn, error) {
	timeout := o.ConnectTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	d := net.Dialer{Timeout: timeout}
	var (
		c   net.Conn
		err error
	)
	switch u.Scheme {
	case "unix":
		path := u.Host
		if path == "" {
			path = u.Path
		}
		c, err = d.Dial("unix", path)
	default:
		c, err = d.Dial("tcp", u.Host)
	}
	if err != nil {
		return nil, err
	}
	return newAppConn(c), nil
}

// bufferedScheme reports whether dialApp can open a connection for u.
func bufferedScheme(u string) bool {
	p, err := url.Parse(u)
	if err != nil {
		return false
	}
	switch p.Scheme {
	case "tcp", "mqtt", "unix":
		return true
	}
	return false
}

var errAppConnClosed = errors.New("bench: connection closed")

// appConn reads through a buffer; Write copies into a pending buffer that
// a writer goroutine hands to the socket, everything written since its last
// system call in one. A failed socket write fails every later Write and
// closes the socket, so that paho's reader sees the connection end.
type appConn struct {
	net.Conn
	r *bufio.Reader

	mu      sync.Mutex
	drained sync.Cond
	pending []byte
	err     error
	closing bool
	wake    chan struct{}
	done    chan struct{}
}

func newAppConn(c net.Conn) *appConn {
	a := &appConn{
		Conn: c,
		r:    bufio.NewReaderSize(c, appReadBuffer),
		wake: make(chan struct{}, 1),
		done: make(chan struct{}),
	}
	a.drained.L = &a.mu
	go a.writeLoop()
	return a
}

func (a *appConn) Read(p []byte) (int, error) { return a.r.Read(p) }

func (a *appConn) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for a.err == nil && !a.closing && len(a.pending) >= appWriteBacklog {
		a.drained.Wait()
	}
	switch {
	case a.err != nil:
		return 0, a.err
	case a.closing:
		return 0, errAppConnClosed
	}
	if len(a.pending) == 0 {
		select {
		case a.wake <- struct{}{}:
		default:
		}
	}
	a.pending = append(a.pending, p...)
	return len(p), nil
}

func (a *appConn) writeLoop() {
	defer close(a.done)
	var out []byte
	for range a.wake {
		for {
			// Let the goroutines that woke this one write more first:
			// one system call then carries what they wrote meanwhile.
			runtime.Gosched()
			a.mu.Lock()
			out, a.pending = a.pending, out[:0]
			closing := a.closing
			a.mu.Unlock()
			if len(out) == 0 {
				if closing {
					return
				}
				break
			}
			_, err := a.Conn.Write(out)
			a.mu.Lock()
			if err != nil && a.err == nil {
				a.err = err
			}
			a.drained.Broadcast()
			a.mu.Unlock()
			if err != nil {
				_ = a.Conn.Close()
				return
			}
		}
	}
}

// Close hands what is pending (paho's DISCONNECT) to the socket, waiting
// at most appCloseWait, then closes it.
func (a *appConn) Close() error {
	a.mu.Lock()
	if !a.closing {
		a.closing = true
		select {
		case a.wake <- struct{}{}:
		default:
		}
		a.drained.Broadcast()
	}
	a.mu.Unlock()
	t := time.NewTimer(appCloseWait)
	defer t.Stop()
	select {
	case <-a.done:
	case <-t.C:
	}
	err := a.Conn.Close()
	<-a.done
	return err
}

// Write deadlines bound nothing here: paho sets none on the benchmark's
// connections (no write timeout), and a socket write that fails fails the
// connection.
func (a *appConn) SetWriteDeadline(time.Time) error { return nil }

func (a *appConn) SetDeadline(t time.Time) error { return a.Conn.SetReadDeadline(t) }
