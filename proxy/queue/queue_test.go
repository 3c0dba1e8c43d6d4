package queue

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// testRecord returns a distinct record for each i, with varied flags and
// sizes (including an empty payload).
func testRecord(i int) Record {
	return Record{
		QoS:     byte(1 + i%2),
		Retain:  i%3 == 0,
		Topic:   fmt.Sprintf("sensors/%d/temp", i),
		Payload: bytes.Repeat([]byte{byte(i)}, i%7*10),
	}
}

func openQueue(t testing.TB, opts Options) *Queue {
	t.Helper()
	q, err := Open(opts)
	if err != nil {
		t.Fatalf("Open(%+v): %v", opts, err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// appendRecords appends n records made by testRecord(from), ... and
// returns them with their IDs.
func appendRecords(t testing.TB, q *Queue, from, n int) []Record {
	t.Helper()
	var out []Record
	for i := from; i < from+n; i++ {
		r := testRecord(i)
		id, err := q.Append(context.Background(), r)
		if err != nil {
			t.Fatalf("Append(record %d): %v", i, err)
		}
		r.ID = id
		out = append(out, r)
	}
	return out
}

// pending returns every record Next hands out without waiting.
func pending(t testing.TB, q *Queue) []Record {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out []Record
	for {
		r, err := q.Next(ctx)
		if errors.Is(err, context.Canceled) {
			return out
		}
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		out = append(out, r)
	}
}

func sameRecord(a, b Record) bool {
	return a.ID == b.ID && a.QoS == b.QoS && a.Retain == b.Retain && a.Topic == b.Topic && bytes.Equal(a.Payload, b.Payload)
}

func checkRecords(t testing.TB, got, want []Record) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d records %v, want %d: %v", len(got), ids(got), len(want), ids(want))
	}
	for i := range want {
		if !sameRecord(got[i], want[i]) {
			t.Fatalf("record %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
}

func ids(rs []Record) []uint64 {
	var out []uint64
	for _, r := range rs {
		out = append(out, r.ID)
	}
	return out
}

func without(rs []Record, acked ...uint64) []Record {
	return slices.DeleteFunc(slices.Clone(rs), func(r Record) bool { return slices.Contains(acked, r.ID) })
}

// crash abandons q the way a killed process does: no flush, no fsync, the
// kernel just closes the files (which releases the directory lock).
func crash(q *Queue) {
	close(q.stop)
	<-q.done
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.active.f.Close()
	q.closeReaderLocked()
	q.ackLog.Close()
	q.lock.Close()
}

func segmentFiles(t testing.TB, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*"+segmentSuffix))
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range names {
		names[i] = filepath.Base(n)
	}
	return names
}

var allSyncs = []Sync{SyncNone, SyncBatch, SyncAlways}

func TestParseSync(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Sync
		wantErr bool
	}{
		{"none", SyncNone, false},
		{"batch", SyncBatch, false},
		{"always", SyncAlways, false},
		{"", 0, true},
		{"Always", 0, true},
		{"fsync", 0, true},
	} {
		got, err := ParseSync(tc.in)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("ParseSync(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.wantErr)
		}
		if err == nil && got.String() != tc.in {
			t.Errorf("ParseSync(%q).String() = %q", tc.in, got.String())
		}
	}
}

func TestOpenRejectsBadOptions(t *testing.T) {
	for name, opts := range map[string]Options{
		"no directory":     {},
		"negative maximum": {Dir: t.TempDir(), MaxMessages: -1},
		"unknown sync":     {Dir: t.TempDir(), Sync: Sync(7)},
	} {
		if q, err := Open(opts); err == nil {
			q.Close()
			t.Errorf("%s: Open(%+v) succeeded", name, opts)
		}
	}
}

func TestOpenCreatesPrivateDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "queue")
	openQueue(t, Options{Dir: dir})
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o700 {
		t.Errorf("directory mode %v, want 0700", perm)
	}
}

func TestNextHandsOutRecordsInAppendOrder(t *testing.T) {
	for _, s := range allSyncs {
		t.Run(s.String(), func(t *testing.T) {
			q := openQueue(t, Options{Dir: t.TempDir(), Sync: s})
			want := appendRecords(t, q, 0, 50)
			for i, r := range want {
				if i > 0 && r.ID <= want[i-1].ID {
					t.Fatalf("ID %d after %d", r.ID, want[i-1].ID)
				}
			}
			checkRecords(t, pending(t, q), want)
			if q.Len() != 50 {
				t.Errorf("Len() = %d, want 50", q.Len())
			}
		})
	}
}

func TestReopenDeliversOnlyUnackedRecordsInOrder(t *testing.T) {
	for _, s := range allSyncs {
		t.Run(s.String(), func(t *testing.T) {
			dir := t.TempDir()
			q := openQueue(t, Options{Dir: dir, Sync: s, SegmentBytes: 1024})
			all := appendRecords(t, q, 0, 40)
			pending(t, q)
			acked := []uint64{7, 3, 15, 1, 2, 40, 22, 21, 23, 9}
			for _, id := range acked {
				if err := q.Ack(id); err != nil {
					t.Fatalf("Ack(%d): %v", id, err)
				}
			}
			if err := q.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}

			q = openQueue(t, Options{Dir: dir, Sync: s, SegmentBytes: 1024})
			want := without(all, acked...)
			checkRecords(t, pending(t, q), want)
			rec := q.Recovered()
			if rec.Err != nil || rec.Unacked != len(want) || rec.Dropped != 0 {
				t.Errorf("Recovered() = %+v, want %d unacked and no error", rec, len(want))
			}
			if q.Len() != len(want) {
				t.Errorf("Len() = %d, want %d", q.Len(), len(want))
			}
		})
	}
}

