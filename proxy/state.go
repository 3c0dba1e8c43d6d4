package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/internal/durable"
	"github.com/smqtt/smqtt/proxy/queue"
)

// maxSendersPerGroup bounds the replay windows kept per group (about 1 KiB
// each). Past it the least recently heard sender is forgotten; with a key
// server, windows go anyway when their epoch is retired.
const maxSendersPerGroup = 4096

// senderKey names one replay window: sequence numbers restart at 1 in every
// epoch, so a window belongs to a (group, epoch, sender).
type senderKey struct {
	group  string
	epoch  uint32
	sender uint64
}

type senderWindow struct {
	// The window itself. While shared, the floors of sessions begun since
	// it last changed point to it too (session mode, sessionstate.go): it is
	// copied before it changes again (own).
	*envelope.ReplayWindow
	shared  bool
	lastUse uint64
}

// own makes w's window its own to change.
func (w *senderWindow) own() {
	if w.shared {
		c := *w.ReplayWindow
		w.ReplayWindow, w.shared = &c, false
	}
}

// retainedTriple identifies a sealed retained value.
type retainedTriple struct {
	Epoch  uint32
	Sender uint64
	Seq    uint64
}

// replayState is the inbound state that must survive a restart: each
// sender's replay window and each protected topic's retained register, and
// the local persistent sessions with the messages held for them (kept). It
// is kept in memory; what changed is appended to inbound.log
// (inboundlog.go), once per inbound batch, before the batch is delivered
// and acknowledged upstream.
type replayState struct {
	dir     string
	sync    queue.Sync
	log     *os.File
	size    int64 // bytes in the log
	base    int64 // its size right after the last compaction
	rewrite bool  // a write failed: the next commit compacts

	mu       sync.Mutex
	clock    uint64
	windows  map[senderKey]*senderWindow
	perGroup map[string]int
	retained map[string]retainedTriple

	// Session mode (sessionstate.go).
	sessions     map[string]*sessionState // by upstream client id
	sessionsByID map[uint64]*sessionState // the logged ones, by log id
	willsSeen    map[retainedTriple]uint64
	// retainedHist holds the latest values of each retained topic with the
	// generation they came in; retainedLoaded the values loaded from the
	// log (older than every generation of this process).
	retainedHist    map[string][]retainedVersion
	retainedTrimmed map[string]bool
	retainedLoaded  map[string]retainedTriple
	gen             uint64 // host generation: sessions begun so far
	lastSID         uint64
	connections     uint64
	lastExpiry      time.Time

	pend    []byte    // frames of changes not yet written
	runKey  senderKey // the key of the accepted frame still open at pend's end
	runAt   int       // where that frame starts in pend; -1 if none is open
	runSeqs int       // where its sequence numbers start in pend
	wbuf    []byte    // pend's contents while commit writes them
	torn    int       // bytes cut off the log's end when it was loaded

	kept *keptSessions // its own lock, taken after mu

	stop     chan struct{}
	done     chan struct{}
	commitMu sync.Mutex  // one commit at a time: the inbound worker's, or close's
	syncMu   sync.Mutex  // the log file's fsyncs and replacement
	unsynced atomic.Bool // written since the last fsync
}

// newReplayState returns an empty state with no file.
func newReplayState() *replayState {
	return &replayState{
		runAt:    -1,
		windows:  make(map[senderKey]*senderWindow),
		perGroup: make(map[string]int),
		retained: make(map[string]retainedTriple),
		kept:     newKeptSessions(),
		stop:     make(chan struct{}),

		sessions:     make(map[string]*sessionState),
		sessionsByID: make(map[uint64]*sessionState),
		willsSeen:    make(map[retainedTriple]uint64),

		retainedHist:    make(map[string][]retainedVersion),
		retainedTrimmed: make(map[string]bool),
		done:            make(chan struct{}),
	}
}

func openReplayState(dir string, sync queue.Sync) (*replayState, error) {
	st := newReplayState()
	st.dir, st.sync = dir, sync
	path := filepath.Join(dir, inboundLogName)
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := st.importBolt(); err != nil {
			return nil, err
		}
		if err := st.compact(); err != nil {
			return nil, fmt.Errorf("proxy: create inbound state %s: %w", path, err)
		}
		os.Remove(filepath.Join(dir, legacyStateName)) // its state is in the log now
	case err != nil:
		return nil, fmt.Errorf("proxy: read inbound state %s: %w", path, err)
	default:
		good, err := decodeInboundLog(data, st.apply)
		if err != nil {
			return nil, fmt.Errorf("proxy: load inbound state %s: %w", path, err)
		}
		st.retainedLoaded = maps.Clone(st.retained)
		now := time.Now().Unix()
		for _, s := range st.sessions {
			if s.leftAt == 0 {
				s.leftAt = now // its connection ended with the process that held it
			}
		}
		if good < len(data) {
			// A torn last write, or damage: what follows the last frame
			// that checks is cut off, and the state is rewritten whole.
			st.torn = len(data) - good
		}
		if err := st.compact(); err != nil {
			return nil, fmt.Errorf("proxy: rewrite inbound state %s: %w", path, err)
		}
	}
	go st.syncLoop()
	return st, nil
}

