package gkd

import (
	"cmp"
	"container/heap"
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"
)

// DefaultReplayWindow is the freshness window that the key server applies to
// requests: a request is fresh if its header time is at most this far from
// the server's clock, in either direction.
const DefaultReplayWindow = 2 * time.Minute

// A ReplayCache accepts each (sender, nonce) pair once among the messages
// whose header time lies within a window around the local clock. Messages
// outside the window are stale; pairs inside it are remembered until they
// fall out of it, so a replay is refused for as long as it could otherwise
// be accepted.
//
// Times are compared in whole milliseconds, as headers carry them. The cache
// never moves its notion of "too old" backwards: if the local clock steps
// back, messages older than the oldest ever forgotten stay stale. It holds at
// most max pairs; when full it refuses new ones with [ErrBusy] rather than
// forget a pair that is still inside the window.
//
// Check only messages whose signature was verified, so that forgeries cannot
// fill the cache. A ReplayCache is safe for concurrent use.
type ReplayCache struct {
	window time.Duration
	max    int

	mu     sync.Mutex
	floor  int64 // Unix ms: anything sent before is stale; never decreases
	seen   map[replayKey]struct{}
	byTime replayHeap // the same pairs, oldest first
}

type replayKey struct {
	sender [8]byte
	nonce  [NonceSize]byte
}

type replayEntry struct {
	sent int64 // Unix ms
	key  replayKey
}

// NewReplayCache returns an empty cache with the given window (at least one
// millisecond) and capacity (at least 1). It panics on other values.
func NewReplayCache(window time.Duration, max int) *ReplayCache {
	if window < time.Millisecond || max < 1 {
		panic(fmt.Sprintf("gkd: NewReplayCache(%s, %d): window must be at least 1ms and max at least 1", window, max))
	}
	return &ReplayCache{
		window: window,
		max:    max,
		floor:  math.MinInt64,
		seen:   make(map[replayKey]struct{}),
	}
}

// Window returns the freshness window.
func (c *ReplayCache) Window() time.Duration { return c.window }

// Len returns how many pairs the cache holds.
func (c *ReplayCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}

// Check accepts a message from sender with nonce, sent at sent by the sender's
// clock, and received at now by the local clock. It returns an error wrapping
// [ErrStale] if sent is more than the window before or after now, [ErrReplay]
// if the pair was accepted before, and [ErrBusy] if the cache is full of
// pairs still inside the window; otherwise it remembers the pair and returns
// nil. Pairs that fell out of the window are forgotten first.
func (c *ReplayCache) Check(sender [8]byte, nonce [NonceSize]byte, sent, now time.Time) error {
	sentMs, nowMs := sent.UnixMilli(), now.UnixMilli()
	windowMs := c.window.Milliseconds()

	c.mu.Lock()
	defer c.mu.Unlock()
	c.forgetBefore(subSat(nowMs, windowMs))
	switch {
	case sentMs < c.floor:
		return fmt.Errorf("%w: message from %x sent %s, %s before now (window %s)",
			ErrStale, sender, sent.UTC().Format(time.RFC3339Nano), now.Sub(sent).Round(time.Millisecond), c.window)
	case sentMs > addSat(nowMs, windowMs):
		return fmt.Errorf("%w: message from %x sent %s, %s after now (window %s)",
			ErrStale, sender, sent.UTC().Format(time.RFC3339Nano), sent.Sub(now).Round(time.Millisecond), c.window)
	}
	key := replayKey{sender, nonce}
	if _, ok := c.seen[key]; ok {
		return fmt.Errorf("%w: message from %x with nonce %x", ErrReplay, sender, nonce)
	}
	if len(c.seen) >= c.max {
		return fmt.Errorf("%w: %d messages within the last %s; refusing one from %x", ErrBusy, len(c.seen), c.window, sender)
	}
	c.seen[key] = struct{}{}
	heap.Push(&c.byTime, replayEntry{sentMs, key})
	return nil
}

// forgetBefore raises the floor to floor (never lowers it) and forgets the
// pairs sent before it.
func (c *ReplayCache) forgetBefore(floor int64) {
	if floor > c.floor {
		c.floor = floor
	}
	for len(c.byTime) > 0 && c.byTime[0].sent < c.floor {
		e := heap.Pop(&c.byTime).(replayEntry)
		delete(c.seen, e.key)
	}
}

func subSat(a, b int64) int64 {
	if a < math.MinInt64+b {
		return math.MinInt64
	}
	return a - b
}

