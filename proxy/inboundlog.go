package proxy

// The inbound state's file: data_dir/inbound.log, an append-only log of what
// the replay windows and retained registers accepted, so that a restarted
// sidecar refuses what it delivered before, and of the local persistent
// sessions and the messages held for them (keptsessions.go), so that it
// still delivers what it acknowledged upstream.
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
//	   15 session   client ‖ version u8 ‖ expiry u32 ‖ username (str16)
//	   16 ended     client
//	   17 subscribed    client ‖ filter (str16) ‖ qos u8 ‖ options u8 ‖
//	                    identifier u32; options: bit 0 No Local, bit 1
//	                    Retain As Published, bits 2-3 Retain Handling
//	   18 unsubscribed  client ‖ filter (str16)
//	   19 held      id u64 ‖ created i64 ‖ qos u8 ‖ retain u8 ‖ topic (str16) ‖
//	                payloadLen u32 ‖ payload ‖ n u32 ‖ n × (qos u8 ‖ client)
//	   20 done      id u64 ‖ client
//	  key: groupLen u16 ‖ group ‖ epoch u32 ‖ sender u64
//	  client, str16: len u16 ‖ bytes
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
	"maps"
	"slices"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/smqtt/smqtt/envelope"
)

const (
	inboundLogName  = "inbound.log"
	inboundLogMagic = "SMQTINB1"

	frameKindWindow   = 1
	frameKindAccepted = 2
	frameKindForget   = 3
	frameKindRetained = 4

	// Session mode's frames are kinds 5 to 14 (sessionstate.go); bridge
	// mode's kept sessions, 15 to 20 (keptsessions.go).
	frameKindKeptSession      = 15
	frameKindKeptEnded        = 16
	frameKindKeptSubscribed   = 17
	frameKindKeptUnsubscribed = 18
	frameKindKeptHeld         = 19
	frameKindKeptDone         = 20

	inboundFrameHeader = 8
	// maxInboundFrame bounds a frame's body: a held message with the
	// largest MQTT payload (256 MiB) and its recipients. A length past it
	// is damage, and ends the log.
	maxInboundFrame = 1 << 30
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
	session sessionRecord // session mode's frames (sessionstate.go)

	// bridge mode's kept sessions (keptsessions.go)
	client   []byte // kept sessions' frames
	version  byte
	expiry   uint32
	username []byte
	filter   []byte
	qos      byte
	options  byte
	subID    uint32
	id       uint64 // held, done
	created  int64
	retain   bool
	payload  []byte
	to       []byte // held: n × (qos u8 ‖ client)
	n        int    // held: recipients in to
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

// appendStr16 appends a string with its u16 length; longer strings (which
// MQTT does not allow for client ids, topics and filters) are cut.
func appendStr16(b []byte, v string) []byte {
	v = v[:min(len(v), 65535)]
	b = binary.LittleEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

func parseStr16(b []byte) (v, rest []byte, ok bool) {
	if len(b) < 2 {
		return nil, nil, false
	}
	n := int(binary.LittleEndian.Uint16(b))
	if len(b) < 2+n {
		return nil, nil, false
	}
	return b[2 : 2+n], b[2+n:], true
}

func appendSessionFrame(b []byte, client string, s *keptSession) []byte {
	start := len(b)
	b = appendStr16(beginFrame(b, frameKindKeptSession), client)
	b = append(b, s.version)
	b = binary.LittleEndian.AppendUint32(b, s.expiry)
	b = appendStr16(b, string(s.username))
	endFrame(b, start)
	return b
}

func appendEndedFrame(b []byte, client string) []byte {
	start := len(b)
	b = appendStr16(beginFrame(b, frameKindKeptEnded), client)
	endFrame(b, start)
	return b
}

func appendSubscribedFrame(b []byte, client string, sub packets.Subscription) []byte {
	start := len(b)
	b = appendStr16(beginFrame(b, frameKindKeptSubscribed), client)
	b = appendStr16(b, sub.Filter)
	options := (sub.RetainHandling & 3) << 2
	if sub.NoLocal {
		options |= 1
	}
	if sub.RetainAsPublished {
		options |= 2
	}
	b = append(b, sub.Qos, options)
	b = binary.LittleEndian.AppendUint32(b, uint32(sub.Identifier))
	endFrame(b, start)
	return b
}

func appendUnsubscribedFrame(b []byte, client, filter string) []byte {
	start := len(b)
	b = appendStr16(appendStr16(beginFrame(b, frameKindKeptUnsubscribed), client), filter)
	endFrame(b, start)
	return b
}

// appendHeldFrame appends a held message with the sessions still waiting
// for it, in the order of their names.
func appendHeldFrame(b []byte, m *keptMessage) []byte {
	start := len(b)
	b = beginFrame(b, frameKindKeptHeld)
	b = binary.LittleEndian.AppendUint64(b, m.id)
	b = binary.LittleEndian.AppendUint64(b, uint64(m.created))
	b = append(b, m.qos, boolByte(m.retain))
	b = appendStr16(b, m.topic)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.payload)))
	b = append(b, m.payload...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.waiting)))
	for _, client := range slices.Sorted(maps.Keys(m.waiting)) {
		b = appendStr16(append(b, m.waiting[client]), client)
	}
	endFrame(b, start)
	return b
}

