// Package queue is the sidecar's durable outbound queue.
//
// Every message a local app publishes with QoS 1 or 2 is appended here on its
// way upstream (already sealed when its topic is protected: the queue treats
// topic and payload as opaque bytes). The app is acknowledged once Append
// returns, and from then on the message is not lost: not by an upstream
// outage, not by a restart of the sidecar (a clean exit, a crash or SIGKILL),
// and, with SyncAlways, not by a machine crash or power loss. The sender
// takes records with Next in ID order, publishes them upstream with a bounded
// in-flight window, and calls Ack for each one the upstream broker
// acknowledged (in any order). After an upstream reconnect, Rewind makes Next
// hand out again every record that is still unacknowledged; after a restart,
// Open does the same. A record is resent byte for byte, so delivery is at
// least once; receivers drop duplicates with their replay windows.
//
// # Files
//
// Options.Dir (created with mode 0700) holds:
//
//   - segment files, 00000000000000000001.seg and so on, named after the
//     lowest ID they may hold. A segment is an append-only run of records,
//     each framed by its length and a CRC-32C checksum (format.go gives the
//     layout). Appends go to the newest segment; a new one starts once the
//     next record would take it past Options.SegmentBytes. A segment whose
//     records are all acknowledged is deleted.
//   - acks, an append-only log of acknowledged ID ranges, each checksummed.
//     It is rewritten from scratch (through acks.tmp and a rename) at every
//     Open and whenever it grows much larger than the state it describes.
//   - LOCK, locked while a Queue has the directory open, so that two
//     processes never write the same log.
//
// Open reads every segment, drops the records the ack log names, and queues
// the rest in order. A record cut short by a crash, or one that fails its
// checksum, ends its segment: it and everything after it in that segment are
// truncated away, never delivered, and reported by Recovered. Lost
// acknowledgements only cause records to be delivered again. IDs keep
// increasing across restarts.
//
// # Durability
//
// Append writes each record with a single write(2) while holding the queue's
// lock, so the file order is the ID order. With Options.WriteBehind it
// only adds the record to a buffer instead, and Flush (or the background
// goroutine, a full buffer, a new segment or Close) writes everything
// buffered with one write(2); the record survives a process crash once that
// write is done, so the caller calls Flush before it reports the record as
// stored to anyone. What happens next depends on Options.Sync:
//
//   - SyncNone: nothing more; files are fsynced only by Close. A record
//     survives a process crash (the kernel has it), not a power loss.
//   - SyncBatch: a background goroutine fsyncs at most every BatchInterval,
//     and only when something was written. Append does not wait. A power
//     loss can take the records of the last interval.
//   - SyncAlways: Append returns only once an fsync covering its record has
//     completed. Concurrent appenders share fsyncs: one of them syncs for all
//     that are waiting (group commit).
//
// Acknowledgements are kept in memory and written to the ack log by the
// background goroutine every BatchInterval, whatever the policy (fsynced too
// unless the policy is SyncNone), and by Close.
//
// # Memory
//
// The queue holds at most Options.MaxMessages unacknowledged records;
// Append blocks (and TryAppend fails with ErrFull) while it is full. Topics
// and payloads of unacknowledged records are kept in memory up to
// Options.MemoryBytes (64 MiB by default) in total; records beyond that are
// read back from their segment when Next hands them out. The queue's memory
// is therefore bounded by MemoryBytes, plus an 80-byte index entry per
// unacknowledged record (under 20 MB at the default MaxMessages of 100000,
// slice growth included), plus one frame buffer as large as the largest
// record appended or read back (up to MaxPayload; buffers over 1 MiB are
// not kept).
//
// A Queue is safe for concurrent use.
package queue

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"
)

// Sync is the policy that decides when appended records are fsynced.
type Sync int

const (
	// SyncNone fsyncs only on Close: records survive a process crash, not a
	// power loss.
	SyncNone Sync = iota
	// SyncBatch fsyncs in the background at most every BatchInterval.
	SyncBatch
	// SyncAlways makes Append wait for an fsync covering its record.
	SyncAlways
)

// ParseSync parses a sync policy as written in configuration: "none",
// "batch" or "always".
func ParseSync(s string) (Sync, error) {
	switch s {
	case "none":
		return SyncNone, nil
	case "batch":
		return SyncBatch, nil
	case "always":
		return SyncAlways, nil
	}
	return 0, fmt.Errorf("queue: unknown sync policy %q (want none, batch or always)", s)
}

