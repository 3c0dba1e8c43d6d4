package gkd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"
)

var (
	replayNow   = time.UnixMilli(1767225600000).UTC()
	replayAlice = [8]byte{0xa1}
	replayBob   = [8]byte{0xb0}
)

func nonceN(n int) (b [16]byte) {
	binary.BigEndian.PutUint64(b[8:], uint64(n))
	return b
}

func TestReplayCacheAcceptsFreshOnceAndRefusesReplays(t *testing.T) {
	c := NewReplayCache(time.Minute, 100)
	if err := c.Check(replayAlice, nonceN(1), replayNow, replayNow); err != nil {
		t.Fatalf("fresh message: %v", err)
	}
	if err := c.Check(replayAlice, nonceN(1), replayNow, replayNow.Add(time.Second)); !errors.Is(err, ErrReplay) {
		t.Errorf("replay = %v, want ErrReplay", err)
	}
	// The same nonce from another sender, and another nonce, are fresh.
	if err := c.Check(replayBob, nonceN(1), replayNow, replayNow); err != nil {
		t.Errorf("same nonce, another sender: %v", err)
	}
	if err := c.Check(replayAlice, nonceN(2), replayNow, replayNow); err != nil {
		t.Errorf("another nonce: %v", err)
	}
	if c.Len() != 3 {
		t.Errorf("Len = %d, want 3", c.Len())
	}
}

func TestReplayCacheRefusesStaleMessages(t *testing.T) {
	const w = time.Minute
	for _, tc := range []struct {
		name string
		sent time.Time
		want error
	}{
		{"on time", replayNow, nil},
		{"window in the past", replayNow.Add(-w), nil},
		{"window in the future", replayNow.Add(w), nil},
		{"just past the window", replayNow.Add(-w - time.Millisecond), ErrStale},
		{"just ahead of the window", replayNow.Add(w + time.Millisecond), ErrStale},
		{"an hour old", replayNow.Add(-time.Hour), ErrStale},
		{"an hour ahead", replayNow.Add(time.Hour), ErrStale},
		{"zero time", time.Time{}, ErrStale},
		{"far future", time.UnixMilli(1<<63 - 1), ErrStale},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := NewReplayCache(w, 10)
			if err := c.Check(replayAlice, nonceN(1), tc.sent, replayNow); !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Errorf("Check = %v, want %v", err, tc.want)
			}
			if wantLen := map[bool]int{true: 1, false: 0}[tc.want == nil]; c.Len() != wantLen {
				t.Errorf("Len = %d, want %d", c.Len(), wantLen)
			}
		})
	}
}

func TestReplayCacheForgetsWhatLeftTheWindow(t *testing.T) {
	c := NewReplayCache(time.Minute, 100)
	for i := range 10 {
		sent := replayNow.Add(time.Duration(i) * time.Second)
		if err := c.Check(replayAlice, nonceN(i), sent, sent); err != nil {
			t.Fatal(err)
		}
	}
	// At replayNow+65s, messages sent before replayNow+5s are stale and
	// forgotten; the others are still remembered.
	later := replayNow.Add(65 * time.Second)
	if err := c.Check(replayBob, nonceN(100), later, later); err != nil {
		t.Fatal(err)
	}
	if c.Len() != 6 {
		t.Errorf("Len = %d, want 6 (5 inside the window and the new one)", c.Len())
	}
	if err := c.Check(replayAlice, nonceN(0), replayNow, later); !errors.Is(err, ErrStale) {
		t.Errorf("replay of a forgotten message = %v, want ErrStale", err)
	}
	if err := c.Check(replayAlice, nonceN(5), replayNow.Add(5*time.Second), later); !errors.Is(err, ErrReplay) {
		t.Errorf("replay inside the window = %v, want ErrReplay", err)
	}
}

func TestReplayCacheStaysSafeWhenTheClockStepsBack(t *testing.T) {
	c := NewReplayCache(time.Minute, 100)
	if err := c.Check(replayAlice, nonceN(1), replayNow, replayNow); err != nil {
		t.Fatal(err)
	}
	later := replayNow.Add(2 * time.Minute)
	if err := c.Check(replayBob, nonceN(2), later, later); err != nil {
		t.Fatal(err)
	}
	// The first pair is forgotten. With the clock back at replayNow it would
	// be inside the window again: it must still be refused.
	if err := c.Check(replayAlice, nonceN(1), replayNow, replayNow); !errors.Is(err, ErrStale) {
		t.Errorf("replay after the clock stepped back = %v, want ErrStale", err)
	}
}

