package queue

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
)

// defaultAckCompactMin is the ack log size below which it is never
// rewritten: 50 000 out-of-order acks.
const defaultAckCompactMin = 1 << 20

// Open opens the queue in opts.Dir, creating the directory if needed, and
// recovers its state: every record appended and not acknowledged before is
// queued again, in ID order. Torn or corrupt data is truncated away and
// reported by Recovered; Open fails only when a file cannot be read or
// written, or when another Queue has the directory (ErrLocked).
func Open(opts Options) (*Queue, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("queue: creating directory: %w", err)
	}
	lock, err := lockDir(opts.Dir)
	if err != nil {
		return nil, err
	}
	q := &Queue{
		opts:          opts,
		lock:          lock,
		nextID:        1,
		ackCompactMin: defaultAckCompactMin,
		kick:          make(chan struct{}, 1),
		stop:          make(chan struct{}),
		done:          make(chan struct{}),
	}
	q.syncCond = sync.NewCond(&q.mu)
	if err := q.recover(); err != nil {
		if q.active != nil && q.active.f != nil {
			q.active.f.Close()
		}
		if q.ackLog != nil {
			q.ackLog.Close()
		}
		lock.Close()
		return nil, err
	}
	go q.run()
	return q, nil
}

// recover loads the directory's state into q.
func (q *Queue) recover() error {
	dirents, err := os.ReadDir(q.opts.Dir)
	if err != nil {
		return fmt.Errorf("queue: reading directory: %w", err)
	}
	var firsts []uint64
	for _, de := range dirents {
		if first, ok := parseSegmentName(de.Name()); ok && de.Type().IsRegular() {
			firsts = append(firsts, first)
		}
	}
	slices.Sort(firsts)

	var problems []error
	acked, err := q.readAckLog(&problems)
	if err != nil {
		return err
	}

	// Load the segments in order, skipping acknowledged records.
	var segs []*segment
	var lastID uint64
	ai := 0 // acked[ai] is the first range that may hold the next ID
	for _, first := range firsts {
		seg := &segment{first: first, path: filepath.Join(q.opts.Dir, segmentName(first))}
		err := q.loadSegment(seg, &lastID, func(id uint64) bool {
			for ai < len(acked) && acked[ai].hi < id {
				ai++
			}
			return ai < len(acked) && acked[ai].lo <= id
		}, &problems)
		if err != nil {
			return err
		}
		segs = append(segs, seg)
	}

	q.nextID = max(q.nextID, lastID+1)
	if n := len(acked); n > 0 {
		q.nextID = max(q.nextID, acked[n-1].hi+1)
	}
	if n := len(firsts); n > 0 {
		q.nextID = max(q.nextID, firsts[n-1])
	}

	// Replace the ack log by one matching what was loaded, before removing
	// anything it no longer mentions.
	if err := q.replaceAckLog(q.ackSnapshotLocked()); err != nil {
		return err
	}

	// The newest segment stays, to append to; older ones are kept only
	// while they hold unacknowledged records.
	if n := len(segs); n > 0 {
		last := segs[n-1]
		f, err := os.OpenFile(last.path, os.O_RDWR|os.O_APPEND, 0)
		if err != nil {
			return fmt.Errorf("queue: opening segment: %w", err)
		}
		last.f = f
		q.active = last
		for _, seg := range segs[:n-1] {
			if seg.unacked == 0 {
				if err := os.Remove(seg.path); err != nil {
					return fmt.Errorf("queue: removing acknowledged segment: %w", err)
				}
			}
		}
	} else {
		seg, err := q.createSegment(q.nextID)
		if err != nil {
			return err
		}
		q.active = seg
	}
	q.recovery.Segments = len(segs)
	q.recovery.Unacked = q.unacked
	q.recovery.Err = errors.Join(problems...)
	return nil
}

// readAckLog returns the acknowledged ranges in the ack log, sorted and
// merged. A damaged log only loses acknowledgements; the damage is added to
// problems.
func (q *Queue) readAckLog(problems *[]error) ([]ackRange, error) {
	path := filepath.Join(q.opts.Dir, ackLogName)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("queue: reading ack log: %w", err)
	}
	rs, valid, err := parseAckLog(b)
	if err != nil {
		*problems = append(*problems, fmt.Errorf("queue: %s: dropped %d bytes from offset %d, records they acknowledged will be delivered again: %w", ackLogName, len(b)-valid, valid, err))
		q.recovery.Dropped += int64(len(b) - valid)
	}
	slices.SortFunc(rs, func(a, b ackRange) int { return cmp.Compare(a.lo, b.lo) })
	merged := rs[:0]
	for _, r := range rs {
		if n := len(merged); n > 0 && r.lo <= merged[n-1].hi+1 {
			merged[n-1].hi = max(merged[n-1].hi, r.hi)
			continue
		}
		merged = append(merged, r)
	}
	return merged, nil
}

// loadSegment indexes the unacknowledged records of seg, truncating the
// file at the first record that is torn, corrupt or out of order. lastID is
// the ID of the last record loaded so far; isAcked is called with
// increasing IDs.
func (q *Queue) loadSegment(seg *segment, lastID *uint64, isAcked func(uint64) bool, problems *[]error) error {
	f, err := os.OpenFile(seg.path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("queue: opening segment: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("queue: reading segment: %w", err)
	}
	size := fi.Size()
	sc := newSegmentScanner(f, size)
	valid := int64(0)
	if sc.header() {
		valid = magicLen
		for {
			off, b, ok := sc.next()
			if !ok {
				break
			}
			if b.id <= *lastID || b.id < seg.first {
				sc.err = corruptf("record ID %d out of order (previous %d, segment starts at %d)", b.id, *lastID, seg.first)
				break
			}
			*lastID = b.id
			valid = sc.off
			q.recovery.Records++
			if isAcked(b.id) {
				continue
			}
			e := entry{id: b.id, seg: seg, off: off, size: int(sc.off - off), qos: b.qos, retain: b.retain}
			if n := int64(len(b.topic) + len(b.payload)); q.resident+n <= q.opts.MemoryBytes {
				e.resident = true
				e.topic = string(b.topic)
				e.payload = slices.Clone(b.payload)
				q.resident += n
			}
			q.ents = append(q.ents, e)
			q.unacked++
			seg.unacked++
		}
	}
	if sc.err != nil && !errors.Is(sc.err, ErrCorrupt) {
		return fmt.Errorf("queue: reading %s: %w", seg.path, sc.err)
	}
	seg.size = valid
	if valid == size && valid >= magicLen {
		return nil
	}
	if valid < size {
		*problems = append(*problems, fmt.Errorf("queue: %s: dropped %d bytes from offset %d: %w", filepath.Base(seg.path), size-valid, valid, sc.err))
		q.recovery.Dropped += size - valid
		if err := f.Truncate(valid); err != nil {
			return fmt.Errorf("queue: truncating %s: %w", seg.path, err)
		}
	}
	if valid < magicLen {
		// Not even a header survived (or a crash came right after the
		// file was created): start the segment afresh.
		if _, err := f.WriteAt([]byte(segmentMagic), 0); err != nil {
			return fmt.Errorf("queue: rewriting header of %s: %w", seg.path, err)
		}
		seg.size = magicLen
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("queue: syncing %s: %w", seg.path, err)
	}
	return nil
}