// String returns the policy's configuration name.
func (s Sync) String() string {
	switch s {
	case SyncNone:
		return "none"
	case SyncBatch:
		return "batch"
	case SyncAlways:
		return "always"
	}
	return fmt.Sprintf("Sync(%d)", int(s))
}

// Limits of a Record.
const (
	// MaxTopic is the longest topic a record may carry (an MQTT topic's limit).
	MaxTopic = 65535
	// MaxPayload is the largest payload a record may carry: the MQTT maximum
	// packet size, which bounds any payload an app or broker can send.
	MaxPayload = 268435455
)

// Defaults for the zero values of Options.
const (
	DefaultMaxMessages   = 100000
	DefaultBatchInterval = 10 * time.Millisecond
	DefaultSegmentBytes  = 64 << 20
	DefaultMemoryBytes   = 64 << 20
)

// Options configures a Queue. Zero values select the defaults.
type Options struct {
	// Dir holds the queue's files. It is created (mode 0700) if missing.
	Dir string
	// MaxMessages bounds the unacknowledged records; DefaultMaxMessages
	// if zero.
	MaxMessages int
	// Sync is the fsync policy.
	Sync Sync
	// BatchInterval is the longest time between a write and its fsync with
	// SyncBatch, and between an Ack and its write to the ack log;
	// DefaultBatchInterval if zero.
	BatchInterval time.Duration
	// SegmentBytes is the size at which a new segment file is started;
	// DefaultSegmentBytes if zero.
	SegmentBytes int64
	// MemoryBytes bounds the topic and payload bytes kept in memory;
	// DefaultMemoryBytes if zero.
	MemoryBytes int64
	// WriteBehind makes Append buffer records (up to writeBehindBytes)
	// instead of writing each with a system call of its own; Flush writes
	// them. Ignored with SyncAlways, whose Append writes and fsyncs.
	WriteBehind bool
}

// writeBehindBytes is the most that Options.WriteBehind buffers: past it,
// Append writes the buffer itself.
const writeBehindBytes = 256 << 10

func (o Options) withDefaults() (Options, error) {
	if o.Dir == "" {
		return o, errors.New("queue: no directory given")
	}
	if o.MaxMessages < 0 || o.BatchInterval < 0 || o.SegmentBytes < 0 || o.MemoryBytes < 0 {
		return o, fmt.Errorf("queue: negative limit in options %+v", o)
	}
	if o.Sync < SyncNone || o.Sync > SyncAlways {
		return o, fmt.Errorf("queue: unknown sync policy %v", o.Sync)
	}
	if o.MaxMessages == 0 {
		o.MaxMessages = DefaultMaxMessages
	}
	if o.BatchInterval == 0 {
		o.BatchInterval = DefaultBatchInterval
	}
	if o.SegmentBytes == 0 {
		o.SegmentBytes = DefaultSegmentBytes
	}
	if o.MemoryBytes == 0 {
		o.MemoryBytes = DefaultMemoryBytes
	}
	return o, nil
}

// Record is one queued message.
type Record struct {
	// ID is assigned by Append (the value passed in is ignored). IDs
	// increase strictly, across restarts too.
	ID     uint64
	QoS    byte
	Retain bool
	Topic  string
	// Payload is copied by Append. The Payload returned by Next is the
	// caller's to keep until Ack, and must not be modified: the queue may
	// hand out the same bytes again after Rewind.
	Payload []byte
}

// Recovery describes what Open found in the directory.
type Recovery struct {
	Segments int   // segment files read
	Records  int   // well-formed records in them, acknowledged or not
	Unacked  int   // records queued for delivery
	Dropped  int64 // bytes truncated away as torn or corrupt
	// Err describes every part of a file that was dropped, one error per
	// part (joined with errors.Join), each matching ErrCorrupt; nil when
	// every file was intact.
	Err error
}