func TestReopenAfterCrashKeepsEveryAppendedRecord(t *testing.T) {
	for _, s := range allSyncs {
		t.Run(s.String(), func(t *testing.T) {
			dir := t.TempDir()
			q := openQueue(t, Options{Dir: dir, Sync: s, SegmentBytes: 1024})
			all := appendRecords(t, q, 0, 30)
			pending(t, q)
			for _, id := range []uint64{2, 4, 6} {
				q.Ack(id)
			}
			crash(q)

			q = openQueue(t, Options{Dir: dir, Sync: s, SegmentBytes: 1024})
			// Acks not yet written may be lost (those records come
			// again); appended records never are.
			checkDelivery(t, pending(t, q), all, 2, 4, 6)
			if err := q.Recovered().Err; err != nil {
				t.Errorf("Recovered().Err = %v", err)
			}
			more := appendRecords(t, q, 30, 1)
			if more[0].ID <= all[len(all)-1].ID {
				t.Errorf("ID %d after a crash, not above %d", more[0].ID, all[len(all)-1].ID)
			}
		})
	}
}

// checkDelivery checks that got is all in order, except that records with
// the acked IDs may be missing.
func checkDelivery(t testing.TB, got, all []Record, acked ...uint64) {
	t.Helper()
	i := 0
	for _, r := range all {
		if i < len(got) && sameRecord(got[i], r) {
			i++
			continue
		}
		if !slices.Contains(acked, r.ID) {
			t.Fatalf("record %d missing or changed: got %v", r.ID, ids(got))
		}
	}
	if i != len(got) {
		t.Fatalf("got %v, want a subsequence of %v", ids(got), ids(all))
	}
}

// Tests that call q.flush themselves set a long BatchInterval, so that the
// flusher goroutine stays idle.
const idle = time.Hour

func TestWrittenAcksSurviveCrash(t *testing.T) {
	dir := t.TempDir()
	q := openQueue(t, Options{Dir: dir, BatchInterval: idle})
	all := appendRecords(t, q, 0, 10)
	for _, id := range []uint64{5, 1, 9} {
		q.Ack(id)
	}
	q.flush() // what the flusher does every BatchInterval
	crash(q)

	q = openQueue(t, Options{Dir: dir})
	checkRecords(t, pending(t, q), without(all, 5, 1, 9))
}

// frameEnds returns the end offset of every frame in a segment file.
func frameEnds(t testing.TB, path string) []int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	sc := newSegmentScanner(f, fi.Size())
	if !sc.header() {
		t.Fatalf("%s: %v", path, sc.err)
	}
	var ends []int64
	for {
		if _, _, ok := sc.next(); !ok {
			break
		}
		ends = append(ends, sc.off)
	}
	if sc.err != nil {
		t.Fatalf("%s: %v", path, sc.err)
	}
	return ends
}

