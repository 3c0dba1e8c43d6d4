package envelope

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// WindowSize is how many sequence numbers below the highest one seen a
// ReplayWindow still accepts (the highest itself included).
//
// Messages of one sender can arrive out of order when they are in flight
// together: the sidecar keeps at most 1024 messages unacknowledged upstream
// and the broker may deliver resent ones after newer ones. The window is at
// least twice that bound, with margin for brokers that reorder across
// reconnects, so that no in-order-sent message is dropped as "too old".
const WindowSize = 8192

const (
	windowBlockBits = 64
	// The window's sequence numbers span at most WindowSize/64 + 1 blocks of
	// 64 bits, all distinct modulo windowBlocks.
	windowBlocks = WindowSize/windowBlockBits + 1

	windowEncodingVersion = 1
	windowHeaderLen       = 1 + 8 // encoding version, highest
	// MaxReplayWindowEncodingLen bounds the length of MarshalBinary's output.
	MaxReplayWindowEncodingLen = windowHeaderLen + WindowSize/8
)

// ErrReplayWindowEncoding reports a malformed ReplayWindow encoding.
var ErrReplayWindowEncoding = errors.New("envelope: malformed replay window encoding")

// A ReplayWindow is a sliding-window anti-replay filter for the sequence
// numbers of one sender, after wireguard-go's replay package: a ring of 64-bit
// blocks in which bit seq%64 of block (seq/64)%len(ring) records seq.
//
// It accepts a sequence number once, if it is above the highest seen or
// within WindowSize of it; it rejects 0, duplicates and anything older. Feed
// it only messages that [Opener.Open] authenticated, so that forgeries
// cannot move it. The zero value is an empty window, ready to use. A
// ReplayWindow is not safe for concurrent use.
type ReplayWindow struct {
	highest uint64
	ring    [windowBlocks]uint64
}

// Highest returns the highest sequence number accepted so far, 0 if none.
func (w *ReplayWindow) Highest() uint64 { return w.highest }

// Check reports whether Accept(seq) would succeed: seq is not 0, was not
// accepted before, and is within the window. It does not record seq.
func (w *ReplayWindow) Check(seq uint64) bool {
	switch {
	case seq == 0:
		return false
	case seq > w.highest:
		return true
	case w.highest-seq >= WindowSize:
		return false
	}
	return w.ring[(seq/windowBlockBits)%windowBlocks]&(1<<(seq%windowBlockBits)) == 0
}

// Accept records seq and reports whether it was new: it returns false,
// changing nothing, if seq is 0, was accepted before, or is WindowSize or
// more below the highest sequence number accepted.
func (w *ReplayWindow) Accept(seq uint64) bool {
	if !w.Check(seq) {
		return false
	}
	block := seq / windowBlockBits
	if seq > w.highest {
		// Clear the blocks the window slides onto; they last held sequence
		// numbers that are now out of the window.
		cur := w.highest / windowBlockBits
		diff := min(block-cur, windowBlocks)
		for i := cur + 1; i <= cur+diff; i++ {
			w.ring[i%windowBlocks] = 0
		}
		w.highest = seq
	}
	w.ring[block%windowBlocks] |= 1 << (seq % windowBlockBits)
	return true
}

// lowest returns the lowest sequence number the window can still accept
// (if not seen), or 1.
func (w *ReplayWindow) lowest() uint64 {
	if w.highest < WindowSize {
		return 1
	}
	return w.highest - WindowSize + 1
}

// bits returns up to 8 bits of the window starting at sequence number seq,
// bit i for seq+i. Bits beyond the highest are read as stored (zero).
func (w *ReplayWindow) bits8(seq uint64) byte {
	off := seq % windowBlockBits
	blk := seq / windowBlockBits
	v := w.ring[blk%windowBlocks] >> off
	if off > windowBlockBits-8 {
		v |= w.ring[(blk+1)%windowBlocks] << (windowBlockBits - off)
	}
	return byte(v)
}

