package proxy

import (
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// wsListener accepts MQTT over WebSocket (ws:// and wss:// listeners) as a
// net.Listener of plain byte streams, so that the local broker serves its
// WebSocket clients as it serves TCP ones: through batchedListener, with
// the same write timeout for an application that stops reading. (mochi's
// own WebSocket listener writes without a deadline.)
//
// Like mochi's, it upgrades any path to the "mqtt" subprotocol, and carries
// MQTT in binary messages; a message may hold several packets or part of one
// (MQTT 5 §6.0). Unlike mochi's, it refuses a browser page of another origin
// (an Origin header whose host is not the request's): otherwise any web page
// opened on the host could reach a loopback listener without users.
// Clients other than browsers send no Origin and are accepted.
type wsListener struct {
	ln  net.Listener
	srv *http.Server

	upgraded chan net.Conn // upgraded connections, not yet accepted
	done     chan struct{} // closed by Close

	mu       sync.Mutex
	serving  bool
	closed   bool
	serveEnd chan struct{} // closed when srv.Serve returned
}

// wsHandshakeTimeout bounds the HTTP request and upgrade of a connection.
const wsHandshakeTimeout = 10 * time.Second

var wsUpgrader = websocket.Upgrader{
	HandshakeTimeout: wsHandshakeTimeout,
	Subprotocols:     []string{"mqtt"},
	// nil: gorilla's same-origin check (no Origin header, or its host is
	// the request's Host)
	CheckOrigin: nil,
}

// newWSListener serves WebSocket upgrades on ln (a TLS listener for
// wss://) once Accept is first called.
func newWSListener(ln net.Listener) *wsListener {
	l := &wsListener{
		ln:       ln,
		upgraded: make(chan net.Conn),
		done:     make(chan struct{}),
		serveEnd: make(chan struct{}),
	}
	l.srv = &http.Server{
		Handler:           http.HandlerFunc(l.upgrade),
		ReadHeaderTimeout: wsHandshakeTimeout,
		ErrorLog:          log.New(io.Discard, "", 0), // failed handshakes are the client's business
	}
	return l
}

func (l *wsListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if !l.serving && !l.closed {
		l.serving = true
		go func() {
			defer close(l.serveEnd)
			_ = l.srv.Serve(l.ln) // until Close
		}()
	}
	l.mu.Unlock()
	select {
	case c := <-l.upgraded:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *wsListener) upgrade(w http.ResponseWriter, r *http.Request) {
	c, err := wsUpgrader.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader has answered with an HTTP error
	}
	select {
	case l.upgraded <- &wsConn{Conn: c.NetConn(), ws: c}:
	case <-l.done:
		c.Close()
	}
}

// Close stops accepting. Connections accepted already stay open: the
// local broker closes them.
func (l *wsListener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	close(l.done)
	serving := l.serving
	l.mu.Unlock()
	err := l.srv.Close() // closes ln, and connections not yet upgraded
	if !serving {
		err = l.ln.Close()
	} else {
		<-l.serveEnd
	}
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (l *wsListener) Addr() net.Addr { return l.ln.Addr() }

// wsConn is one WebSocket connection as a byte stream.
type wsConn struct {
	net.Conn // the connection underneath, for addresses
	ws       *websocket.Conn
	r        io.Reader // the current message, nil between messages
}

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			typ, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			if typ != websocket.BinaryMessage {
				return 0, errors.New("websocket: MQTT needs binary messages")
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			err = nil
			if n == 0 {
				continue // an empty message, or the end of one
			}
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) Close() error { return c.ws.Close() }

// Deadlines go to the WebSocket connection: it sets its own write
// deadline on the connection underneath before every frame it writes.
func (c *wsConn) SetDeadline(t time.Time) error {
	_ = c.ws.SetWriteDeadline(t)
	return c.ws.SetReadDeadline(t)
}

func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }
