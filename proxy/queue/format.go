package queue

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"strconv"
	"strings"
)

// On-disk format. All integers are little endian.
//
// A segment file starts with segmentMagic and holds frames back to back:
//
//	crc    u32  CRC-32C (Castagnoli) of len ‖ body
//	len    u32  length of body
//	body:
//	  id       u64  record ID, strictly increasing through the log
//	  qos      u8   1 or 2 (0 is accepted too)
//	  flags    u8   bit 0: retain; other bits zero
//	  topicLen u16
//	  topic    topicLen bytes
//	  payload  the rest of body
//
// The ack log starts with ackMagic and holds ack entries back to back:
//
//	lo  u64  first acknowledged ID
//	hi  u64  last acknowledged ID (lo ≤ hi)
//	crc u32  CRC-32C of lo ‖ hi
const (
	segmentMagic = "SMQTSEG1"
	ackMagic     = "SMQTACK1"
	magicLen     = 8

	frameHeaderLen = 8  // crc, len
	bodyFixedLen   = 12 // id, qos, flags, topicLen
	recordOverhead = frameHeaderLen + bodyFixedLen
	ackEntryLen    = 20

	flagRetain = 1 << 0

	maxBodyLen = bodyFixedLen + MaxTopic + MaxPayload

	// maxID is the largest record ID; IDs start at 1.
	maxID = math.MaxInt64

	segmentSuffix = ".seg"
	segmentDigits = 20
	ackLogName    = "acks"
	lockName      = "LOCK"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// segmentName returns the file name of the segment whose records have IDs of
// at least first.
func segmentName(first uint64) string {
	return fmt.Sprintf("%0*d%s", segmentDigits, first, segmentSuffix)
}

// parseSegmentName reports the first ID encoded in a segment file name.
func parseSegmentName(name string) (uint64, bool) {
	digits, ok := strings.CutSuffix(name, segmentSuffix)
	if !ok || len(digits) != segmentDigits {
		return 0, false
	}
	n, err := strconv.ParseUint(digits, 10, 64)
	if err != nil || n > maxID {
		return 0, false
	}
	return n, true
}

// frameLen is the on-disk size of a record with the given topic and payload.
func frameLen(topic string, payload []byte) int {
	return recordOverhead + len(topic) + len(payload)
}

// putFrame encodes a record into dst, which must be exactly frameLen bytes
// long.
func putFrame(dst []byte, id uint64, qos byte, retain bool, topic string, payload []byte) {
	var flags byte
	if retain {
		flags |= flagRetain
	}
	binary.LittleEndian.PutUint32(dst[4:], uint32(len(dst)-frameHeaderLen))
	b := dst[frameHeaderLen:]
	binary.LittleEndian.PutUint64(b[0:], id)
	b[8] = qos
	b[9] = flags
	binary.LittleEndian.PutUint16(b[10:], uint16(len(topic)))
	n := copy(b[bodyFixedLen:], topic)
	copy(b[bodyFixedLen+n:], payload)
	binary.LittleEndian.PutUint32(dst[0:], crc32.Checksum(dst[4:], castagnoli))
}

// body is a decoded frame body. Topic and Payload alias the buffer it was
// decoded from.
type body struct {
	id      uint64
	qos     byte
	retain  bool
	topic   []byte
	payload []byte
}

// corruption is a format violation found in a file. It matches ErrCorrupt.
type corruption struct{ msg string }

func (e *corruption) Error() string        { return e.msg }
func (e *corruption) Is(target error) bool { return target == ErrCorrupt }

func corruptf(format string, a ...any) error {
	return &corruption{fmt.Sprintf(format, a...)}
}

// decodeBody parses a frame body whose checksum has been verified.
func decodeBody(b []byte) (body, error) {
	if len(b) < bodyFixedLen {
		return body{}, corruptf("body is %d bytes, need at least %d", len(b), bodyFixedLen)
	}
	r := body{
		id:  binary.LittleEndian.Uint64(b[0:]),
		qos: b[8],
	}
	flags := b[9]
	topicLen := int(binary.LittleEndian.Uint16(b[10:]))
	switch {
	case r.id == 0 || r.id > maxID:
		return body{}, corruptf("record ID %d out of range", r.id)
	case r.qos > 2:
		return body{}, corruptf("invalid QoS %d", r.qos)
	case flags&^flagRetain != 0:
		return body{}, corruptf("unknown flags %#x", flags)
	case topicLen > len(b)-bodyFixedLen:
		return body{}, corruptf("topic length %d exceeds body", topicLen)
	}
	r.retain = flags&flagRetain != 0
	r.topic = b[bodyFixedLen : bodyFixedLen+topicLen]
	r.payload = b[bodyFixedLen+topicLen:]
	return r, nil
}

// checkFrame verifies a whole frame read back from a segment at a known
// place and returns its decoded body.
func checkFrame(frame []byte) (body, error) {
	if len(frame) < frameHeaderLen {
		return body{}, corruptf("frame is %d bytes", len(frame))
	}
	n := binary.LittleEndian.Uint32(frame[4:])
	if int64(n) != int64(len(frame)-frameHeaderLen) {
		return body{}, corruptf("length field %d, expected %d", n, len(frame)-frameHeaderLen)
	}
	if got, want := crc32.Checksum(frame[4:], castagnoli), binary.LittleEndian.Uint32(frame); got != want {
		return body{}, corruptf("checksum mismatch")
	}
	return decodeBody(frame[frameHeaderLen:])
}

// segmentScanner reads the frames of one segment file in order, stopping at
// the first frame that is incomplete or fails its checks.
type segmentScanner struct {
	r    *bufio.Reader
	size int64  // file size
	off  int64  // offset of the next frame
	buf  []byte // reused frame buffer
	err  error  // why scanning stopped early, nil at a clean end
}

func newSegmentScanner(r io.Reader, size int64) *segmentScanner {
	return &segmentScanner{r: bufio.NewReaderSize(r, 1<<20), size: size}
}

// header checks the segment magic. It reports false, with s.err set, when
// the file is too short or does not start with the magic.
func (s *segmentScanner) header() bool {
	if s.size < magicLen {
		s.err = corruptf("file is %d bytes, shorter than its header", s.size)
		return false
	}
	var m [magicLen]byte
	if _, err := io.ReadFull(s.r, m[:]); err != nil {
		s.err = fmt.Errorf("reading header: %w", err)
		return false
	}
	if string(m[:]) != segmentMagic {
		s.err = corruptf("bad header %q", m[:])
		return false
	}
	s.off = magicLen
	return true
}

// next returns the next frame's offset and decoded body, valid until the
// following call. It reports false at the end of the valid frames: s.err is
// then nil at a clean end of file, or says why the rest of the file is
// unusable.
func (s *segmentScanner) next() (int64, body, bool) {
	rest := s.size - s.off
	if rest == 0 {
		return 0, body{}, false
	}
	if rest < frameHeaderLen {
		s.err = corruptf("%d trailing bytes, a partial frame header", rest)
		return 0, body{}, false
	}
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(s.r, h[:]); err != nil {
		s.err = fmt.Errorf("reading frame header: %w", err)
		return 0, body{}, false
	}
	n := int64(binary.LittleEndian.Uint32(h[4:]))
	switch {
	case n > maxBodyLen:
		s.err = corruptf("frame length %d exceeds the maximum %d", n, maxBodyLen)
		return 0, body{}, false
	case n > rest-frameHeaderLen:
		s.err = corruptf("frame of %d bytes, only %d left in the file", frameHeaderLen+n, rest)
		return 0, body{}, false
	}
	if int64(cap(s.buf)) < n {
		s.buf = make([]byte, n)
	}
	b := s.buf[:n]
	if _, err := io.ReadFull(s.r, b); err != nil {
		s.err = fmt.Errorf("reading frame body: %w", err)
		return 0, body{}, false
	}
	crc := crc32.Update(crc32.Checksum(h[4:], castagnoli), castagnoli, b)
	if crc != binary.LittleEndian.Uint32(h[:]) {
		s.err = corruptf("checksum mismatch")
		return 0, body{}, false
	}
	rec, err := decodeBody(b)
	if err != nil {
		s.err = err
		return 0, body{}, false
	}
	off := s.off
	s.off += frameHeaderLen + n
	return off, rec, true
}

// ackRange is an inclusive range of acknowledged IDs.
type ackRange struct{ lo, hi uint64 }

func putAckEntry(dst []byte, r ackRange) {
	binary.LittleEndian.PutUint64(dst[0:], r.lo)
	binary.LittleEndian.PutUint64(dst[8:], r.hi)
	binary.LittleEndian.PutUint32(dst[16:], crc32.Checksum(dst[:16], castagnoli))
}

// appendAckEntries appends the encoding of rs to dst.
func appendAckEntries(dst []byte, rs []ackRange) []byte {
	for _, r := range rs {
		var e [ackEntryLen]byte
		putAckEntry(e[:], r)
		dst = append(dst, e[:]...)
	}
	return dst
}

// parseAckLog decodes an ack log. It returns the ranges of the valid prefix,
// the length of that prefix in bytes (0 when even the header is bad), and
// an error saying why the rest was rejected, nil when the whole log is valid.
func parseAckLog(b []byte) ([]ackRange, int, error) {
	if len(b) < magicLen || string(b[:magicLen]) != ackMagic {
		return nil, 0, corruptf("bad header")
	}
	var rs []ackRange
	off := magicLen
	for ; off+ackEntryLen <= len(b); off += ackEntryLen {
		e := b[off : off+ackEntryLen]
		r := ackRange{binary.LittleEndian.Uint64(e[0:]), binary.LittleEndian.Uint64(e[8:])}
		if crc32.Checksum(e[:16], castagnoli) != binary.LittleEndian.Uint32(e[16:]) {
			return rs, off, corruptf("checksum mismatch at offset %d", off)
		}
		if r.lo == 0 || r.lo > r.hi || r.hi > maxID {
			return rs, off, corruptf("range [%d, %d] at offset %d", r.lo, r.hi, off)
		}
		rs = append(rs, r)
	}
	if off != len(b) {
		return rs, off, corruptf("%d trailing bytes, a partial entry", len(b)-off)
	}
	return rs, off, nil
}