func TestTornLastRecordIsTruncatedOnOpen(t *testing.T) {
	for _, tc := range []struct {
		name string
		keep func(start, end int64) int64 // bytes of the last frame to keep
	}{
		{"inside frame header", func(start, end int64) int64 { return start + 3 }},
		{"after frame header", func(start, end int64) int64 { return start + frameHeaderLen }},
		{"inside body", func(start, end int64) int64 { return start + frameHeaderLen + 5 }},
		{"one byte short", func(start, end int64) int64 { return end - 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			q := openQueue(t, Options{Dir: dir})
			all := appendRecords(t, q, 1, 5)
			crash(q)

			path := filepath.Join(dir, segmentName(1))
			ends := frameEnds(t, path)
			cut := tc.keep(ends[len(ends)-2], ends[len(ends)-1])
			if err := os.Truncate(path, cut); err != nil {
				t.Fatal(err)
			}

			q = openQueue(t, Options{Dir: dir})
			checkRecords(t, pending(t, q), all[:4])
			rec := q.Recovered()
			if !errors.Is(rec.Err, ErrCorrupt) || !strings.Contains(rec.Err.Error(), segmentName(1)) {
				t.Errorf("Recovered().Err = %v, want an ErrCorrupt naming %s", rec.Err, segmentName(1))
			}
			if want := cut - ends[len(ends)-2]; rec.Dropped != want {
				t.Errorf("Recovered().Dropped = %d, want %d", rec.Dropped, want)
			}

			more := appendRecords(t, q, 10, 2)
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			q = openQueue(t, Options{Dir: dir})
			checkRecords(t, pending(t, q), append(all[:4:4], more...))
			if err := q.Recovered().Err; err != nil {
				t.Errorf("second Open: Recovered().Err = %v", err)
			}
		})
	}
}

func TestCorruptRecordEndsItsSegment(t *testing.T) {
	dir := t.TempDir()
	// Records of topic "sensors/N/temp" and 50-byte payloads: 3 per segment.
	opts := Options{Dir: dir, SegmentBytes: int64(magicLen + 3*(recordOverhead+len("sensors/1/temp")+50))}
	q := openQueue(t, opts)
	var all []Record
	for i := range 9 {
		r := Record{QoS: 1, Topic: fmt.Sprintf("sensors/%d/temp", i), Payload: bytes.Repeat([]byte{byte(i)}, 50)}
		id, err := q.Append(context.Background(), r)
		if err != nil {
			t.Fatal(err)
		}
		r.ID = id
		all = append(all, r)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if got, want := segmentFiles(t, dir), []string{segmentName(1), segmentName(4), segmentName(7)}; !slices.Equal(got, want) {
		t.Fatalf("segments %v, want %v", got, want)
	}

	// Flip one payload byte of record 5, the middle one of segment 4.
	path := filepath.Join(dir, segmentName(4))
	ends := frameEnds(t, path)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[ends[1]-10] ^= 0x40
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}

	q = openQueue(t, opts)
	want := without(all, 5, 6)
	checkRecords(t, pending(t, q), want)
	rec := q.Recovered()
	if !errors.Is(rec.Err, ErrCorrupt) || !strings.Contains(rec.Err.Error(), segmentName(4)) || !strings.Contains(rec.Err.Error(), "checksum") {
		t.Errorf("Recovered().Err = %v, want a checksum ErrCorrupt naming %s", rec.Err, segmentName(4))
	}
	if wantDropped := ends[2] - ends[0]; rec.Dropped != wantDropped {
		t.Errorf("Recovered().Dropped = %d, want %d", rec.Dropped, wantDropped)
	}
	if rec.Segments != 3 || rec.Records != 7 || rec.Unacked != 7 {
		t.Errorf("Recovered() = %+v, want 3 segments, 7 records, 7 unacked", rec)
	}

	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = openQueue(t, opts)
	checkRecords(t, pending(t, q), want)
	if err := q.Recovered().Err; err != nil {
		t.Errorf("second Open: Recovered().Err = %v", err)
	}
}

