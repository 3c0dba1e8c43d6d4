package keyserver

// Cost measures what one join and one leave cost the key server of each
// scheme for a group of n members, with the key server's own code (tree
// updates, sealing, signing, the store's commit) but without a broker: what
// it would publish is counted instead (`smqtt bench rekey --cost` and
// BenchmarkSchemeCost print the figures).

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/smqtt/smqtt/gkd"
)

// CostOptions configure one measurement.
type CostOptions struct {
	Scheme  string // update, lkh or slotted
	Members int    // n, at least 2
	// Batch is how many leaves one rekey gathers (rekey_batch collecting
	// them); the leave figures are per leave. Default 1.
	Batch  int
	Degree int       // lkh; default 4
	Suite  gkd.Suite // members' KEM; default hybrid
	Dir    string    // for the store; default a temporary directory
}

// CostFigures are what one operation cost.
type CostFigures struct {
	Messages    float64       // messages published
	WrappedKeys float64       // keys sent: sealed (update, slotted, join responses) or wrapped (lkh)
	Bytes       float64       // bytes published
	ServerTime  time.Duration // the key server's time for it, its store commit included
}

// CostResult is one scheme at one size.
type CostResult struct {
	Scheme  string
	Members int
	Batch   int
	Join    CostFigures // one member joining
	Leave   CostFigures // per leave, a batch's totals divided by Batch
}

// Cost measures one join into and Batch leaves out of a group of
// o.Members members.
func Cost(o CostOptions) (CostResult, error) {
	if o.Batch <= 0 {
		o.Batch = 1
	}
	if o.Degree == 0 {
		o.Degree = DefaultDegree
	}
	if o.Suite == "" {
		o.Suite = gkd.SuiteHybrid
	}
	switch {
	case o.Scheme != "update" && o.Scheme != "lkh" && o.Scheme != "slotted":
		return CostResult{}, fmt.Errorf("keyserver: cost of scheme %q: want update, lkh or slotted", o.Scheme)
	case o.Members < 2 || o.Batch >= o.Members:
		return CostResult{}, fmt.Errorf("keyserver: cost: %d members and batches of %d leaves: want at least 2 members and fewer leaves than members", o.Members, o.Batch)
	}
	if o.Dir == "" {
		dir, err := os.MkdirTemp("", "smqtt-cost-")
		if err != nil {
			return CostResult{}, err
		}
		defer os.RemoveAll(dir)
		o.Dir = dir
	}
	server, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	if err != nil {
		return CostResult{}, err
	}
	// Every member shares one identity: sealing costs the same for any key,
	// and n identities of their own would cost more to make than to measure.
	member, err := gkd.GenerateIdentity(o.Suite)
	if err != nil {
		return CostResult{}, err
	}
	names := make([]string, o.Members+1) // the last one joins
	pks := make(map[string]*gkd.PublicKey, len(names))
	for i := range names {
		names[i] = fmt.Sprintf("m%06d", i)
		pks[names[i]] = member.Public()
	}
	s, err := New(Options{
		Identity: server, StorePath: filepath.Join(o.Dir, "cost.db"), Members: pks,
		Groups: []GroupConfig{{
			Name: "g", Topics: []string{"t/#"}, Scheme: o.Scheme, Members: names,
			RekeyBatch: time.Hour, RekeyLead: 2 * time.Second, SendGrace: 30 * time.Second, ReceiveRetention: time.Hour,
			Degree: o.Degree, SkewSlots: 1,
		}},
	})
	if err != nil {
		return CostResult{}, err
	}
	defer s.Close()
	var sent []sentMsg
	s.sink = func(topic string, msg []byte) { sent = append(sent, sentMsg{topic, msg}) }

	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.groups[gkd.GroupID(s.id, "g")]
	if err := s.populateLocked(g, names[:o.Members]); err != nil {
		return CostResult{}, err
	}
	r := CostResult{Scheme: o.Scheme, Members: o.Members, Batch: o.Batch}

	joiner := s.byName[names[o.Members]]
	var nonce [16]byte
	sent = sent[:0]
	start := time.Now()
	if o.Scheme == "slotted" {
		s.joinSlottedLocked(g, joiner, nonce)
	} else {
		g.pending = []pendingJoin{{m: joiner, nonce: nonce}}
		s.rekeyNowLocked(g)
	}
	r.Join.ServerTime = time.Since(start)
	if err := tally(&r.Join, sent, server.Public(), member, 1); err != nil {
		return r, err
	}

	sent = sent[:0]
	start = time.Now()
	for i := 0; i < o.Batch; i++ {
		g.leaving[names[i*o.Members/o.Batch]] = true // spread over the tree, not one subtree
	}
	s.storeLeavingLocked(g, "")
	s.rekeyNowLocked(g)
	r.Leave.ServerTime = time.Since(start) / time.Duration(o.Batch)
	if err := tally(&r.Leave, sent, server.Public(), member, o.Batch); err != nil {
		return r, err
	}
	if r.Leave.Messages == 0 {
		return r, errors.New("keyserver: cost: the leave sent nothing")
	}
	return r, nil
}

