package proxy

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/proxy/queue"
)

func openState(t *testing.T, dir string) *replayState {
	t.Helper()
	st, err := openReplayState(dir, queue.SyncBatch)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func commitState(t *testing.T, st *replayState) {
	t.Helper()
	if err := st.commit(); err != nil {
		t.Fatal(err)
	}
}

// refuses reports whether st refuses every one of seqs of (group, epoch,
// sender): a message it accepted before must never be accepted again.
func refuses(st *replayState, group string, epoch uint32, sender uint64, seqs ...uint64) bool {
	k := senderKey{group, epoch, sender}
	st.mu.Lock()
	defer st.mu.Unlock()
	w := st.windows[k]
	if w == nil {
		return false
	}
	for _, s := range seqs {
		if w.Check(s) {
			return false
		}
	}
	return true
}

// TestInboundStateSurvivesRestart: what the windows and registers accepted
// before a restart is refused after it, sender by sender, with the windows'
// gaps kept (a sequence number skipped before the restart is still
// accepted), and the retained registers' values kept.
func TestInboundStateSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	st := openState(t, dir)
	var accepted []uint64
	for seq := uint64(1); seq <= 20000; seq++ {
		if seq%7 == 0 {
			continue // a gap: never accepted
		}
		if !st.accept("g", 3, 42, seq) {
			t.Fatalf("seq %d refused the first time", seq)
		}
		accepted = append(accepted, seq)
		st.accept("g", 3, uint64(seq%5)+100, seq) // other senders interleaved
		if seq%256 == 0 {
			commitState(t, st)
		}
	}
	st.accept("other", 9, 42, 5)
	st.freshRetained("secure/state", retainedTriple{Epoch: 3, Sender: 42, Seq: 77})
	commitState(t, st)
	if err := st.close(); err != nil {
		t.Fatal(err)
	}

	st = openState(t, dir)
	defer st.close()
	if st.torn != 0 {
		t.Fatalf("%d bytes cut off a cleanly closed log", st.torn)
	}
	recent := accepted[len(accepted)-envelope.WindowSize/2:]
	if !refuses(st, "g", 3, 42, recent...) || !refuses(st, "other", 9, 42, 5) {
		t.Fatal("a restarted state accepts what it accepted before")
	}
	if !st.accept("g", 3, 42, 19999) || st.accept("g", 3, 42, 19998) { // 19999 = 7 × 2857: a gap
		t.Fatal("the window's gaps were not kept across the restart")
	}
	if st.freshRetained("secure/state", retainedTriple{Epoch: 3, Sender: 42, Seq: 76}) {
		t.Fatal("an older retained value was taken after a restart")
	}
	if len(st.windows) != 7 {
		t.Fatalf("%d windows after the restart, want 7", len(st.windows))
	}
}

// TestInboundStateTornWrite: a crash in the middle of a write leaves a torn
// last frame; the log is cut there, everything before it holds, and the
// sidecar is told how much was cut.
func TestInboundStateTornWrite(t *testing.T) {
	dir := t.TempDir()
	st := openState(t, dir)
	for seq := uint64(1); seq <= 100; seq++ {
		st.accept("g", 1, 7, seq)
	}
	commitState(t, st)
	st.accept("g", 1, 7, 101)
	commitState(t, st)
	if err := st.close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, inboundLogName)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// close wrote nothing more: the last frame is the one of seq 101.
	last := inboundFrameHeader + 1 + 2 + 1 + 12 + 2 + 8
	for cut := 1; cut < last; cut += 5 {
		if err := os.WriteFile(path, data[:len(data)-cut], 0o600); err != nil {
			t.Fatal(err)
		}
		st := openState(t, dir)
		if st.torn != last-cut {
			t.Errorf("cut %d: %d bytes reported cut off, want %d", cut, st.torn, last-cut)
		}
		if !refuses(st, "g", 1, 7, 1, 50, 100) {
			t.Errorf("cut %d: the frames before the torn one were lost", cut)
		}
		if !st.accept("g", 1, 7, 101) {
			t.Errorf("cut %d: a torn frame's record was applied", cut)
		}
		st.close()
	}
	// Flipped bits in the last frame: the CRC catches them.
	bad := append([]byte(nil), data...)
	bad[len(bad)-3] ^= 0x40
	if err := os.WriteFile(path, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	st = openState(t, dir)
	defer st.close()
	if st.torn != last || !refuses(st, "g", 1, 7, 100) || !st.accept("g", 1, 7, 101) {
		t.Fatalf("a corrupted last frame: torn %d, want %d, and the earlier frames kept", st.torn, last)
	}
}