func TestFullyAckedSegmentsAreDeleted(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, SegmentBytes: int64(magicLen + 3*(recordOverhead+len("t")+10))}
	q := openQueue(t, opts)
	for range 9 {
		if _, err := q.Append(context.Background(), Record{QoS: 1, Topic: "t", Payload: make([]byte, 10)}); err != nil {
			t.Fatal(err)
		}
	}
	check := func(step string, want ...uint64) {
		t.Helper()
		var names []string
		for _, first := range want {
			names = append(names, segmentName(first))
		}
		if got := segmentFiles(t, dir); !slices.Equal(got, names) {
			t.Fatalf("%s: segments %v, want %v", step, got, names)
		}
	}
	ack := func(ids ...uint64) {
		t.Helper()
		for _, id := range ids {
			if err := q.Ack(id); err != nil {
				t.Fatal(err)
			}
		}
	}
	check("after appends", 1, 4, 7)
	ack(5, 4)
	check("middle segment partly acked", 1, 4, 7)
	ack(6)
	check("middle segment acked", 1, 7)
	ack(3, 2, 1)
	check("first segment acked", 7)
	ack(7, 8, 9)
	check("active segment acked", 7) // kept: it is appended to
	appendRecords(t, q, 0, 1)
	check("after rotation", 10)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}

	q = openQueue(t, opts)
	if q.Len() != 1 {
		t.Errorf("Len() after reopen = %d, want 1", q.Len())
	}
	check("after reopen", 10)
}

func TestOpenRemovesAckedSegments(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, SegmentBytes: int64(magicLen + 3*(recordOverhead+len("t")+10))}
	q := openQueue(t, opts)
	var all []Record
	for range 6 {
		r := Record{QoS: 1, Topic: "t", Payload: make([]byte, 10)}
		id, err := q.Append(context.Background(), r)
		if err != nil {
			t.Fatal(err)
		}
		r.ID = id
		all = append(all, r)
	}
	first := filepath.Join(dir, segmentName(1))
	saved, err := os.ReadFile(first)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []uint64{1, 2, 3} {
		q.Ack(id)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	// As if the removal had been lost in a crash.
	if err := os.WriteFile(first, saved, 0o600); err != nil {
		t.Fatal(err)
	}

	q = openQueue(t, opts)
	checkRecords(t, pending(t, q), all[3:])
	if got, want := segmentFiles(t, dir), []string{segmentName(4)}; !slices.Equal(got, want) {
		t.Errorf("segments %v, want %v", got, want)
	}
}

func TestIDsIncreaseAcrossRestarts(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, SegmentBytes: 256}
	var last uint64
	for round := range 4 {
		q := openQueue(t, opts)
		rs := appendRecords(t, q, round*10, 10)
		if rs[0].ID <= last {
			t.Fatalf("round %d: first ID %d, not above %d", round, rs[0].ID, last)
		}
		last = rs[len(rs)-1].ID
		for _, r := range pending(t, q) {
			q.Ack(r.ID)
		}
		if round%2 == 0 {
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
		} else {
			crash(q)
		}
	}
}

func TestAckIsIdempotentAndIgnoresUnknownIDs(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir()})
	all := appendRecords(t, q, 0, 3)
	for _, id := range []uint64{2, 2, 0, 99, 2} {
		if err := q.Ack(id); err != nil {
			t.Fatalf("Ack(%d): %v", id, err)
		}
	}
	if q.Len() != 2 {
		t.Errorf("Len() = %d, want 2", q.Len())
	}
	checkRecords(t, pending(t, q), without(all, 2))
}

// waitFor waits until cond, evaluated under q.mu, holds.
func waitFor(q *Queue, cond func() bool) {
	for {
		q.mu.Lock()
		ok := cond()
		q.mu.Unlock()
		if ok {
			return
		}
		runtime.Gosched()
	}
}

func TestAppendWaitsForSpaceWhenFull(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir(), MaxMessages: 2})
	appendRecords(t, q, 0, 2)

	if _, err := q.TryAppend(testRecord(2)); !errors.Is(err, ErrFull) {
		t.Errorf("TryAppend on a full queue: %v, want ErrFull", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := q.Append(ctx, testRecord(2)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Append on a full queue: %v, want context.DeadlineExceeded", err)
	}

	done := make(chan error, 1)
	go func() {
		_, err := q.Append(context.Background(), testRecord(2))
		done <- err
	}()
	waitFor(q, func() bool { return q.spaceCh != nil }) // the goroutine is waiting
	select {
	case err := <-done:
		t.Fatalf("Append returned %v on a full queue", err)
	default:
	}
	if err := q.Ack(1); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Append after Ack: %v", err)
	}
	if q.Len() != 2 {
		t.Errorf("Len() = %d, want 2", q.Len())
	}
	if _, err := q.TryAppend(testRecord(3)); !errors.Is(err, ErrFull) {
		t.Errorf("TryAppend: %v, want ErrFull", err)
	}
	q.Ack(2)
	if _, err := q.TryAppend(testRecord(3)); err != nil {
		t.Errorf("TryAppend with room: %v", err)
	}
}