var (
	// ErrClosed is returned by operations on a closed Queue.
	ErrClosed = errors.New("queue: closed")
	// ErrFull is returned by TryAppend when the queue holds MaxMessages
	// unacknowledged records.
	ErrFull = errors.New("queue: full")
	// ErrCorrupt matches errors about torn or corrupt data in the queue's
	// files.
	ErrCorrupt = errors.New("queue: corrupt data")
	// ErrLocked is returned by Open when another Queue has the directory.
	ErrLocked = errors.New("queue: directory in use by another queue")
	// ErrInvalidRecord is returned by Append for a record that cannot be
	// stored.
	ErrInvalidRecord = errors.New("queue: invalid record")
)

// entry is the in-memory index of one record, in ID order in Queue.ents.
type entry struct {
	id       uint64
	seg      *segment // nil once acked
	off      int64    // frame offset in seg
	size     int      // frame length
	qos      byte
	retain   bool
	acked    bool
	resident bool // topic and payload are held here, not only on disk
	topic    string
	payload  []byte
}

// segment is one segment file.
type segment struct {
	first   uint64 // the ID in the file name
	path    string
	f       *os.File // open while active, while being fsynced, or nil
	size    int64
	unacked int  // records in it not yet acknowledged
	refs    int  // fsyncs in progress outside Queue.mu
	closing bool // close f once refs is zero
}

// Queue is a durable FIFO of records awaiting upstream acknowledgement.
type Queue struct {
	opts     Options
	lock     *os.File
	recovery Recovery

	mu       sync.Mutex
	syncCond *sync.Cond // signalled when synced, syncing or err change
	closed   bool
	err      error // a failure after which nothing more is written

	ents    []entry // records from ents[head] on, in ID order; ents[head] is unacked
	head    int
	cur     int // index in ents of the next record Next considers
	unacked int
	nextID  uint64

	active   *segment // the segment appended to
	reader   *segment // the segment readerF reads, for records not resident
	readerF  *os.File
	resident int64 // topic and payload bytes held in ents
	scratch  []byte

	// wbuf holds the frames Append buffered (Options.WriteBehind), which
	// belong at offset wbufOff of the active segment.
	wbuf    []byte
	wbufOff int64

	written uint64 // frame bytes written since Open
	synced  uint64 // frame bytes known to be fsynced
	syncing bool   // an fsync of the active segment runs outside mu
	fsyncs  int    // segment fsyncs since Open
	// unsynced are the segments SyncNone stopped appending to, for Close to
	// fsync.
	unsynced []*segment

	pending []ackRange // acks not yet written to the ack log
	kicked  bool       // the flusher has been told there is work

	dataCh  chan struct{} // closed when Next may find a record
	spaceCh chan struct{} // closed when Append may find space

	// Owned by the flusher goroutine, and by Open and Close while it is
	// not running.
	ackLog        *os.File
	ackLogSize    int64
	ackCompacted  int64 // ackLogSize after the last rewrite
	ackCompactMin int64 // the log is not rewritten below this size
	ackBroken     bool  // a failed write may have left a partial entry

	kick chan struct{}
	stop chan struct{}
	done chan struct{}
}

// Recovered reports what Open found and repaired.
func (q *Queue) Recovered() Recovery { return q.recovery }

// Len returns the number of unacknowledged records.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.unacked
}

func checkRecord(r Record) error {
	switch {
	case r.QoS > 2:
		return fmt.Errorf("%w: QoS %d on topic %q", ErrInvalidRecord, r.QoS, r.Topic)
	case len(r.Topic) > MaxTopic:
		return fmt.Errorf("%w: topic of %d bytes, at most %d", ErrInvalidRecord, len(r.Topic), MaxTopic)
	case len(r.Payload) > MaxPayload:
		return fmt.Errorf("%w: payload of %d bytes on topic %q, at most %d", ErrInvalidRecord, len(r.Payload), r.Topic, MaxPayload)
	}
	return nil
}

// Append stores r and returns the ID it assigned. It blocks while the queue
// holds MaxMessages unacknowledged records, until an Ack makes room or ctx
// is done (it then returns ctx.Err()). With SyncAlways it also waits for an
// fsync covering the record. Once Append has returned without error the
// record will be delivered by Next, now or after a restart, until acked.
func (q *Queue) Append(ctx context.Context, r Record) (uint64, error) {
	return q.append(ctx, r, true)
}

// TryAppend is Append without waiting for room: it returns ErrFull when the
// queue holds MaxMessages unacknowledged records. With SyncAlways it still
// waits for the fsync.
func (q *Queue) TryAppend(r Record) (uint64, error) {
	return q.append(context.Background(), r, false)
}

