package proxy

import (
	"encoding/binary"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/proxy/queue"
)

// maxSendersPerGroup bounds the replay windows kept per group (about 1 KiB
// each). Past it the least recently heard sender is forgotten; with a key
// server, windows go anyway when their epoch is retired.
const maxSendersPerGroup = 4096

var (
	bucketReplay   = []byte("replay")
	bucketRetained = []byte("retained")
)

// senderKey names one replay window: sequence numbers restart at 1 in every
// epoch, so a window belongs to a (group, epoch, sender).
type senderKey struct {
	group  string
	epoch  uint32
	sender uint64
}

type senderWindow struct {
	envelope.ReplayWindow
	lastUse uint64
}

// retainedTriple identifies a sealed retained value.
type retainedTriple struct {
	Epoch  uint32
	Sender uint64
	Seq    uint64
}

// replayState is the inbound state that must survive a restart: each
// sender's replay window and each protected topic's retained register. It is
// kept in memory and written, once per inbound batch, in one bbolt
// transaction before the batch is delivered and acknowledged upstream.
type replayState struct {
	db   *bolt.DB
	sync queue.Sync

	mu       sync.Mutex
	clock    uint64
	windows  map[senderKey]*senderWindow
	perGroup map[string]int
	retained map[string]retainedTriple
	dirtyW   map[senderKey]bool
	dirtyR   map[string]bool
	stop     chan struct{}
	done     chan struct{}
	unsynced atomic.Bool // a transaction was committed since the last fsync
}

func openReplayState(dir string, sync queue.Sync) (*replayState, error) {
	path := filepath.Join(dir, "inbound.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second, NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		return nil, fmt.Errorf("proxy: open inbound state %s: %w", path, err)
	}
	db.NoSync = sync != queue.SyncAlways
	st := &replayState{
		db: db, sync: sync,
		windows:  make(map[senderKey]*senderWindow),
		perGroup: make(map[string]int),
		retained: make(map[string]retainedTriple),
		dirtyW:   make(map[senderKey]bool),
		dirtyR:   make(map[string]bool),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	err = db.Update(func(tx *bolt.Tx) error {
		rb, err := tx.CreateBucketIfNotExists(bucketReplay)
		if err != nil {
			return err
		}
		tb, err := tx.CreateBucketIfNotExists(bucketRetained)
		if err != nil {
			return err
		}
		if err := rb.ForEach(func(k, v []byte) error {
			sk, ok := parseSenderKey(k)
			if !ok {
				return nil // unreadable entry: forget it rather than fail start
			}
			w := &senderWindow{}
			if err := w.UnmarshalBinary(v); err != nil {
				return fmt.Errorf("replay window of sender %016x in group %q epoch %d: %w", sk.sender, sk.group, sk.epoch, err)
			}
			st.windows[sk] = w
			st.perGroup[sk.group]++
			return nil
		}); err != nil {
			return err
		}
		return tb.ForEach(func(k, v []byte) error {
			if t, ok := parseTriple(v); ok {
				st.retained[string(k)] = t
			}
			return nil
		})
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("proxy: load inbound state %s: %w", path, err)
	}
	go st.syncLoop()
	return st, nil
}

// syncLoop fsyncs the database every 10 ms when the sync policy is batch
// and something was committed since the last fsync.
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
				_ = st.db.Sync()
			}
		}
	}
}

func (st *replayState) close() error {
	close(st.stop)
	<-st.done
	_ = st.db.Sync()
	return st.db.Close()
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
		w = &senderWindow{}
		st.windows[k] = w
		st.perGroup[group]++
	}
	if !w.Accept(seq) {
		return false
	}
	st.clock++
	w.lastUse = st.clock
	st.dirtyW[k] = true
	return true
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
	st.dirtyW[oldest] = true // deleted on commit
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
	st.dirtyR[topic] = true
	return true
}

// commit writes every change since the last commit in one transaction.
func (st *replayState) commit() error {
	st.mu.Lock()
	if len(st.dirtyW) == 0 && len(st.dirtyR) == 0 {
		st.mu.Unlock()
		return nil
	}
	type wr struct {
		k []byte
		v []byte
	}
	ws := make([]wr, 0, len(st.dirtyW))
	for k := range st.dirtyW {
		var v []byte
		if w := st.windows[k]; w != nil {
			v, _ = w.MarshalBinary()
		}
		ws = append(ws, wr{senderKeyBytes(k), v})
	}
	rs := make([]wr, 0, len(st.dirtyR))
	for topic := range st.dirtyR {
		rs = append(rs, wr{[]byte(topic), tripleBytes(st.retained[topic])})
	}
	clear(st.dirtyW)
	clear(st.dirtyR)
	st.mu.Unlock()

	st.unsynced.Store(true)
	return st.db.Update(func(tx *bolt.Tx) error {
		rb, tb := tx.Bucket(bucketReplay), tx.Bucket(bucketRetained)
		for _, w := range ws {
			var err error
			if w.v == nil {
				err = rb.Delete(w.k)
			} else {
				err = rb.Put(w.k, w.v)
			}
			if err != nil {
				return err
			}
		}
		for _, r := range rs {
			if err := tb.Put(r.k, r.v); err != nil {
				return err
			}
		}
		return nil
	})
}

func senderKeyBytes(k senderKey) []byte {
	b := make([]byte, 0, 1+len(k.group)+12)
	b = append(b, byte(len(k.group)))
	b = append(b, k.group...)
	b = binary.BigEndian.AppendUint32(b, k.epoch)
	return binary.BigEndian.AppendUint64(b, k.sender)
}

func parseSenderKey(b []byte) (senderKey, bool) {
	if len(b) < 1 || len(b) != 1+int(b[0])+12 {
		return senderKey{}, false
	}
	n := int(b[0])
	return senderKey{
		group:  string(b[1 : 1+n]),
		epoch:  binary.BigEndian.Uint32(b[1+n:]),
		sender: binary.BigEndian.Uint64(b[5+n:]),
	}, true
}

func tripleBytes(t retainedTriple) []byte {
	b := make([]byte, 0, 20)
	b = binary.BigEndian.AppendUint32(b, t.Epoch)
	b = binary.BigEndian.AppendUint64(b, t.Sender)
	return binary.BigEndian.AppendUint64(b, t.Seq)
}

func parseTriple(b []byte) (retainedTriple, bool) {
	if len(b) != 20 {
		return retainedTriple{}, false
	}
	return retainedTriple{
		Epoch:  binary.BigEndian.Uint32(b),
		Sender: binary.BigEndian.Uint64(b[4:]),
		Seq:    binary.BigEndian.Uint64(b[12:]),
	}, true
}