func TestRewindHandsOutUnackedRecordsAgainInOrder(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir()})
	all := appendRecords(t, q, 0, 6)
	checkRecords(t, pending(t, q), all)
	q.Ack(2)
	q.Ack(5)
	q.Rewind()
	checkRecords(t, pending(t, q), without(all, 2, 5))
	if got := pending(t, q); len(got) != 0 {
		t.Fatalf("after a full pass, Next gave %v", ids(got))
	}

	// A rewind in the middle of a pass starts it again.
	q.Rewind()
	r, err := q.Next(context.Background())
	if err != nil || r.ID != 1 {
		t.Fatalf("Next = %d, %v; want 1", r.ID, err)
	}
	q.Ack(1)
	q.Rewind()
	more := appendRecords(t, q, 6, 1)
	checkRecords(t, pending(t, q), append(without(all, 1, 2, 5), more...))
}

func TestNextWaitsForAppend(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir()})
	got := make(chan Record, 1)
	go func() {
		r, err := q.Next(context.Background())
		if err != nil {
			t.Errorf("Next: %v", err)
		}
		got <- r
	}()
	waitFor(q, func() bool { return q.dataCh != nil })
	want := appendRecords(t, q, 0, 1)
	checkRecords(t, []Record{<-got}, want)
}

func TestCloseWakesBlockedCalls(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir(), MaxMessages: 1})
	appendRecords(t, q, 0, 1)
	pending(t, q)
	errs := make(chan error, 2)
	go func() {
		_, err := q.Next(context.Background())
		errs <- err
	}()
	go func() {
		_, err := q.Append(context.Background(), testRecord(1))
		errs <- err
	}()
	waitFor(q, func() bool { return q.dataCh != nil && q.spaceCh != nil })
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := <-errs; !errors.Is(err, ErrClosed) {
			t.Errorf("blocked call returned %v, want ErrClosed", err)
		}
	}
}

func TestCallsAfterCloseReturnErrClosed(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir()})
	appendRecords(t, q, 0, 1)
	if err := q.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := q.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := q.Append(context.Background(), testRecord(1)); !errors.Is(err, ErrClosed) {
		t.Errorf("Append: %v", err)
	}
	if _, err := q.TryAppend(testRecord(1)); !errors.Is(err, ErrClosed) {
		t.Errorf("TryAppend: %v", err)
	}
	if _, err := q.Next(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Next: %v", err)
	}
	if err := q.Ack(1); !errors.Is(err, ErrClosed) {
		t.Errorf("Ack: %v", err)
	}
}

func TestNextReturnsContextError(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir()})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := q.Next(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Next on an empty queue with a done context: %v", err)
	}
}

func TestOpenRefusesDirectoryInUse(t *testing.T) {
	dir := t.TempDir()
	q := openQueue(t, Options{Dir: dir})
	if q2, err := Open(Options{Dir: dir}); !errors.Is(err, ErrLocked) {
		if err == nil {
			q2.Close()
		}
		t.Fatalf("second Open: %v, want ErrLocked", err)
	}
	q.Close()
	openQueue(t, Options{Dir: dir})
}

func TestAppendRejectsInvalidRecords(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir()})
	for name, r := range map[string]Record{
		"QoS 3":          {QoS: 3, Topic: "a"},
		"topic too long": {QoS: 1, Topic: strings.Repeat("a", MaxTopic+1)},
	} {
		if _, err := q.Append(context.Background(), r); !errors.Is(err, ErrInvalidRecord) {
			t.Errorf("%s: Append: %v, want ErrInvalidRecord", name, err)
		}
	}
	if q.Len() != 0 {
		t.Errorf("Len() = %d after rejected appends", q.Len())
	}
}

func TestAppendCopiesPayload(t *testing.T) {
	q := openQueue(t, Options{Dir: t.TempDir()})
	buf := []byte("hello")
	if _, err := q.Append(context.Background(), Record{QoS: 1, Topic: "t", Payload: buf}); err != nil {
		t.Fatal(err)
	}
	copy(buf, "XXXXX")
	r, err := q.Next(context.Background())
	if err != nil || string(r.Payload) != "hello" {
		t.Errorf("Next = %q, %v; want the payload as appended", r.Payload, err)
	}
}

