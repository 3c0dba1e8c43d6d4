package queue

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/smqtt/smqtt/internal/durable"
)

// Writing and syncing the files, in the order a record's bytes go:
//  1. writeLocked appends the frame with one write(2), or, with
//     WriteBehind, to a buffer that writeBufferLocked writes with one
//     write(2) when Flush, the flusher, rotateLocked or Close asks;
//  2. with SyncAlways, the appender waits in waitSyncedLocked, where one of
//     the waiters fsyncs the active segment for all of them;
//     with SyncBatch, the flusher goroutine fsyncs it every BatchInterval
//     while there is something to sync;
//  3. rotateLocked fsyncs a full segment before starting the next one, so
//     only the active segment ever needs syncing;
//  4. acknowledgements gather in q.pending and the flusher writes them to
//     the ack log, rewriting the log when it has grown too large.

// waitSyncedLocked returns once the first end bytes written since Open are
// fsynced. The first waiter to find no fsync in progress becomes the leader:
// it fsyncs outside the lock, covering everything written so far, while
// later appenders write and queue up for the next fsync.
func (q *Queue) waitSyncedLocked(end uint64) error {
	for q.synced < end {
		if q.err != nil {
			return q.err
		}
		if q.syncing || q.closed {
			// Close fsyncs everything before it finishes.
			q.syncCond.Wait()
			continue
		}
		seg, target := q.active, q.written
		seg.refs++
		q.syncing = true
		f := seg.f
		q.mu.Unlock()
		err := f.Sync()
		q.mu.Lock()
		q.syncing = false
		q.unrefLocked(seg)
		if err != nil {
			q.failLocked(fmt.Errorf("queue: syncing %s: %w", seg.path, err))
		} else {
			q.synced = max(q.synced, target)
			q.fsyncs++
		}
		q.syncCond.Broadcast()
	}
	return nil
}

// rotateLocked starts a new active segment.
func (q *Queue) rotateLocked() error {
	if err := q.writeBufferLocked(); err != nil {
		return err
	}
	old := q.active
	if q.opts.Sync != SyncNone {
		if err := old.f.Sync(); err != nil {
			return q.failLocked(fmt.Errorf("queue: syncing %s: %w", old.path, err))
		}
		q.synced = q.written
		q.fsyncs++
		q.syncCond.Broadcast()
	} else {
		// Close fsyncs it, if it still holds anything by then.
		q.unsynced = slices.DeleteFunc(q.unsynced, func(s *segment) bool { return s.unacked == 0 })
		q.unsynced = append(q.unsynced, old)
	}
	seg, err := q.createSegment(q.nextID)
	if err != nil {
		return err
	}
	q.active = seg
	if old.unacked == 0 {
		q.removeSegmentLocked(old)
	} else {
		q.releaseLocked(old)
	}
	return nil
}

// createSegment creates an empty segment file for IDs from first on.
func (q *Queue) createSegment(first uint64) (*segment, error) {
	path := filepath.Join(q.opts.Dir, segmentName(first))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("queue: creating segment: %w", err)
	}
	if _, err := f.Write([]byte(segmentMagic)); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("queue: writing header of %s: %w", path, err)
	}
	if q.opts.Sync != SyncNone {
		// Make the file's name durable before any record in it is
		// reported durable.
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, fmt.Errorf("queue: syncing %s: %w", path, err)
		}
		if err := syncDir(q.opts.Dir); err != nil {
			f.Close()
			return nil, err
		}
	}
	return &segment{first: first, path: path, f: f, size: magicLen}, nil
}

// removeSegmentLocked deletes a segment whose records are all acknowledged.
func (q *Queue) removeSegmentLocked(seg *segment) {
	// A failed removal leaves a file of acknowledged records, which the
	// next Open drops and removes again.
	_ = os.Remove(seg.path)
	q.releaseLocked(seg)
	if q.reader == seg {
		q.closeReaderLocked()
	}
}

// releaseLocked closes seg's file once no fsync uses it.
func (q *Queue) releaseLocked(seg *segment) {
	seg.closing = true
	if seg.refs == 0 && seg.f != nil {
		// Written and fsynced (or, with SyncNone, not meant to be):
		// a close error has nothing more to tell.
		seg.f.Close()
		seg.f = nil
	}
}

func (q *Queue) unrefLocked(seg *segment) {
	seg.refs--
	if seg.closing {
		q.releaseLocked(seg)
	}
}

// kickLocked tells the flusher there is work once BatchInterval is over.
func (q *Queue) kickLocked() {
	if q.kicked {
		return
	}
	q.kicked = true
	select {
	case q.kick <- struct{}{}:
	default:
	}
}

// run is the flusher goroutine: after each kick it waits BatchInterval and
// then flushes, so that a burst of appends and acks costs one flush. It
// stops, without flushing, when q.stop is closed; Close does the last flush.
func (q *Queue) run() {
	defer close(q.done)
	t := time.NewTimer(q.opts.BatchInterval)
	t.Stop()
	for {
		select {
		case <-q.stop:
			return
		case <-q.kick:
		}
		t.Reset(q.opts.BatchInterval)
		select {
		case <-q.stop:
			t.Stop()
			return
		case <-t.C:
		}
		q.flush()
	}
}

