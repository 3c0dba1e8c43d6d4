package proxy

// The MQTT 3.1.1 packets the bridge writes and reads (OASIS MQTT 3.1.1,
// section 3). Every packet is encoded whole into one buffer and handed to
// the connection with one Write, so packets written from several goroutines
// never interleave.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/smqtt/smqtt/envelope"
)

// errProtocol marks a packet from upstream that breaks MQTT 3.1.1; the
// connection is dropped and opened again.
var errProtocol = errors.New("upstream protocol violation")

// maxRemainingLength is the largest remaining length MQTT can encode.
const maxRemainingLength = 268435455

var (
	packetPingreq    = []byte{0xc0, 0}
	packetDisconnect = []byte{0xe0, 0}
)

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// appendPublish appends a PUBLISH packet to b; id is left out at QoS 0.
func appendPublish(b []byte, topic string, qos byte, retain bool, id uint16, payload []byte) []byte {
	h := byte(0x30) | qos<<1
	if retain {
		h |= 0x01
	}
	n := 2 + len(topic) + len(payload)
	if qos > 0 {
		n += 2
	}
	if need := len(b) + 5 + n; cap(b) < need {
		nb := make([]byte, len(b), need)
		copy(nb, b)
		b = nb
	}
	b = append(b, h)
	b = envelope.AppendVarint(b, n)
	b = appendString(b, topic)
	if qos > 0 {
		b = binary.BigEndian.AppendUint16(b, id)
	}
	return append(b, payload...)
}

// ackPacket encodes a PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or
// PUBCOMP (0x70).
func ackPacket(typ byte, id uint16) []byte {
	return []byte{typ, 2, byte(id >> 8), byte(id)}
}

func subscribePacket(id uint16, filter string, qos byte) []byte {
	b := make([]byte, 0, 5+2+2+len(filter)+1)
	b = append(b, 0x82)
	b = envelope.AppendVarint(b, 2+2+len(filter)+1)
	b = binary.BigEndian.AppendUint16(b, id)
	b = appendString(b, filter)
	return append(b, qos)
}

func unsubscribePacket(id uint16, filter string, _ byte) []byte {
	b := make([]byte, 0, 5+2+2+len(filter))
	b = append(b, 0xa2)
	b = envelope.AppendVarint(b, 2+2+len(filter))
	b = binary.BigEndian.AppendUint16(b, id)
	return appendString(b, filter)
}

// connectPacket encodes a CONNECT for a persistent session (clean session
// 0), without a Will.
func connectPacket(clientID, username, password string, keepAliveSeconds int64) []byte {
	var flags byte
	body := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0, 0, 0}
	binary.BigEndian.PutUint16(body[8:], uint16(min(keepAliveSeconds, 65535)))
	body = appendString(body, clientID)
	if username != "" {
		flags |= 0x80
		body = appendString(body, username)
	}
	if password != "" {
		flags |= 0x40
		body = appendString(body, password)
	}
	body[7] = flags
	b := envelope.AppendVarint([]byte{0x10}, len(body))
	return append(b, body...)
}

func connackReason(rc byte) string {
	switch rc {
	case 1:
		return "unacceptable protocol version"
	case 2:
		return "client identifier rejected"
	case 3:
		return "server unavailable"
	case 4:
		return "bad user name or password"
	case 5:
		return "not authorized"
	}
	return "return code " + strconv.Itoa(int(rc))
}

// readPacket reads one packet: its first header byte and its body. A
// PUBLISH body is freshly allocated when keep is set (the message keeps
// it); any other body is read into *scratch and valid until the next call.
func readPacket(r io.Reader, scratch *[]byte, keep bool) (byte, []byte, error) {
	var h [1]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	n, mul := 0, 1
	for i := 0; ; i++ {
		var d [1]byte
		if _, err := io.ReadFull(r, d[:]); err != nil {
			return 0, nil, err
		}
		n += int(d[0]&0x7f) * mul
		if d[0]&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, nil, fmt.Errorf("%w: remaining length longer than 4 bytes", errProtocol)
		}
		mul *= 128
	}
	var body []byte
	if keep && h[0]>>4 == 3 {
		body = make([]byte, n)
	} else {
		if cap(*scratch) < n {
			*scratch = make([]byte, n)
		}
		body = (*scratch)[:n]
	}
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return h[0], body, nil
}

func packetID(body []byte) uint16 { return binary.BigEndian.Uint16(body) }

// topicCache interns the topics of one connection's publishes: a stream
// mostly repeats a few topics, and each string would be an allocation.
type topicCache map[string]string

const maxCachedTopics = 1024

func (c topicCache) intern(b []byte) string {
	if t, ok := c[string(b)]; ok { // no allocation for the lookup
		return t
	}
	t := string(b)
	if len(c) < maxCachedTopics {
		c[t] = t
	}
	return t
}

// parsePublish decodes a PUBLISH received on s; payload aliases body.
func parsePublish(hdr byte, body []byte, s *session) (*upstreamMessage, error) {
	m := &upstreamMessage{qos: hdr >> 1 & 3, retain: hdr&1 != 0, dup: hdr&0x08 != 0, s: s}
	if m.qos == 3 {
		return nil, fmt.Errorf("%w: PUBLISH with QoS 3", errProtocol)
	}
	if len(body) < 2 {
		return nil, fmt.Errorf("%w: PUBLISH of %d bytes", errProtocol, len(body))
	}
	tl := int(binary.BigEndian.Uint16(body))
	rest := body[2:]
	if tl > len(rest) {
		return nil, fmt.Errorf("%w: PUBLISH topic of %d bytes in %d", errProtocol, tl, len(rest))
	}
	m.topic, rest = s.topics.intern(rest[:tl]), rest[tl:]
	if m.qos > 0 {
		if len(rest) < 2 {
			return nil, fmt.Errorf("%w: PUBLISH without a packet id", errProtocol)
		}
		m.id, rest = binary.BigEndian.Uint16(rest), rest[2:]
	}
	m.payload = rest
	return m, nil
}
