package envelope

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"unicode/utf8"
)

// MQTT 5 properties inside the envelope.
//
// An MQTT 5 PUBLISH (or Will) carries properties next to its payload. Those an
// application may consider as confidential as the payload travel sealed: the
// envelope's plaintext then starts with them, in their MQTT wire encoding and
// in the order the application sent them, and FlagProps is set:
//
//	plaintext = varint len(props) ‖ props ‖ payload
//
// varint is MQTT's Variable Byte Integer (1 to 4 bytes). The properties a
// broker must act on (message expiry, topic alias, subscription identifiers)
// stay in the clear, outside the envelope. docs/PROTOCOL.md section 1.8.

// MQTT 5 property identifiers that travel sealed.
const (
	PropPayloadFormat   byte = 0x01
	PropContentType     byte = 0x03
	PropResponseTopic   byte = 0x08
	PropCorrelationData byte = 0x09
	PropUser            byte = 0x26
)

// MaxPropsLen bounds the sealed properties' length (MQTT's largest varint).
const MaxPropsLen = 1<<28 - 1

// SealedProperty reports whether the MQTT 5 property id travels inside the
// envelope: payload format indicator, content type, response topic,
// correlation data and user properties.
func SealedProperty(id byte) bool {
	switch id {
	case PropPayloadFormat, PropContentType, PropResponseTopic, PropCorrelationData, PropUser:
		return true
	}
	return false
}

// AppendVarint appends n as an MQTT Variable Byte Integer; n must be below
// 2^28.
func AppendVarint(b []byte, n int) []byte {
	for {
		d := byte(n & 0x7f)
		n >>= 7
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

// ParseVarint decodes the MQTT Variable Byte Integer at the start of b and
// returns it and its length in bytes; ok is false if b does not start with
// one (too short, or longer than 4 bytes).
func ParseVarint(b []byte) (n, size int, ok bool) {
	for i := 0; i < 4 && i < len(b); i++ {
		n |= int(b[i]&0x7f) << (7 * i)
		if b[i]&0x80 == 0 {
			return n, i + 1, true
		}
	}
	return 0, 0, false
}

// PropertyLen returns the length in bytes of the MQTT 5 property at the
// start of b (its identifier and its value), or an error wrapping
// ErrMalformed if b does not start with a well-formed property of a known
// identifier.
func PropertyLen(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, fmt.Errorf("%w: empty property", ErrMalformed)
	}
	id := b[0]
	v := b[1:]
	var n int
	switch id {
	case 0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2a: // byte
		n = 1
	case 0x13, 0x21, 0x22, 0x23: // two-byte integer
		n = 2
	case 0x02, 0x11, 0x18, 0x27: // four-byte integer
		n = 4
	case 0x0b: // variable byte integer
		_, size, ok := ParseVarint(v)
		if !ok {
			return 0, fmt.Errorf("%w: property 0x%02x: bad variable byte integer", ErrMalformed, id)
		}
		n = size
	case 0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1a, 0x1c, 0x1f: // string or binary data
		if len(v) < 2 {
			return 0, fmt.Errorf("%w: property 0x%02x truncated", ErrMalformed, id)
		}
		n = 2 + int(binary.BigEndian.Uint16(v))
	case 0x26: // string pair
		if len(v) < 2 {
			return 0, fmt.Errorf("%w: property 0x%02x truncated", ErrMalformed, id)
		}
		k := 2 + int(binary.BigEndian.Uint16(v))
		if len(v) < k+2 {
			return 0, fmt.Errorf("%w: property 0x%02x truncated", ErrMalformed, id)
		}
		n = k + 2 + int(binary.BigEndian.Uint16(v[k:]))
	default:
		return 0, fmt.Errorf("%w: unknown property 0x%02x", ErrMalformed, id)
	}
	if len(v) < n {
		return 0, fmt.Errorf("%w: property 0x%02x truncated", ErrMalformed, id)
	}
	return 1 + n, nil
}

// AppendProps appends the plaintext of a message with sealed properties to
// dst: varint len(props) ‖ props ‖ payload. props must hold only sealed
// properties (CheckSealedProps).
func AppendProps(dst, props, payload []byte) []byte {
	dst = AppendVarint(dst, len(props))
	dst = append(dst, props...)
	return append(dst, payload...)
}

// SplitProps splits the plaintext of a message sealed with FlagProps into
// its properties and its payload, which alias plain. It returns an error
// wrapping ErrMalformed unless the properties are well formed and pass
// CheckSealedProps.
func SplitProps(plain []byte) (props, payload []byte, err error) {
	n, size, ok := ParseVarint(plain)
	if !ok || len(plain)-size < n {
		return nil, nil, fmt.Errorf("%w: sealed properties: bad length", ErrMalformed)
	}
	props = plain[size : size+n]
	if err := CheckSealedProps(props); err != nil {
		return nil, nil, err
	}
	return props, plain[size+n:], nil
}

// CheckSealedProps checks that props is a sequence of well-formed MQTT 5
// properties that all travel sealed, each of the single-valued ones at most
// once (user properties may repeat), with the values MQTT allows: a payload
// format indicator of 0 or 1, UTF-8 strings without U+0000, a response topic
// without wildcards. An application's client would take anything else for a
// malformed packet and disconnect.
func CheckSealedProps(props []byte) error {
	var seen [4]bool // payload format, content type, response topic, correlation data
	for len(props) > 0 {
		n, err := PropertyLen(props)
		if err != nil {
			return fmt.Errorf("sealed properties: %w", err)
		}
		id := props[0]
		i := -1
		switch id {
		case PropPayloadFormat:
			i = 0
		case PropContentType:
			i = 1
		case PropResponseTopic:
			i = 2
		case PropCorrelationData:
			i = 3
		case PropUser:
		default:
			return fmt.Errorf("%w: sealed properties: property 0x%02x may not be sealed", ErrMalformed, id)
		}
		if i >= 0 {
			if seen[i] {
				return fmt.Errorf("%w: sealed properties: property 0x%02x twice", ErrMalformed, id)
			}
			seen[i] = true
		}
		v := props[1:n]
		ok := true
		switch id {
		case PropPayloadFormat:
			ok = v[0] <= 1
		case PropContentType:
			ok = mqttString(v[2:])
		case PropResponseTopic:
			ok = mqttString(v[2:]) && len(v) > 2 && !bytes.ContainsAny(v[2:], "+#")
		case PropUser:
			k := 2 + int(binary.BigEndian.Uint16(v))
			ok = mqttString(v[2:k]) && mqttString(v[k+2:])
		}
		if !ok {
			return fmt.Errorf("%w: sealed properties: property 0x%02x has a value MQTT does not allow", ErrMalformed, id)
		}
		props = props[n:]
	}
	return nil
}

// mqttString reports whether b is a valid MQTT UTF-8 string value.
func mqttString(b []byte) bool {
	return utf8.Valid(b) && bytes.IndexByte(b, 0) < 0
}
