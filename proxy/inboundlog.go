package proxy

// The inbound state's file: data_dir/inbound.log, an append-only log of what
// the replay windows and retained registers accepted, so that a restarted
// sidecar refuses what it delivered before.
//
// The inbound worker appends one write(2) per batch, before the batch is
// delivered or acknowledged upstream; the sync policy decides when it is
// fsynced (always: before delivery; batch: within 10 ms; none: never by
// itself). A batch's records cost tens of bytes per message, where a store
// of whole windows rewrote a kilobyte or more per sender. When the log has
// grown past twice its last snapshot it is compacted: the whole state is
// written to inbound.log.tmp, fsynced and renamed over the log.
//
// Format (integers little endian, as in the outbound queue):
//
//	magic "SMQTINB1"
//	frames, back to back:
//	  crc  u32  CRC-32C (Castagnoli) of len ‖ body
//	  len  u32  length of body
//	  body: kind u8, then by kind
//	    1 window    key ‖ a whole window (envelope.ReplayWindow encoding)
//	    2 accepted  key ‖ n u16 ‖ n × seq u64, accepted in that order
//	    3 forget    key (the window was evicted)
//	    4 retained  topicLen u16 ‖ topic ‖ epoch u32 ‖ sender u64 ‖ seq u64
//	    5-14        session mode: the app sessions' state (sessionstate.go)
//	  key: groupLen u16 ‖ group ‖ epoch u32 ‖ sender u64
//
// Replaying the frames in order rebuilds exactly the windows that were in
// memory: ReplayWindow.Accept is deterministic. A crash can leave a torn
// last frame; loading stops at the first frame that does not check, and the
// file is cut there.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/smqtt/smqtt/envelope"
)

const (
	inboundLogName  = "inbound.log"
	inboundLogMagic = "SMQTINB1"

	frameKindWindow   = 1
	frameKindAccepted = 2
	frameKindForget   = 3
	frameKindRetained = 4

	inboundFrameHeader = 8
	// maxInboundFrame bounds a frame's body: a window frame with the
	// longest group name, or a retained frame with the longest topic.
	maxInboundFrame = 1 + 8 + 1 + 2 + 65535 + 12 + envelope.MaxReplayWindowEncodingLen
	// maxAcceptRun is the most sequence numbers one accepted frame holds.
	maxAcceptRun = 1<<16 - 1
	// minCompactGrowth is how far the log grows past its snapshot, at
	// least, before it is compacted.
	minCompactGrowth = 4 << 20
)

var inboundCRC = crc32.MakeTable(crc32.Castagnoli)

// errInboundLog reports an inbound log that cannot be read at all.
var errInboundLog = errors.New("malformed inbound log")

// inboundRecord is one decoded frame. Its byte slices alias the decoded
// buffer.
type inboundRecord struct {
	kind    byte
	key     senderKey
	seqs    []byte // accepted: n × u64
	window  []byte // window: its encoding
	topic   []byte
	triple  retainedTriple
	session sessionRecord // session frames (sessionstate.go)
}

// appendKey appends a key's encoding.
func appendKey(b []byte, k senderKey) []byte {
	b = binary.LittleEndian.AppendUint16(b, uint16(len(k.group)))
	b = append(b, k.group...)
	b = binary.LittleEndian.AppendUint32(b, k.epoch)
	return binary.LittleEndian.AppendUint64(b, k.sender)
}

func parseKey(b []byte) (senderKey, []byte, bool) {
	if len(b) < 2 {
		return senderKey{}, nil, false
	}
	n := int(binary.LittleEndian.Uint16(b))
	if len(b) < 2+n+12 {
		return senderKey{}, nil, false
	}
	k := senderKey{
		group:  string(b[2 : 2+n]),
		epoch:  binary.LittleEndian.Uint32(b[2+n:]),
		sender: binary.LittleEndian.Uint64(b[6+n:]),
	}
	return k, b[2+n+12:], true
}