func (q *Queue) append(ctx context.Context, r Record, wait bool) (uint64, error) {
	if err := checkRecord(r); err != nil {
		return 0, err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if q.closed {
			return 0, ErrClosed
		}
		if q.err != nil {
			return 0, q.err
		}
		if q.unacked < q.opts.MaxMessages {
			break
		}
		if !wait {
			return 0, ErrFull
		}
		if q.spaceCh == nil {
			q.spaceCh = make(chan struct{})
		}
		ch := q.spaceCh
		q.mu.Unlock()
		select {
		case <-ch:
			q.mu.Lock()
		case <-ctx.Done():
			q.mu.Lock()
			return 0, ctx.Err()
		}
	}
	id, end, err := q.writeLocked(r)
	if err != nil {
		return 0, err
	}
	if q.opts.Sync == SyncAlways {
		if err := q.waitSyncedLocked(end); err != nil {
			return 0, err
		}
	}
	return id, nil
}

// writeLocked writes r to the active segment, indexes it and returns its ID
// and the value q.written must reach for it to be covered by an fsync.
func (q *Queue) writeLocked(r Record) (uint64, uint64, error) {
	if q.nextID > maxID {
		return 0, 0, fmt.Errorf("queue: record IDs exhausted (next would be %d)", q.nextID)
	}
	size := frameLen(r.Topic, r.Payload)
	if q.active.size > magicLen && q.active.size+int64(size) > q.opts.SegmentBytes {
		if err := q.rotateLocked(); err != nil {
			return 0, 0, err
		}
	}
	seg := q.active
	id := q.nextID
	if q.writeBehind() {
		if len(q.wbuf) == 0 {
			q.wbufOff = seg.size
		}
		n := len(q.wbuf)
		q.wbuf = slices.Grow(q.wbuf, size)[:n+size]
		putFrame(q.wbuf[n:], id, r.QoS, r.Retain, r.Topic, r.Payload)
	} else {
		if cap(q.scratch) < size {
			q.scratch = make([]byte, size)
		}
		frame := q.scratch[:size]
		putFrame(frame, id, r.QoS, r.Retain, r.Topic, r.Payload)
		if n, err := seg.f.Write(frame); err != nil {
			err = fmt.Errorf("queue: writing record %d to %s: %w", id, seg.path, err)
			if n > 0 {
				// Cut the partial frame off, or it would end the segment
				// for every record appended after it.
				if terr := seg.f.Truncate(seg.size); terr != nil {
					return 0, 0, q.failLocked(errors.Join(err, fmt.Errorf("queue: truncating %s: %w", seg.path, terr)))
				}
			}
			return 0, 0, err
		}
		if cap(q.scratch) > 1<<20 {
			q.scratch = nil
		}
		q.written += uint64(size)
	}

	e := entry{id: id, seg: seg, off: seg.size, size: size, qos: r.QoS, retain: r.Retain}
	if n := int64(len(r.Topic) + len(r.Payload)); q.resident+n <= q.opts.MemoryBytes {
		e.resident = true
		e.topic = r.Topic
		e.payload = bytes.Clone(r.Payload)
		q.resident += n
	}
	q.ents = append(q.ents, e)
	q.nextID++
	q.unacked++
	seg.unacked++
	seg.size += int64(size)
	wake(&q.dataCh)
	switch {
	case len(q.wbuf) >= writeBehindBytes:
		// The record is indexed already: a failure here fails the queue,
		// and Append reports it.
		if err := q.writeBufferLocked(); err != nil {
			return 0, 0, err
		}
	case q.opts.Sync == SyncBatch || len(q.wbuf) > 0:
		q.kickLocked()
	}
	return id, q.written, nil
}

func (q *Queue) writeBehind() bool { return q.opts.WriteBehind && q.opts.Sync != SyncAlways }

// Flush writes the records that Append buffered (Options.WriteBehind) to
// their segment file with one write(2). Once it returns nil, every record
// appended before the call survives a crash of this process (and, after
// the next fsync, of the machine). Without WriteBehind it does nothing. It
// returns the queue's failure, if it has failed.
func (q *Queue) Flush() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.writeBufferLocked()
}