func TestRecordsBeyondMemoryBoundAreReadFromDisk(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, MemoryBytes: 300, SegmentBytes: 1000}
	q := openQueue(t, opts)
	var all []Record
	for i := range 20 {
		r := Record{QoS: 2, Retain: i%2 == 0, Topic: fmt.Sprintf("t/%d", i), Payload: bytes.Repeat([]byte{byte(i)}, 100)}
		id, err := q.Append(context.Background(), r)
		if err != nil {
			t.Fatal(err)
		}
		r.ID = id
		all = append(all, r)
	}
	q.mu.Lock()
	resident := q.resident
	q.mu.Unlock()
	if resident > opts.MemoryBytes {
		t.Errorf("%d bytes resident, bound %d", resident, opts.MemoryBytes)
	}
	checkRecords(t, pending(t, q), all)
	q.Ack(1)
	q.Ack(2)
	q.Rewind()
	checkRecords(t, pending(t, q), all[2:])
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = openQueue(t, opts)
	checkRecords(t, pending(t, q), all[2:])
}

func TestUnreadableSpilledRecordIsDroppedWithError(t *testing.T) {
	dir := t.TempDir()
	q := openQueue(t, Options{Dir: dir, MemoryBytes: 1})
	all := appendRecords(t, q, 1, 3)

	path := filepath.Join(dir, segmentName(1))
	ends := frameEnds(t, path)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0xff}, ends[1]-1); err != nil {
		t.Fatal(err)
	}
	f.Close()

	r, err := q.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	checkRecords(t, []Record{r}, all[:1])
	r, err = q.Next(context.Background())
	if !errors.Is(err, ErrCorrupt) || r.ID != all[1].ID {
		t.Fatalf("Next over a corrupt record = %d, %v; want ID %d and ErrCorrupt", r.ID, err, all[1].ID)
	}
	r, err = q.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	checkRecords(t, []Record{r}, all[2:])
	if q.Len() != 2 {
		t.Errorf("Len() = %d, want 2 (the corrupt record dropped)", q.Len())
	}
}

func TestAckLogIsRewrittenWhenItGrows(t *testing.T) {
	dir := t.TempDir()
	q := openQueue(t, Options{Dir: dir, BatchInterval: idle})
	q.ackCompactMin = 40 * ackEntryLen
	all := appendRecords(t, q, 0, 400)
	var acked []uint64
	for id := uint64(1); id <= 400; id += 2 { // every ack its own range
		q.Ack(id)
		acked = append(acked, id)
		if id%20 == 1 {
			q.flush()
		}
	}
	q.flush()
	fi, err := os.Stat(filepath.Join(dir, ackLogName))
	if err != nil {
		t.Fatal(err)
	}
	if max := 4*201*ackEntryLen + magicLen; fi.Size() > int64(max) {
		t.Errorf("ack log is %d bytes, want at most %d", fi.Size(), max)
	}
	if q.ackCompacted <= magicLen {
		t.Errorf("ack log never rewritten with the acks")
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = openQueue(t, Options{Dir: dir})
	checkRecords(t, pending(t, q), without(all, acked...))
}

func TestDamagedAckLogOnlyCausesRedelivery(t *testing.T) {
	dir := t.TempDir()
	q := openQueue(t, Options{Dir: dir, BatchInterval: idle})
	all := appendRecords(t, q, 0, 10)
	q.Ack(3)
	q.flush()
	q.Ack(6)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, ackLogName)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 1 // breaks the entry acking 6
	b = append(b, 1, 2, 3)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}

	q = openQueue(t, Options{Dir: dir})
	checkRecords(t, pending(t, q), without(all, 3))
	if err := q.Recovered().Err; !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), ackLogName) {
		t.Errorf("Recovered().Err = %v, want an ErrCorrupt naming the ack log", err)
	}
}