func appendDoneFrame(b []byte, id uint64, client string) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint64(beginFrame(b, frameKindKeptDone), id)
	b = appendStr16(b, client)
	endFrame(b, start)
	return b
}

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
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
	if r.kind >= frameKindKeptSession {
		return parseKeptFrame(rest, r)
	}
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

// parseKeptFrame parses the body of a kept session's frame (after its
// kind).
func parseKeptFrame(rest []byte, r *inboundRecord) bool {
	var ok bool
	if r.kind == frameKindKeptHeld || r.kind == frameKindKeptDone {
		if len(rest) < 8 {
			return false
		}
		r.id, rest = binary.LittleEndian.Uint64(rest), rest[8:]
		if r.kind == frameKindKeptDone {
			r.client, rest, ok = parseStr16(rest)
			return ok && len(rest) == 0
		}
		if len(rest) < 10 {
			return false
		}
		r.created, r.qos, r.retain = int64(binary.LittleEndian.Uint64(rest)), rest[8], rest[9] != 0
		if r.topic, rest, ok = parseStr16(rest[10:]); !ok || len(rest) < 4 {
			return false
		}
		n := int(binary.LittleEndian.Uint32(rest))
		if len(rest) < 4+n+4 {
			return false
		}
		r.payload, rest = rest[4:4+n], rest[4+n:]
		r.n, r.to = int(binary.LittleEndian.Uint32(rest)), rest[4:]
		// Every recipient takes at least 3 bytes: check the list whole
		// here, so that apply can walk it.
		to := r.to
		for range r.n {
			if len(to) < 1 {
				return false
			}
			if _, to, ok = parseStr16(to[1:]); !ok {
				return false
			}
		}
		return len(to) == 0
	}
	if r.client, rest, ok = parseStr16(rest); !ok {
		return false
	}
	switch r.kind {
	case frameKindKeptSession:
		if len(rest) < 5 {
			return false
		}
		r.version, r.expiry = rest[0], binary.LittleEndian.Uint32(rest[1:])
		r.username, rest, ok = parseStr16(rest[5:])
		return ok && len(rest) == 0
	case frameKindKeptEnded:
		return len(rest) == 0
	case frameKindKeptSubscribed:
		if r.filter, rest, ok = parseStr16(rest); !ok || len(rest) != 6 {
			return false
		}
		r.qos, r.options, r.subID = rest[0], rest[1], binary.LittleEndian.Uint32(rest[2:])
		return true
	case frameKindKeptUnsubscribed:
		r.filter, rest, ok = parseStr16(rest)
		return ok && len(rest) == 0
	}
	return false
}