func addSat(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// Replay cache encoding: version u8 (1) | floor i64 | count u32 | count
// entries of sender [8] | nonce [16] | sent i64, in strictly increasing
// (sent, sender, nonce) order, each sent at or after floor. Times are Unix
// milliseconds, two's complement.
const (
	replayEncodingVersion = 1
	replayEncodingHeader  = 1 + 8 + 4
	replayEncodingEntry   = 8 + NonceSize + 8
)

// MarshalBinary encodes the cache's contents, for the key server to persist
// across restarts. The window and capacity are not encoded.
func (c *ReplayCache) MarshalBinary() ([]byte, error) {
	c.mu.Lock()
	entries := slices.Clone(c.byTime)
	floor := c.floor
	c.mu.Unlock()

	slices.SortFunc(entries, compareEntries)
	b := make([]byte, 0, replayEncodingHeader+len(entries)*replayEncodingEntry)
	b = append(b, replayEncodingVersion)
	b = binary.BigEndian.AppendUint64(b, uint64(floor))
	b = binary.BigEndian.AppendUint32(b, uint32(len(entries)))
	for _, e := range entries {
		b = append(b, e.key.sender[:]...)
		b = append(b, e.key.nonce[:]...)
		b = binary.BigEndian.AppendUint64(b, uint64(e.sent))
	}
	return b, nil
}

// UnmarshalBinary replaces the cache's contents with those that MarshalBinary
// encoded. The cache must come from [NewReplayCache]; it keeps its window and
// capacity. It may then hold more pairs than its capacity (if that was
// lowered), and refuses new ones until enough fall out of the window. Any
// other input is rejected with an error wrapping [ErrMalformed].
func (c *ReplayCache) UnmarshalBinary(data []byte) error {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("%w: replay cache encoding: %s", ErrMalformed, fmt.Sprintf(format, args...))
	}
	if c.seen == nil {
		return fmt.Errorf("gkd: replay cache: UnmarshalBinary on a cache not made by NewReplayCache")
	}
	if len(data) < replayEncodingHeader {
		return fail("%d bytes, shorter than the %d-byte header", len(data), replayEncodingHeader)
	}
	if data[0] != replayEncodingVersion {
		return fail("version %d, want %d", data[0], replayEncodingVersion)
	}
	floor := int64(binary.BigEndian.Uint64(data[1:9]))
	count := binary.BigEndian.Uint32(data[9:13])
	rest := data[replayEncodingHeader:]
	if uint64(len(rest)) != uint64(count)*replayEncodingEntry {
		return fail("%d entries need %d bytes after the header, have %d", count, uint64(count)*replayEncodingEntry, len(rest))
	}
	entries := make(replayHeap, count)
	seen := make(map[replayKey]struct{}, count)
	for i := range entries {
		p := rest[i*replayEncodingEntry:]
		e := &entries[i]
		copy(e.key.sender[:], p[:8])
		copy(e.key.nonce[:], p[8:8+NonceSize])
		e.sent = int64(binary.BigEndian.Uint64(p[8+NonceSize:]))
		if e.sent < floor {
			return fail("entry %d sent at %d, before the floor %d", i, e.sent, floor)
		}
		if i > 0 && compareEntries(entries[i-1], *e) >= 0 {
			return fail("entry %d out of order", i)
		}
		seen[e.key] = struct{}{}
	}
	if len(seen) != len(entries) {
		// Sorted order makes equal entries adjacent, but the same pair may
		// appear with two times.
		return fail("a (sender, nonce) pair appears twice")
	}
	heap.Init(&entries)

	c.mu.Lock()
	defer c.mu.Unlock()
	c.floor, c.seen, c.byTime = floor, seen, entries
	return nil
}

func compareEntries(a, b replayEntry) int {
	if c := cmp.Compare(a.sent, b.sent); c != 0 {
		return c
	}
	if c := slices.Compare(a.key.sender[:], b.key.sender[:]); c != 0 {
		return c
	}
	return slices.Compare(a.key.nonce[:], b.key.nonce[:])
}

// replayHeap is a min-heap of entries by sent time (container/heap).
type replayHeap []replayEntry

func (h replayHeap) Len() int           { return len(h) }
func (h replayHeap) Less(i, j int) bool { return h[i].sent < h[j].sent }
func (h replayHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *replayHeap) Push(x any)        { *h = append(*h, x.(replayEntry)) }
func (h *replayHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}