func TestConcurrentAppendersWithSyncAlwaysAreDurable(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, Sync: SyncAlways, SegmentBytes: 4096}
	q := openQueue(t, opts)
	const writers, each = 8, 25
	var (
		mu  sync.Mutex
		all []Record
		wg  sync.WaitGroup
	)
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				r := testRecord(w*each + i)
				id, err := q.Append(context.Background(), r)
				if err != nil {
					t.Errorf("Append: %v", err)
					return
				}
				r.ID = id
				mu.Lock()
				all = append(all, r)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	q.mu.Lock()
	fsyncs := q.fsyncs
	q.mu.Unlock()
	if fsyncs == 0 || fsyncs > writers*each {
		t.Errorf("%d fsyncs for %d appends", fsyncs, writers*each)
	}
	crash(q)

	slices.SortFunc(all, func(a, b Record) int { return cmp.Compare(a.ID, b.ID) })
	q = openQueue(t, opts)
	checkRecords(t, pending(t, q), all)
	if err := q.Recovered().Err; err != nil {
		t.Errorf("Recovered().Err = %v", err)
	}
}

func TestConcurrentUseIsSafe(t *testing.T) {
	// A sender acking what it takes, appenders, and rewinds, all at once;
	// run with -race.
	q := openQueue(t, Options{Dir: t.TempDir(), Sync: SyncBatch, BatchInterval: time.Millisecond, MaxMessages: 64, SegmentBytes: 2048, MemoryBytes: 1024})
	const total = 2000
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	seen := make(map[uint64]bool)
	done := make(chan error, 1)
	go func() {
		for len(seen) < total {
			r, err := q.Next(ctx)
			if err != nil {
				done <- err
				return
			}
			if len(seen)%100 == 7 {
				q.Rewind()
			}
			seen[r.ID] = true
			if err := q.Ack(r.ID); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range total / 4 {
				if _, err := q.Append(ctx, testRecord(w*1000+i)); err != nil {
					t.Errorf("Append: %v", err)
					cancel()
					return
				}
			}
		})
	}
	wg.Wait()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if q.Len() != 0 {
		t.Errorf("Len() = %d after acking everything", q.Len())
	}
}

func TestSyncPolicies(t *testing.T) {
	for _, tc := range []struct {
		sync Sync
		// syncedOnReturn: every record is fsynced when Append returns;
		// syncedLater: records get fsynced without Close.
		syncedOnReturn, syncedLater bool
	}{
		{SyncNone, false, false},
		{SyncBatch, false, true},
		{SyncAlways, true, true},
	} {
		t.Run(tc.sync.String(), func(t *testing.T) {
			q := openQueue(t, Options{Dir: t.TempDir(), Sync: tc.sync, BatchInterval: time.Millisecond})
			appendRecords(t, q, 0, 10)
			q.mu.Lock()
			defer q.mu.Unlock()
			if tc.syncedOnReturn && q.synced != q.written {
				t.Errorf("%d of %d bytes fsynced when Append returned", q.synced, q.written)
			}
			if !tc.syncedLater {
				if q.fsyncs != 0 || q.synced != 0 {
					t.Errorf("%d fsyncs before Close", q.fsyncs)
				}
				return
			}
			for q.synced < q.written {
				q.syncCond.Wait()
			}
			if q.fsyncs == 0 || q.fsyncs > 10 {
				t.Errorf("%d fsyncs for 10 appends", q.fsyncs)
			}
		})
	}
}

func TestRecordLargerThanSegmentGetsItsOwnSegment(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, SegmentBytes: 100}
	q := openQueue(t, opts)
	var all []Record
	for i := range 3 {
		r := Record{QoS: 1, Topic: "big", Payload: bytes.Repeat([]byte{byte(i)}, 500)}
		id, err := q.Append(context.Background(), r)
		if err != nil {
			t.Fatal(err)
		}
		r.ID = id
		all = append(all, r)
	}
	if got, want := segmentFiles(t, dir), []string{segmentName(1), segmentName(2), segmentName(3)}; !slices.Equal(got, want) {
		t.Errorf("segments %v, want %v", got, want)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q = openQueue(t, opts)
	checkRecords(t, pending(t, q), all)
}

// segmentBytes returns the bytes of the records in dir's segment files.
func segmentBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var n int64
	for _, name := range segmentFiles(t, dir) {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		n += fi.Size() - magicLen
	}
	return n
}