// flush writes buffered records and pending acks and, with SyncBatch, fsyncs
// the active segment.
func (q *Queue) flush() {
	q.mu.Lock()
	q.kicked = false
	q.writeBufferLocked() // a failure is q.err, and no fsync follows
	acks, compact := q.takeAcksLocked()
	var seg *segment
	var f *os.File
	var target uint64
	if q.opts.Sync == SyncBatch && q.synced < q.written && !q.syncing && q.err == nil {
		seg, f, target = q.active, q.active.f, q.written
		seg.refs++
		q.syncing = true
	}
	q.mu.Unlock()

	ackErr := q.persistAcks(acks, compact, q.opts.Sync != SyncNone)
	var segErr error
	if seg != nil {
		segErr = f.Sync()
	}

	q.mu.Lock()
	defer q.mu.Unlock()
	if ackErr != nil {
		// Keep the acks for the next attempt; the log is rewritten then.
		q.pending = append(acks, q.pending...)
		q.kickLocked()
	}
	if seg != nil {
		q.syncing = false
		q.unrefLocked(seg)
		if segErr != nil {
			q.failLocked(fmt.Errorf("queue: syncing %s: %w", seg.path, segErr))
		} else {
			q.synced = max(q.synced, target)
			q.fsyncs++
		}
		q.syncCond.Broadcast()
	}
}

// takeAcksLocked takes the pending acks to write to the ack log. When the
// log has grown well past the state it records, or a write failed, it
// returns instead the complete state, to replace the log with.
func (q *Queue) takeAcksLocked() ([]ackRange, bool) {
	acks := q.pending
	q.pending = nil
	size := q.ackLogSize + int64(len(acks))*ackEntryLen
	if q.ackBroken || size >= max(q.ackCompactMin, 4*q.ackCompacted) {
		return q.ackSnapshotLocked(), true
	}
	return acks, false
}

// ackSnapshotLocked returns the ranges of IDs below nextID that are not
// queued: acknowledged, or lost with a torn segment tail. The ranges also
// keep IDs from being reused after a restart.
func (q *Queue) ackSnapshotLocked() []ackRange {
	var rs []ackRange
	prev := uint64(0)
	for _, e := range q.ents[q.head:] {
		if e.acked {
			continue
		}
		if e.id > prev+1 {
			rs = append(rs, ackRange{prev + 1, e.id - 1})
		}
		prev = e.id
	}
	if q.nextID > prev+1 {
		rs = append(rs, ackRange{prev + 1, q.nextID - 1})
	}
	return rs
}

// persistAcks appends acks to the ack log or, if replace is set, replaces
// the log with one holding just acks. It fsyncs the log if fsync is set
// (a replacement is always fsynced).
func (q *Queue) persistAcks(acks []ackRange, replace, fsync bool) error {
	if replace {
		return q.replaceAckLog(acks)
	}
	if len(acks) == 0 {
		return nil
	}
	buf := appendAckEntries(make([]byte, 0, len(acks)*ackEntryLen), acks)
	n, err := q.ackLog.Write(buf)
	q.ackLogSize += int64(n)
	if err != nil {
		q.ackBroken = true
		return fmt.Errorf("queue: writing ack log: %w", err)
	}
	if fsync {
		if err := q.ackLog.Sync(); err != nil {
			q.ackBroken = true
			return fmt.Errorf("queue: syncing ack log: %w", err)
		}
	}
	return nil
}

// replaceAckLog writes a new ack log holding acks and renames it over the
// old one.
func (q *Queue) replaceAckLog(acks []ackRange) error {
	buf := appendAckEntries(append(make([]byte, 0, magicLen+len(acks)*ackEntryLen), ackMagic...), acks)
	f, err := durable.Replace(filepath.Join(q.opts.Dir, ackLogName), buf)
	if err != nil {
		return fmt.Errorf("queue: rewriting ack log: %w", err)
	}
	if q.ackLog != nil {
		q.ackLog.Close() // fully written and replaced
	}
	q.ackLog = f
	q.ackLogSize = int64(len(buf))
	q.ackCompacted = q.ackLogSize
	q.ackBroken = false
	return nil
}

// syncSealed fsyncs the segments that SyncNone left unsynced when they
// stopped being active and that still hold unacknowledged records.
func (q *Queue) syncSealed() error {
	var errs []error
	for _, seg := range q.unsynced {
		if seg.unacked == 0 {
			continue
		}
		f, err := os.Open(seg.path)
		if err == nil {
			err = f.Sync()
			f.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("queue: syncing %s: %w", seg.path, err))
		}
	}
	q.unsynced = nil
	return errors.Join(errs...)
}

// syncDir fsyncs a directory, making file creations, renames and removals
// in it durable.
func syncDir(dir string) error {
	if err := durable.SyncDir(dir); err != nil {
		return fmt.Errorf("queue: %w", err)
	}
	return nil
}