// TestInboundStateCompacts: the log does not grow without bound; it is
// rewritten as a snapshot once it doubles, and the snapshot restores the
// same windows.
func TestInboundStateCompacts(t *testing.T) {
	dir := t.TempDir()
	st := openState(t, dir)
	path := filepath.Join(dir, inboundLogName)
	const n = 2 * minCompactGrowth / 8 // two compactions' worth of accepted seqs
	maxSize := int64(0)
	for seq := uint64(1); seq <= n; seq++ {
		st.accept("g", 1, 1, seq)
		if seq%4096 == 0 {
			commitState(t, st)
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			maxSize = max(maxSize, fi.Size())
		}
	}
	commitState(t, st)
	if maxSize > minCompactGrowth+64<<10 {
		t.Fatalf("the log reached %d bytes; compaction should keep it near %d", maxSize, minCompactGrowth)
	}
	if err := st.close(); err != nil {
		t.Fatal(err)
	}
	st = openState(t, dir)
	defer st.close()
	if !refuses(st, "g", 1, 1, n, n-1, n-envelope.WindowSize+1) || !st.accept("g", 1, 1, n+1) {
		t.Fatal("the compacted log does not restore the window")
	}
}

// TestInboundStateWriteFailure: a failed write delivers nothing of its
// batch (commit fails), and the next commit, which rewrites the whole
// state, stores it: nothing accepted is forgotten.
func TestInboundStateWriteFailure(t *testing.T) {
	dir := t.TempDir()
	st := openState(t, dir)
	st.accept("g", 1, 1, 1)
	commitState(t, st)
	st.accept("g", 1, 1, 2)
	st.log.Close() // the next write fails
	if err := st.commit(); err == nil {
		t.Fatal("a commit whose write failed reported success")
	}
	commitState(t, st) // the inbound worker's retry
	st.accept("g", 1, 1, 3)
	commitState(t, st)
	if err := st.close(); err != nil {
		t.Fatal(err)
	}
	st = openState(t, dir)
	defer st.close()
	if !refuses(st, "g", 1, 1, 1, 2, 3) {
		t.Fatal("a message accepted around a failed write was forgotten")
	}
}

// TestInboundStateImportsBolt: a data directory from before inbound.log
// keeps its windows and registers: they move into the log once.
func TestInboundStateImportsBolt(t *testing.T) {
	dir := t.TempDir()
	legacy := filepath.Join(dir, legacyStateName)
	db, err := bolt.Open(legacy, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var w envelope.ReplayWindow
	for seq := uint64(1); seq <= 300; seq++ {
		w.Accept(seq)
	}
	win, _ := w.MarshalBinary()
	key := append([]byte{1}, 'g')
	key = binary.BigEndian.AppendUint32(key, 4)
	key = binary.BigEndian.AppendUint64(key, 99)
	triple := binary.BigEndian.AppendUint32(nil, 4)
	triple = binary.BigEndian.AppendUint64(triple, 99)
	triple = binary.BigEndian.AppendUint64(triple, 300)
	err = db.Update(func(tx *bolt.Tx) error {
		rb, _ := tx.CreateBucketIfNotExists([]byte("replay"))
		tb, _ := tx.CreateBucketIfNotExists([]byte("retained"))
		if err := rb.Put(key, win); err != nil {
			return err
		}
		return tb.Put([]byte("secure/r"), triple)
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}

	st := openState(t, dir)
	if !refuses(st, "g", 4, 99, 1, 150, 300) || st.freshRetained("secure/r", retainedTriple{4, 99, 299}) {
		t.Fatal("the legacy store's state was not imported")
	}
	if _, err := os.Stat(legacy); !os.IsNotExist(err) {
		t.Fatalf("the legacy store is still there after the import: %v", err)
	}
	if err := st.close(); err != nil {
		t.Fatal(err)
	}
	st = openState(t, dir) // from the log alone now
	defer st.close()
	if !refuses(st, "g", 4, 99, 1, 150, 300) {
		t.Fatal("the imported state did not survive the next restart")
	}
}

// TestInboundStateRefusesDamage: a log whose header is wrong, or whose
// frames check but carry an impossible window, fails start with an error
// naming the file, rather than starting with forgotten windows.
func TestInboundStateRefusesDamage(t *testing.T) {
	for name, data := range map[string][]byte{
		"header": []byte("NOTALOG!"),
		"window": appendWindowFrameRaw([]byte(inboundLogMagic), []byte{1, 0, 0, 0, 0, 0, 0, 0, 9}),
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, inboundLogName)
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			st, err := openReplayState(dir, queue.SyncBatch)
			if err == nil {
				st.close()
				t.Fatal("a damaged inbound log was loaded")
			}
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("the error does not name the file: %v", err)
			}
		})
	}
}

// appendWindowFrameRaw appends a window frame carrying enc as it is.
func appendWindowFrameRaw(b []byte, enc []byte) []byte {
	start := len(b)
	b = appendKey(beginFrame(b, frameKindWindow), senderKey{"g", 1, 1})
	b = append(b, enc...)
	endFrame(b, start)
	return b
}