// apply replays one logged change into the state.
func (st *replayState) apply(r *inboundRecord) error {
	switch r.kind {
	case frameKindWindow:
		w := st.window(r.key)
		st.touch(w)
		w.own()
		if err := w.UnmarshalBinary(r.window); err != nil {
			return fmt.Errorf("replay window of sender %016x in group %q epoch %d: %w", r.key.sender, r.key.group, r.key.epoch, err)
		}
	case frameKindAccepted:
		w := st.window(r.key)
		st.touch(w)
		w.own()
		for i := 0; i < len(r.seqs); i += 8 {
			w.Accept(binary.LittleEndian.Uint64(r.seqs[i:]))
		}
	case frameKindForget:
		if _, ok := st.windows[r.key]; ok {
			delete(st.windows, r.key)
			st.perGroup[r.key.group]--
		}
	case frameKindRetained:
		st.retained[string(r.topic)] = r.triple
	default:
		if r.kind >= frameKindKeptSession {
			st.kept.apply(r)
			return nil
		}
		return st.applySession(r)
	}
	return nil
}

// window returns k's window, created empty if it has none.
func (st *replayState) window(k senderKey) *senderWindow {
	w := st.windows[k]
	if w == nil {
		w = &senderWindow{ReplayWindow: new(envelope.ReplayWindow)}
		st.windows[k] = w
		st.perGroup[k.group]++
	}
	return w
}

// touch marks w the most recently used window (eviction takes the least).
func (st *replayState) touch(w *senderWindow) {
	st.clock++
	w.lastUse = st.clock
}

// snapshot encodes the whole state as a log.
func (st *replayState) snapshot() []byte {
	b := make([]byte, 0, len(inboundLogMagic)+len(st.windows)*256+len(st.retained)*64)
	b = append(b, inboundLogMagic...)
	for k, w := range st.windows {
		b = appendWindowFrame(b, k, w.ReplayWindow)
	}
	for topic, t := range st.retained {
		b = appendRetainedFrame(b, topic, t)
	}
	return st.kept.snapshot(st.snapshotSessions(b))
}

// compact replaces the log with one that holds the whole state.
func (st *replayState) compact() error {
	b := st.snapshot()
	st.syncMu.Lock()
	defer st.syncMu.Unlock()
	f, err := durable.Replace(filepath.Join(st.dir, inboundLogName), b)
	if err != nil {
		return err
	}
	if st.log != nil {
		st.log.Close()
	}
	st.log, st.size, st.base, st.rewrite = f, int64(len(b)), int64(len(b)), false
	st.unsynced.Store(false)
	return nil
}

// syncLoop fsyncs the log every 10 ms when the sync policy is batch and
// something was written since the last fsync.
func (st *replayState) syncLoop() {
	defer close(st.done)
	if st.sync != queue.SyncBatch {
		<-st.stop
		return
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-st.stop:
			return
		case <-t.C:
			if st.unsynced.Swap(false) {
				st.syncMu.Lock()
				_ = st.log.Sync()
				st.syncMu.Unlock()
			}
		}
	}
}

func (st *replayState) close() error {
	close(st.stop)
	<-st.done
	err := st.commit()
	if e := st.log.Sync(); err == nil {
		err = e
	}
	if e := st.log.Close(); err == nil {
		err = e
	}
	return err
}

// accept runs the replay check for one opened envelope and marks it seen.
// Callers hold no lock.
func (st *replayState) accept(group string, epoch uint32, sender, seq uint64) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	k := senderKey{group, epoch, sender}
	w := st.windows[k]
	if w == nil {
		if st.perGroup[group] >= maxSendersPerGroup {
			st.evictLocked(group)
		}
		w = st.window(k)
	}
	if !w.Check(seq) {
		return false
	}
	w.own()
	w.Accept(seq)
	st.touch(w)
	// Consecutive accepts of one sender share a frame; its count is
	// written when it is closed.
	if st.runAt < 0 || st.runKey != k || (len(st.pend)-st.runSeqs)/8 == maxAcceptRun {
		st.closeRunLocked()
		st.runAt, st.runKey = len(st.pend), k
		st.pend = append(appendKey(beginFrame(st.pend, frameKindAccepted), k), 0, 0)
		st.runSeqs = len(st.pend)
	}
	st.pend = binary.LittleEndian.AppendUint64(st.pend, seq)
	return true
}

// closeRunLocked completes the open accepted frame, if any.
func (st *replayState) closeRunLocked() {
	if st.runAt >= 0 {
		binary.LittleEndian.PutUint16(st.pend[st.runSeqs-2:], uint16((len(st.pend)-st.runSeqs)/8))
		endFrame(st.pend, st.runAt)
		st.runAt = -1
	}
}