// MarshalBinary encodes the window so that it can be persisted:
//
//	version u8 (=1) ‖ highest u64 (big-endian) ‖ bitmap
//
// The bitmap has ceil((highest - lo + 1) / 8) bytes, lo = max(1, highest -
// WindowSize + 1), and bit i (byte i/8, least significant bit first) is set
// if sequence number lo+i was accepted. Bits past highest are zero. An empty
// window encodes to 9 bytes, a full one to MaxReplayWindowEncodingLen.
func (w *ReplayWindow) MarshalBinary() ([]byte, error) {
	return w.AppendBinary(make([]byte, 0, MaxReplayWindowEncodingLen))
}

// AppendBinary appends the encoding of MarshalBinary to b.
func (w *ReplayWindow) AppendBinary(b []byte) ([]byte, error) {
	b = append(b, windowEncodingVersion)
	b = binary.BigEndian.AppendUint64(b, w.highest)
	if w.highest == 0 {
		return b, nil
	}
	lo := w.lowest()
	n := w.highest - lo + 1 // bits in the bitmap
	i := uint64(0)
	for ; n-i >= 64; i += 64 { // whole 64-bit runs, least significant byte first
		b = binary.LittleEndian.AppendUint64(b, w.bits64(lo+i))
	}
	for ; i < n; i += 8 {
		v := w.bits8(lo + i)
		if rest := n - i; rest < 8 {
			v &= byte(1)<<rest - 1
		}
		b = append(b, v)
	}
	return b, nil
}

// bits64 returns the 64 bits for sequence numbers seq to seq+63, seq's in
// the least significant bit.
func (w *ReplayWindow) bits64(seq uint64) uint64 {
	off := seq % windowBlockBits
	blk := seq / windowBlockBits
	v := w.ring[blk%windowBlocks] >> off
	if off > 0 {
		v |= w.ring[(blk+1)%windowBlocks] << (windowBlockBits - off)
	}
	return v
}

// UnmarshalBinary replaces the window with the one encoded in data by
// MarshalBinary. It rejects (with ErrReplayWindowEncoding, leaving the window
// unchanged) any other input: an unknown version, a wrong length, bits set
// past the highest sequence number, or a highest sequence number that is not
// itself marked accepted.
func (w *ReplayWindow) UnmarshalBinary(data []byte) error {
	if len(data) < windowHeaderLen {
		return fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrReplayWindowEncoding, len(data), windowHeaderLen)
	}
	if data[0] != windowEncodingVersion {
		return fmt.Errorf("%w: version %d (want %d)", ErrReplayWindowEncoding, data[0], windowEncodingVersion)
	}
	var nw ReplayWindow
	nw.highest = binary.BigEndian.Uint64(data[1:])
	bitmap := data[windowHeaderLen:]
	if nw.highest == 0 {
		if len(bitmap) != 0 {
			return fmt.Errorf("%w: empty window with a %d-byte bitmap", ErrReplayWindowEncoding, len(bitmap))
		}
		*w = nw
		return nil
	}
	lo := nw.lowest()
	n := nw.highest - lo + 1
	if want := (n + 7) / 8; uint64(len(bitmap)) != want {
		return fmt.Errorf("%w: highest %d needs a %d-byte bitmap, got %d bytes", ErrReplayWindowEncoding, nw.highest, want, len(bitmap))
	}
	if rest := n % 8; rest != 0 && bitmap[len(bitmap)-1]>>rest != 0 {
		return fmt.Errorf("%w: bits set past highest %d", ErrReplayWindowEncoding, nw.highest)
	}
	if last := n - 1; bitmap[last/8]&(1<<(last%8)) == 0 {
		return fmt.Errorf("%w: highest %d is not marked accepted", ErrReplayWindowEncoding, nw.highest)
	}
	for i, v := range bitmap {
		for bit := uint64(0); v != 0; bit++ {
			if v&1 != 0 {
				seq := lo + uint64(i)*8 + bit
				nw.ring[(seq/windowBlockBits)%windowBlocks] |= 1 << (seq % windowBlockBits)
			}
			v >>= 1
		}
	}
	*w = nw
	return nil
}
