package keyserver

// What crash_test.go needs from inside the package: the fan-out seam of
// rekeyNowLocked, and a way to abandon a server as a killed process is
// abandoned.

// SetAfterRekeySend installs f as the seam called after each member's
// Rekey of an update rekey is handed to the broker (nil removes it). f runs
// with the server's lock held; returning false ends the fan-out there.
func (s *Server) SetAfterRekeySend(f func(member string) bool) {
	s.mu.Lock()
	s.afterRekeySend = f
	s.mu.Unlock()
}

// CrashLocked leaves the server as a killed process leaves it: nothing
// more is sent, answered or stored, its timers and heartbeats stop, and its
// store file is closed as it stands (what a bbolt commit made durable is
// all there is), which releases the file lock for a restarted server. It
// must be called with the lock held, from the seam. Cutting the network
// under the server first, so that not even a DISCONNECT reaches the broker,
// is the caller's part; the client is then stopped from reconnecting.
func (s *Server) CrashLocked() {
	s.closed = true
	for _, g := range s.groups {
		if g.rekeyAt != nil {
			g.rekeyAt.Stop()
		}
		for _, t := range g.suspended {
			t.Stop()
		}
		if g.rosterTimer != nil {
			g.rosterTimer.Stop()
		}
	}
	c := s.client
	s.client = nil
	if s.stopBeat != nil {
		close(s.stopBeat)
	}
	s.store.close()
	if c != nil {
		go c.Disconnect(0)
	}
}