func TestReplayCacheRefusesWhenFullOfLiveEntries(t *testing.T) {
	c := NewReplayCache(time.Minute, 3)
	for i := range 3 {
		if err := c.Check(replayAlice, nonceN(i), replayNow, replayNow); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Check(replayAlice, nonceN(3), replayNow, replayNow); !errors.Is(err, ErrBusy) {
		t.Fatalf("fourth message in a full cache = %v, want ErrBusy", err)
	}
	// Replays are still recognised as such, and nothing was forgotten.
	if err := c.Check(replayAlice, nonceN(0), replayNow, replayNow); !errors.Is(err, ErrReplay) {
		t.Errorf("replay in a full cache = %v, want ErrReplay", err)
	}
	// Once the entries leave the window there is room again.
	later := replayNow.Add(time.Minute + time.Millisecond)
	if err := c.Check(replayAlice, nonceN(3), later, later); err != nil {
		t.Errorf("after the window passed: %v", err)
	}
}

func TestReplayCacheMarshalRoundTrip(t *testing.T) {
	c := NewReplayCache(time.Minute, 100)
	for i := range 20 {
		sender := replayAlice
		if i%2 == 1 {
			sender = replayBob
		}
		sent := replayNow.Add(time.Duration(i%7) * time.Second)
		if err := c.Check(sender, nonceN(i), sent, replayNow); err != nil {
			t.Fatal(err)
		}
	}
	enc, err := c.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if want := 13 + 20*32; len(enc) != want {
		t.Errorf("encoding is %d bytes, want %d", len(enc), want)
	}

	restored := NewReplayCache(time.Minute, 100)
	if err := restored.UnmarshalBinary(enc); err != nil {
		t.Fatalf("UnmarshalBinary: %v", err)
	}
	if restored.Len() != 20 {
		t.Errorf("restored Len = %d, want 20", restored.Len())
	}
	again, _ := restored.MarshalBinary()
	if !bytes.Equal(again, enc) {
		t.Error("re-encoding the restored cache gives other bytes")
	}
	if err := restored.Check(replayBob, nonceN(5), replayNow.Add(5*time.Second), replayNow); !errors.Is(err, ErrReplay) {
		t.Errorf("replay after a restore = %v, want ErrReplay", err)
	}
	// The floor survives too: a message older than what was forgotten stays
	// stale, even for a restarted server whose clock is behind.
	if err := restored.Check(replayBob, nonceN(99), replayNow.Add(-61*time.Second), replayNow.Add(-30*time.Second)); !errors.Is(err, ErrStale) {
		t.Errorf("message from before the saved floor = %v, want ErrStale", err)
	}

	empty, _ := NewReplayCache(time.Minute, 1).MarshalBinary()
	if err := NewReplayCache(time.Minute, 1).UnmarshalBinary(empty); err != nil {
		t.Errorf("empty cache: %v", err)
	}
}

func TestReplayCacheUnmarshalRejectsMalformedInput(t *testing.T) {
	c := NewReplayCache(time.Minute, 100)
	for i := range 3 {
		if err := c.Check(replayAlice, nonceN(i), replayNow.Add(time.Duration(i)*time.Millisecond), replayNow); err != nil {
			t.Fatal(err)
		}
	}
	good, _ := c.MarshalBinary()
	edit := func(f func([]byte)) []byte { b := bytes.Clone(good); f(b); return b }
	entry := func(i int) []byte { return good[13+32*i : 13+32*(i+1)] }
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"short header", good[:12]},
		{"version 2", edit(func(b []byte) { b[0] = 2 })},
		{"count too high", edit(func(b []byte) { b[12]++ })},
		{"count too low", edit(func(b []byte) { b[12]-- })},
		{"trailing byte", append(bytes.Clone(good), 0)},
		{"entries out of order", append(append(bytes.Clone(good[:13]), entry(1)...), append(bytes.Clone(entry(0)), entry(2)...)...)},
		{"duplicate entry", append(append(bytes.Clone(good[:13]), entry(0)...), append(bytes.Clone(entry(0)), entry(2)...)...)},
		{"same pair at two times", edit(func(b []byte) { copy(b[13+32+8:13+32+24], b[13+8:13+24]) })},
		{"entry before the floor", edit(func(b []byte) { binary.BigEndian.PutUint64(b[1:9], uint64(replayNow.UnixMilli()+1)) })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := NewReplayCache(time.Minute, 100).UnmarshalBinary(tc.data); !errors.Is(err, ErrMalformed) {
				t.Errorf("UnmarshalBinary = %v, want ErrMalformed", err)
			}
		})
	}
	var zero ReplayCache
	if err := zero.UnmarshalBinary(good); err == nil {
		t.Error("UnmarshalBinary into a zero ReplayCache succeeded")
	}
}

func TestNewReplayCachePanicsOnNonsense(t *testing.T) {
	for _, tc := range []struct {
		window time.Duration
		max    int
	}{{0, 1}, {time.Microsecond, 1}, {time.Minute, 0}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewReplayCache(%s, %d) did not panic", tc.window, tc.max)
				}
			}()
			NewReplayCache(tc.window, tc.max)
		}()
	}
	if w := NewReplayCache(DefaultReplayWindow, 1).Window(); w != 2*time.Minute {
		t.Errorf("Window = %s", w)
	}
}

func TestReplayCacheConcurrentChecksAcceptEachPairOnce(t *testing.T) {
	c := NewReplayCache(time.Minute, 10000)
	const workers, pairs = 4, 500
	accepted := make([]int, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range pairs {
				if c.Check(replayAlice, nonceN(i), replayNow, replayNow) == nil {
					accepted[w]++
				}
			}
		})
	}
	wg.Wait()
	total := 0
	for _, n := range accepted {
		total += n
	}
	if total != pairs {
		t.Errorf("%d acceptances for %d distinct pairs", total, pairs)
	}
	if _, err := c.MarshalBinary(); err != nil {
		t.Error(err)
	}
}