// writeBufferLocked writes wbuf to the active segment. A failed write fails
// the queue: its records may have been handed to the sender already, and
// which of them a caller reported as stored cannot be told. They stay
// buffered, so Next still hands them out.
func (q *Queue) writeBufferLocked() error {
	if q.err != nil || len(q.wbuf) == 0 {
		return q.err
	}
	seg := q.active
	n, err := seg.f.Write(q.wbuf)
	if err != nil {
		err = fmt.Errorf("queue: writing %d buffered bytes to %s at offset %d: %w", len(q.wbuf), seg.path, q.wbufOff, err)
		if n > 0 {
			if terr := seg.f.Truncate(q.wbufOff); terr != nil {
				err = errors.Join(err, fmt.Errorf("queue: truncating %s: %w", seg.path, terr))
			}
		}
		return q.failLocked(err)
	}
	q.written += uint64(n)
	if cap(q.wbuf) > 2*writeBehindBytes {
		q.wbuf = nil
	} else {
		q.wbuf = q.wbuf[:0]
	}
	return nil
}

// Next returns the next record not yet handed out in this pass, in ID
// order, waiting for one to be appended if need be. It returns ctx.Err()
// when ctx is done first, and ErrClosed once the queue is closed.
//
// If a record that was not held in memory can no longer be read back
// correctly from its segment, Next drops it from the queue and returns an
// error matching ErrCorrupt, with the record's ID in the returned Record;
// the following call goes on with the next record. Should the read itself
// fail, Next returns that error and the record stays queued: it comes
// again after Rewind.
func (q *Queue) Next(ctx context.Context) (Record, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if q.closed {
			return Record{}, ErrClosed
		}
		for q.cur < len(q.ents) && q.ents[q.cur].acked {
			q.cur++
		}
		if q.cur < len(q.ents) {
			i := q.cur
			q.cur++
			return q.recordLocked(i)
		}
		if q.dataCh == nil {
			q.dataCh = make(chan struct{})
		}
		ch := q.dataCh
		q.mu.Unlock()
		select {
		case <-ch:
			q.mu.Lock()
		case <-ctx.Done():
			q.mu.Lock()
			return Record{}, ctx.Err()
		}
	}
}

// recordLocked returns the record at ents[i], reading it back from its
// segment if it is not resident.
func (q *Queue) recordLocked(i int) (Record, error) {
	e := &q.ents[i]
	if e.resident {
		return Record{ID: e.id, QoS: e.qos, Retain: e.retain, Topic: e.topic, Payload: e.payload}, nil
	}
	id, path, off := e.id, e.seg.path, e.off
	f, err := q.readerLocked(e.seg)
	if err != nil {
		return Record{ID: id}, err
	}
	frame := make([]byte, e.size)
	if e.seg == q.active && len(q.wbuf) > 0 && e.off >= q.wbufOff {
		copy(frame, q.wbuf[e.off-q.wbufOff:]) // not written yet
	} else if _, err := f.ReadAt(frame, e.off); err != nil {
		return Record{ID: id}, fmt.Errorf("queue: reading record %d from %s at offset %d: %w", id, path, off, err)
	}
	b, err := checkFrame(frame)
	if err == nil && b.id != id {
		err = corruptf("found record %d", b.id)
	}
	if err != nil {
		q.ackLocked(i)
		return Record{ID: id}, fmt.Errorf("queue: record %d in %s at offset %d, dropped: %w", id, path, off, err)
	}
	return Record{ID: id, QoS: b.qos, Retain: b.retain, Topic: string(b.topic), Payload: b.payload}, nil
}

// readerLocked returns a file to read seg's records from.
func (q *Queue) readerLocked(seg *segment) (*os.File, error) {
	if seg == q.active {
		return seg.f, nil
	}
	if q.reader == seg {
		return q.readerF, nil
	}
	q.closeReaderLocked()
	f, err := os.Open(seg.path)
	if err != nil {
		return nil, fmt.Errorf("queue: opening segment: %w", err)
	}
	q.reader, q.readerF = seg, f
	return f, nil
}

func (q *Queue) closeReaderLocked() {
	if q.readerF != nil {
		q.readerF.Close() // read-only: nothing to lose
		q.reader, q.readerF = nil, nil
	}
}