func (st *replayState) evictLocked(group string) {
	var oldest senderKey
	var min uint64 = ^uint64(0)
	for k, w := range st.windows {
		if k.group == group && w.lastUse < min {
			oldest, min = k, w.lastUse
		}
	}
	delete(st.windows, oldest)
	st.perGroup[group]--
	st.closeRunLocked()
	st.pend = appendForgetFrame(st.pend, oldest)
}

// freshRetained runs a retained value through the topic's register: a
// value older than the one recorded (a lower epoch, or the same sender's
// lower sequence number) is stale and refused; anything else is recorded and
// accepted. Values of different senders in one epoch cannot be ordered: the
// broker can choose between them (docs/SECURITY.md).
func (st *replayState) freshRetained(topic string, t retainedTriple) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if cur, ok := st.retained[topic]; ok {
		if cur == t {
			return true
		}
		if t.Epoch < cur.Epoch || t.Epoch == cur.Epoch && t.Sender == cur.Sender && t.Seq < cur.Seq {
			return false
		}
	}
	st.retained[topic] = t
	st.closeRunLocked()
	st.pend = appendRetainedFrame(st.pend, topic, t)
	return true
}

// commit writes every change since the last commit with one write(2), and
// fsyncs it under sync: always. A log grown past twice its last snapshot
// (and by minCompactGrowth) is compacted instead.
//
// The kept sessions' frames go first: a write that a crash cuts short may
// then keep a message held for a session without the replay state that
// goes with it (the message is delivered twice, as QoS 1 allows), never
// the replay state without the message (which would refuse upstream's
// resend of a message nobody has).
func (st *replayState) commit() error {
	st.commitMu.Lock()
	defer st.commitMu.Unlock()
	st.mu.Lock()
	st.wbuf = st.kept.drain(st.wbuf[:0])
	if len(st.pend) == 0 && len(st.wbuf) == 0 && !st.rewrite {
		st.mu.Unlock()
		return nil
	}
	st.closeRunLocked()
	if grown := st.size + int64(len(st.wbuf)+len(st.pend)) - st.base; st.rewrite || grown >= minCompactGrowth && grown >= st.base {
		st.pend = st.pend[:0] // the snapshot holds it, and what was drained
		err := st.compact()
		if err != nil {
			st.rewrite = true
		}
		st.mu.Unlock()
		return err
	}
	st.wbuf = append(st.wbuf, st.pend...)
	st.pend = st.pend[:0]
	st.mu.Unlock()

	n, err := st.log.Write(st.wbuf)
	st.size += int64(n)
	if err == nil && st.sync == queue.SyncAlways {
		err = st.log.Sync()
	}
	if err != nil {
		// Nothing of this batch is delivered. The retry compacts: the new
		// log holds the whole state, this batch included, and a partly
		// written frame is gone with the old one.
		st.mu.Lock()
		st.rewrite = true
		st.mu.Unlock()
		return fmt.Errorf("proxy: write inbound state: %w", err)
	}
	st.unsynced.Store(true)
	return nil
}

// legacyStateName is the bbolt store that held the inbound state before
// inbound.log; its contents move into the log once.
const legacyStateName = "inbound.db"

// importBolt loads the state of a legacy inbound.db, if there is one.
func (st *replayState) importBolt() error {
	path := filepath.Join(st.dir, legacyStateName)
	if _, err := os.Stat(path); err != nil {
		return nil
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second, ReadOnly: true})
	if err != nil {
		return fmt.Errorf("proxy: open legacy inbound state %s: %w", path, err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		if rb := tx.Bucket([]byte("replay")); rb != nil {
			if err := rb.ForEach(func(k, v []byte) error {
				n := 0
				if len(k) > 0 {
					n = int(k[0])
				}
				if len(k) != 1+n+12 {
					return fmt.Errorf("unreadable replay window key %x", k)
				}
				sk := senderKey{string(k[1 : 1+n]), binary.BigEndian.Uint32(k[1+n:]), binary.BigEndian.Uint64(k[5+n:])}
				w := st.window(sk)
				st.touch(w)
				w.own()
				if err := w.UnmarshalBinary(v); err != nil {
					return fmt.Errorf("replay window of sender %016x in group %q epoch %d: %w", sk.sender, sk.group, sk.epoch, err)
				}
				return nil
			}); err != nil {
				return err
			}
		}
		if tb := tx.Bucket([]byte("retained")); tb != nil {
			return tb.ForEach(func(k, v []byte) error {
				if len(v) != 20 {
					return fmt.Errorf("unreadable retained register of %q", k)
				}
				st.retained[string(k)] = retainedTriple{binary.BigEndian.Uint32(v), binary.BigEndian.Uint64(v[4:]), binary.BigEndian.Uint64(v[12:])}
				return nil
			})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("proxy: load legacy inbound state %s: %w", path, err)
	}
	return nil
}
