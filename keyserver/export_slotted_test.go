package keyserver

import "time"

// What slotted_test.go needs from inside the package: the slot the key
// server's own clock is in, which is what a join's grant starts from (a
// member's view of it is off by up to half its join's round trip).

// CurrentSlot returns the absolute slot a slotted group is in now, by the
// key server's clock.
func (s *Server) CurrentSlot(name string) (uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.groups {
		if g.cfg.Name == name && g.rec.Scheme == "slotted" {
			sg := g.clock()
			return sg.SlotAt(time.Now())
		}
	}
	return 0, false
}