// beginFrame appends a frame header to be completed by endFrame, and the
// body's kind byte.
func beginFrame(b []byte, kind byte) []byte {
	return append(b, 0, 0, 0, 0, 0, 0, 0, 0, kind)
}

// endFrame completes the frame that starts at b[start:].
func endFrame(b []byte, start int) {
	f := b[start:]
	binary.LittleEndian.PutUint32(f[4:], uint32(len(f)-inboundFrameHeader))
	binary.LittleEndian.PutUint32(f, crc32.Checksum(f[4:], inboundCRC))
}

func appendWindowFrame(b []byte, k senderKey, w *envelope.ReplayWindow) []byte {
	start := len(b)
	b = beginFrame(b, frameKindWindow)
	b = appendKey(b, k)
	b, _ = w.AppendBinary(b)
	endFrame(b, start)
	return b
}

func appendForgetFrame(b []byte, k senderKey) []byte {
	start := len(b)
	b = appendKey(beginFrame(b, frameKindForget), k)
	endFrame(b, start)
	return b
}

func appendRetainedFrame(b []byte, topic string, t retainedTriple) []byte {
	start := len(b)
	b = beginFrame(b, frameKindRetained)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(topic)))
	b = append(b, topic...)
	b = binary.LittleEndian.AppendUint32(b, t.Epoch)
	b = binary.LittleEndian.AppendUint64(b, t.Sender)
	b = binary.LittleEndian.AppendUint64(b, t.Seq)
	endFrame(b, start)
	return b
}

// decodeInboundLog calls apply for every frame of data that checks, in
// order, and returns the length of that good prefix. A frame that does not
// check (torn, or corrupt) ends the log there; only a wrong magic, or a
// record apply refuses, is an error.
func decodeInboundLog(data []byte, apply func(*inboundRecord) error) (int, error) {
	if len(data) < len(inboundLogMagic) || string(data[:len(inboundLogMagic)]) != inboundLogMagic {
		return 0, fmt.Errorf("%w: no %q header", errInboundLog, inboundLogMagic)
	}
	off := len(inboundLogMagic)
	var r inboundRecord
	for len(data)-off >= inboundFrameHeader {
		n := int(binary.LittleEndian.Uint32(data[off+4:]))
		if n < 1 || n > maxInboundFrame || len(data)-off-inboundFrameHeader < n {
			break
		}
		end := off + inboundFrameHeader + n
		if crc32.Checksum(data[off+4:end], inboundCRC) != binary.LittleEndian.Uint32(data[off:]) {
			break
		}
		if !parseInboundFrame(data[off+inboundFrameHeader:end], &r) {
			break
		}
		if err := apply(&r); err != nil {
			return off, fmt.Errorf("frame at byte %d: %w", off, err)
		}
		off = end
	}
	return off, nil
}

func parseInboundFrame(body []byte, r *inboundRecord) bool {
	*r = inboundRecord{kind: body[0]}
	rest := body[1:]
	if r.kind >= frameKindSessionBegin {
		return parseSessionFrame(r.kind, rest, r)
	}
	if r.kind == frameKindRetained {
		if len(rest) < 2 {
			return false
		}
		n := int(binary.LittleEndian.Uint16(rest))
		if len(rest) != 2+n+20 {
			return false
		}
		r.topic = rest[2 : 2+n]
		t := rest[2+n:]
		r.triple = retainedTriple{
			Epoch:  binary.LittleEndian.Uint32(t),
			Sender: binary.LittleEndian.Uint64(t[4:]),
			Seq:    binary.LittleEndian.Uint64(t[12:]),
		}
		return true
	}
	var ok bool
	if r.key, rest, ok = parseKey(rest); !ok {
		return false
	}
	switch r.kind {
	case frameKindWindow:
		r.window = rest
		return true
	case frameKindAccepted:
		if len(rest) < 2 {
			return false
		}
		n := int(binary.LittleEndian.Uint16(rest))
		r.seqs = rest[2:]
		return n > 0 && len(r.seqs) == 8*n
	case frameKindForget:
		return len(rest) == 0
	}
	return false
}
