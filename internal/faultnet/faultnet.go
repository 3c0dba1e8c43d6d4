// Package faultnet is a loopback TCP relay that tests put between a client
// and a broker to cut connections abruptly, as a network or a crashing
// broker would.
package faultnet

import (
	"io"
	"net"
	"sync"
)

// Relay forwards every connection it accepts to a target address.
type Relay struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	down   bool
	wg     sync.WaitGroup
}

// New starts a relay on a free loopback port that forwards to target.
func New(target string) (*Relay, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &Relay{ln: ln, target: target, conns: make(map[net.Conn]struct{})}
	r.wg.Add(1)
	go r.accept()
	return r, nil
}

// Addr is the relay's host:port; URL is tcp://host:port.
func (r *Relay) Addr() string { return r.ln.Addr().String() }
func (r *Relay) URL() string  { return "tcp://" + r.Addr() }

func (r *Relay) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.mu.Lock()
		down := r.down
		r.mu.Unlock()
		if down {
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		if !r.track(c, up) {
			return
		}
		r.wg.Add(2)
		go r.pipe(c, up)
		go r.pipe(up, c)
	}
}

func (r *Relay) track(cs ...net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		r.conns[c] = struct{}{}
	}
	return true
}

func (r *Relay) pipe(dst, src net.Conn) {
	defer r.wg.Done()
	io.Copy(dst, src)
	dst.Close()
	src.Close()
	r.mu.Lock()
	delete(r.conns, dst)
	delete(r.conns, src)
	r.mu.Unlock()
}

// Cut closes every open connection at once (new ones are still accepted)
// and returns how many it cut.
func (r *Relay) Cut() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for c := range r.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0) // RST, as a crash would
		}
		c.Close()
		n++
	}
	clear(r.conns)
	return n / 2
}

// Down cuts every connection and refuses new ones until Up: the broker is
// unreachable from this relay's clients, and only from them.
func (r *Relay) Down() {
	r.mu.Lock()
	r.down = true
	r.mu.Unlock()
	r.Cut()
}

// Up accepts connections again.
func (r *Relay) Up() {
	r.mu.Lock()
	r.down = false
	r.mu.Unlock()
}

// Close stops the relay and cuts everything.
func (r *Relay) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	err := r.ln.Close()
	r.Cut()
	r.wg.Wait()
	return err
}