// Rewind makes Next start again from the oldest unacknowledged record, so
// that every record handed out but not acknowledged is handed out again, in
// order. Call it after an upstream reconnect.
func (q *Queue) Rewind() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.cur = q.head
	wake(&q.dataCh)
}

// Ack marks the record with the given ID as delivered, so that it is never
// handed out again. Acking an unknown or already acknowledged ID does
// nothing.
func (q *Queue) Ack(id uint64) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	if i, ok := q.findLocked(id); ok {
		q.ackLocked(i)
	}
	return nil
}

// findLocked returns the index in ents of the unacknowledged record id.
func (q *Queue) findLocked(id uint64) (int, bool) {
	live := q.ents[q.head:]
	if len(live) == 0 {
		return 0, false
	}
	if live[0].id == id { // acks mostly come in order
		return q.head, true
	}
	k, found := slices.BinarySearchFunc(live, id, func(e entry, id uint64) int { return cmp.Compare(e.id, id) })
	if !found || live[k].acked {
		return 0, false
	}
	return q.head + k, true
}

func (q *Queue) ackLocked(i int) {
	e := &q.ents[i]
	e.acked = true
	q.unacked--
	if e.resident {
		q.resident -= int64(len(e.topic) + len(e.payload))
		e.topic, e.payload, e.resident = "", nil, false
	}
	if n := len(q.pending); n > 0 && q.pending[n-1].hi+1 == e.id {
		q.pending[n-1].hi = e.id
	} else {
		q.pending = append(q.pending, ackRange{e.id, e.id})
	}
	q.kickLocked()

	seg := e.seg
	e.seg = nil
	seg.unacked--
	if seg.unacked == 0 && seg != q.active {
		q.removeSegmentLocked(seg)
	}

	for q.head < len(q.ents) && q.ents[q.head].acked {
		q.ents[q.head] = entry{}
		q.head++
	}
	q.cur = max(q.cur, q.head)
	switch {
	case q.head == len(q.ents):
		q.ents, q.head, q.cur = q.ents[:0], 0, 0
	case q.head >= 1024 && q.head >= len(q.ents)/2:
		n := copy(q.ents, q.ents[q.head:])
		clear(q.ents[n:])
		q.ents = q.ents[:n]
		q.cur -= q.head
		q.head = 0
	}
	if q.unacked < q.opts.MaxMessages {
		wake(&q.spaceCh)
	}
}

// wake wakes everyone waiting on *ch.
func wake(ch *chan struct{}) {
	if *ch != nil {
		close(*ch)
		*ch = nil
	}
}

// failLocked records err as the queue's failure: nothing more is appended.
func (q *Queue) failLocked(err error) error {
	if q.err == nil {
		q.err = err
	}
	q.syncCond.Broadcast()
	return err
}

// Close writes pending acknowledgements, fsyncs and closes the files, and
// wakes every blocked call. It returns the first failure the queue met, if
// any. Calling Close again does nothing.
func (q *Queue) Close() error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	wake(&q.dataCh)
	wake(&q.spaceCh)
	q.mu.Unlock()

	close(q.stop)
	<-q.done

	q.mu.Lock()
	defer q.mu.Unlock()
	for q.syncing {
		q.syncCond.Wait()
	}
	q.writeBufferLocked() // a failure is q.err
	errs := []error{q.err}
	acks, compact := q.takeAcksLocked()
	if err := q.persistAcks(acks, compact, true); err != nil {
		errs = append(errs, err)
	}
	if err := q.syncSealed(); err != nil {
		errs = append(errs, err)
	}
	if err := q.active.f.Sync(); err != nil {
		errs = append(errs, q.failLocked(fmt.Errorf("queue: syncing %s: %w", q.active.path, err)))
	} else {
		q.synced = q.written
	}
	if err := syncDir(q.opts.Dir); err != nil {
		errs = append(errs, err)
	}
	q.syncCond.Broadcast()
	if err := q.ackLog.Close(); err != nil {
		errs = append(errs, fmt.Errorf("queue: closing ack log: %w", err))
	}
	if err := q.active.f.Close(); err != nil {
		errs = append(errs, fmt.Errorf("queue: closing %s: %w", q.active.path, err))
	}
	q.active.f = nil
	q.closeReaderLocked()
	q.lock.Close() // releases the directory lock; nothing was written to it
	return errors.Join(errs...)
}