type sentMsg struct {
	topic string
	msg   []byte
}

// populateLocked makes names members of g at once, as if they had joined
// over time, and commits the group.
func (s *Server) populateLocked(g *group, names []string) error {
	now := time.Now()
	for i, name := range names {
		g.rec.put(name, &joinedMember{Sender: uint64(i + 1), Since: now, Until: now.Add(time.Hour)})
	}
	g.rec.NextSender = uint64(len(names) + 1)
	if g.tree != nil {
		if _, err := g.tree.Rekey(names, nil); err != nil {
			return err
		}
		b, err := g.tree.MarshalBinary()
		if err != nil {
			return err
		}
		g.rec.Tree = b
		syncRoot(g.rec, g.tree)
	}
	return s.store.saveGroup(g.cfg.Name, g.rec)
}

// tally adds up what was sent, opening join responses with the member's
// identity to count the keys they carry, and divides by per.
func tally(f *CostFigures, sent []sentMsg, server *gkd.PublicKey, member *gkd.Identity, per int) error {
	for _, m := range sent {
		msg, err := gkd.Parse(m.msg)
		if err != nil {
			return err
		}
		f.Messages++
		f.Bytes += float64(len(m.msg))
		switch msg.Type {
		case gkd.TypeRekey:
			f.WrappedKeys++
		case gkd.TypeGroupRekey:
			gr, err := gkd.ParseGroupRekey(msg.Body)
			if err != nil {
				return err
			}
			f.WrappedKeys += float64((len(gr.Chunk) - gkd.LKHChunkHeaderSize) / gkd.LKHWrapSize)
		case gkd.TypeJoinResponse:
			if err := msg.Verify(server); err != nil {
				return err
			}
			body, err := member.OpenBody(msg)
			if err != nil {
				return err
			}
			jr, err := gkd.ParseJoinResponse(body)
			if err != nil {
				return err
			}
			f.WrappedKeys += float64(keysIn(jr))
		}
	}
	f.Messages /= float64(per)
	f.Bytes /= float64(per)
	f.WrappedKeys /= float64(per)
	return nil
}

// keysIn counts the keys a join response hands out: the group key, and the
// path keys (lkh) or the grant's cover nodes (slotted) with it.
func keysIn(jr gkd.JoinResponse) int {
	switch jr.Scheme {
	case gkd.SchemeLKH:
		if p, err := gkd.ParseLKHPath(jr.Ext); err == nil {
			return len(p.Keys) // the root, the group key, is the last
		}
	case gkd.SchemeSlotted:
		if g, err := gkd.ParseSlotGrant(jr.Ext); err == nil {
			n := 1 // K2
			for _, c := range g.Covers {
				n += len(c.Nodes)
			}
			return n
		}
	}
	return 1
}