// With WriteBehind, Append leaves records in memory (Next hands them out at
// once) and Flush writes them all with one write: from then on they survive
// a crash.
func TestWriteBehindRecordsSurviveCrashOnceFlushed(t *testing.T) {
	for _, s := range []Sync{SyncNone, SyncBatch} {
		t.Run(s.String(), func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{Dir: dir, Sync: s, WriteBehind: true, BatchInterval: idle, SegmentBytes: 1024}
			q := openQueue(t, opts)
			first := appendRecords(t, q, 0, 5)
			if n := segmentBytes(t, dir); n != 0 {
				t.Fatalf("%d record bytes in the segment before Flush, want 0", n)
			}
			checkRecords(t, pending(t, q), first)
			if err := q.Flush(); err != nil {
				t.Fatal(err)
			}
			var want int64
			for _, r := range first {
				want += int64(frameLen(r.Topic, r.Payload))
			}
			if n := segmentBytes(t, dir); n != want {
				t.Fatalf("%d record bytes in the segment after Flush, want %d", n, want)
			}
			// Past SegmentBytes the buffer is written before the next
			// segment starts, so records keep their order on disk.
			more := appendRecords(t, q, 5, 25)
			if err := q.Flush(); err != nil {
				t.Fatal(err)
			}
			crash(q)

			q = openQueue(t, opts)
			checkRecords(t, pending(t, q), append(first, more...))
			if err := q.Recovered().Err; err != nil {
				t.Errorf("Recovered().Err = %v", err)
			}
		})
	}
}

// Records never flushed are lost by a crash (their appender was told to
// report none of them as stored), and everything flushed before them stays.
func TestWriteBehindLosesOnlyUnflushedRecordsInCrash(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, WriteBehind: true, BatchInterval: idle}
	q := openQueue(t, opts)
	kept := appendRecords(t, q, 0, 3)
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	appendRecords(t, q, 3, 3)
	crash(q)
	q = openQueue(t, opts)
	checkRecords(t, pending(t, q), kept)
}

// The flusher goroutine and Close write buffered records too, and a record
// held only in the buffer and not in memory is still handed out.
func TestWriteBehindBufferIsWrittenByFlusherAndClose(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, WriteBehind: true, BatchInterval: time.Millisecond, MemoryBytes: 1}
	q := openQueue(t, opts)
	all := appendRecords(t, q, 1, 4) // no record is kept in memory
	checkRecords(t, pending(t, q), all)
	deadline := time.Now().Add(5 * time.Second)
	for segmentBytes(t, dir) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the flusher did not write the buffered records")
		}
		time.Sleep(time.Millisecond)
	}
	more := appendRecords(t, q, 5, 2)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	opts.BatchInterval = idle
	q = openQueue(t, opts)
	checkRecords(t, pending(t, q), append(all, more...))
}

// A full buffer is written by Append itself, so the memory it holds stays
// bounded.
func TestWriteBehindBufferIsBounded(t *testing.T) {
	dir := t.TempDir()
	q := openQueue(t, Options{Dir: dir, WriteBehind: true, BatchInterval: idle})
	r := Record{QoS: 1, Topic: "t", Payload: make([]byte, 1000)}
	for range 2 * writeBehindBytes / 1000 {
		if _, err := q.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	q.mu.Lock()
	buffered := len(q.wbuf)
	q.mu.Unlock()
	if buffered >= writeBehindBytes {
		t.Errorf("%d bytes buffered, bound %d", buffered, writeBehindBytes)
	}
	if segmentBytes(t, dir) == 0 {
		t.Error("nothing written after twice the buffer's bound was appended")
	}
}

// A failed write of the buffer fails the queue: Flush reports it (so no
// caller reports those records as stored) and Append refuses new records,
// while the buffered records are still handed out.
func TestWriteBehindWriteFailureFailsTheQueue(t *testing.T) {
	dir := t.TempDir()
	q := openQueue(t, Options{Dir: dir, WriteBehind: true, BatchInterval: idle})
	all := appendRecords(t, q, 0, 3)
	q.mu.Lock()
	q.active.f.Close() // every write to it fails from now on
	q.mu.Unlock()
	if err := q.Flush(); err == nil {
		t.Fatal("Flush succeeded on a closed segment file")
	}
	if err := q.Flush(); err == nil {
		t.Fatal("a second Flush succeeded after a failed write")
	}
	if _, err := q.Append(context.Background(), testRecord(9)); err == nil {
		t.Fatal("Append succeeded on a failed queue")
	}
	checkRecords(t, pending(t, q), all)
}
