package proxy

// MQTT 3.1, 3.1.1 and 5 packets as the session relay handles them: it
// decodes only what it acts on (CONNECT, CONNACK, PUBLISH, SUBSCRIBE,
// SUBACK, UNSUBSCRIBE) and keeps MQTT 5 properties as the raw bytes they
// arrived as, so that whatever it does not change passes byte for byte.
// Every other packet is relayed as it came.

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/smqtt/smqtt/envelope"
)

// errMalformed marks a packet that breaks MQTT: the connection it came on
// is closed, as a broker would.
var errMalformed = errors.New("malformed packet")

// MQTT packet types (the high nibble of the first byte).
const (
	typeConnect     = 1
	typeConnack     = 2
	typePublish     = 3
	typePuback      = 4
	typePubrec      = 5
	typePubrel      = 6
	typePubcomp     = 7
	typeSubscribe   = 8
	typeSuback      = 9
	typeUnsubscribe = 10
	typeUnsuback    = 11
	typePingreq     = 12
	typePingresp    = 13
	typeDisconnect  = 14
	typeAuth        = 15
)

// MQTT 5 property identifiers the relay acts on (the sealed ones are in
// package envelope).
const (
	propMessageExpiry     = 0x02
	propSessionExpiry     = 0x11
	propAssignedClientID  = 0x12
	propReasonString      = 0x1f
	propTopicAliasMaximum = 0x22
	propTopicAlias        = 0x23
	propMaximumPacketSize = 0x27
)

// reader decodes a packet body front to back.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(what string) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: %s", errMalformed, what)
	}
}

func (r *reader) byte(what string) byte {
	if r.err != nil || len(r.b) < 1 {
		r.fail(what)
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) u16(what string) uint16 {
	if r.err != nil || len(r.b) < 2 {
		r.fail(what)
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

// bytes reads a two-byte length and that many bytes (aliasing the body).
func (r *reader) bytes(what string) []byte {
	n := int(r.u16(what))
	if r.err != nil || len(r.b) < n {
		r.fail(what)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

// props reads an MQTT 5 property block (its length and its properties),
// checking that every property in it is well formed.
func (r *reader) props(what string) []byte {
	if r.err != nil {
		return nil
	}
	n, size, ok := envelope.ParseVarint(r.b)
	if !ok || len(r.b)-size < n {
		r.fail(what)
		return nil
	}
	p := r.b[size : size+n : size+n]
	for rest := p; len(rest) > 0; {
		m, err := envelope.PropertyLen(rest)
		if err != nil {
			r.fail(what + ": " + err.Error())
			return nil
		}
		rest = rest[m:]
	}
	r.b = r.b[size+n:]
	return p
}

func appendBytes(b, v []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

func appendProps(b, props []byte) []byte {
	b = envelope.AppendVarint(b, len(props))
	return append(b, props...)
}

// appendPacket appends a packet of the given first byte and body.
func appendPacket(b []byte, first byte, body []byte) []byte {
	b = append(b, first)
	b = envelope.AppendVarint(b, len(body))
	return append(b, body...)
}

// forEachProp calls f with every property of a well-formed property block.
func forEachProp(props []byte, f func(id byte, p []byte)) {
	for len(props) > 0 {
		n, err := envelope.PropertyLen(props)
		if err != nil {
			return
		}
		f(props[0], props[:n])
		props = props[n:]
	}
}

// findProp returns the value bytes of the first property id in props.
func findProp(props []byte, id byte) ([]byte, bool) {
	var v []byte
	found := false
	forEachProp(props, func(pid byte, p []byte) {
		if pid == id && !found {
			v, found = p[1:], true
		}
	})
	return v, found
}

// propU32 returns a four-byte integer property.
func propU32(props []byte, id byte) (uint32, bool) {
	v, ok := findProp(props, id)
	if !ok || len(v) != 4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(v), true
}

// withoutProps returns props without the properties drop reports true for,
// appended to dst.
func withoutProps(dst, props []byte, drop func(id byte) bool) []byte {
	forEachProp(props, func(id byte, p []byte) {
		if !drop(id) {
			dst = append(dst, p...)
		}
	})
	return dst
}

// setU32Prop returns props with the four-byte integer property id set to v
// (replaced where it is, or appended).
func setU32Prop(props []byte, id byte, v uint32) []byte {
	out := make([]byte, 0, len(props)+5)
	done := false
	forEachProp(props, func(pid byte, p []byte) {
		if pid == id && !done {
			out = binary.BigEndian.AppendUint32(append(out, id), v)
			done = true
			return
		}
		out = append(out, p...)
	})
	if !done {
		out = binary.BigEndian.AppendUint32(append(out, id), v)
	}
	return out
}

// appConnect is a decoded CONNECT; properties stay raw.
type appConnect struct {
	protoName   []byte
	version     byte // 3 (MQTT 3.1), 4 (3.1.1) or 5
	flags       byte
	keepAlive   uint16
	props       []byte
	clientID    string
	willProps   []byte
	willTopic   string
	willPayload []byte
	username    []byte
	password    []byte
}

const (
	connectClean    = 0x02
	connectWill     = 0x04
	connectWillQoS  = 0x18
	connectRetain   = 0x20
	connectPassword = 0x40
	connectUsername = 0x80
)

func (c *appConnect) v5() bool         { return c.version == 5 }
func (c *appConnect) clean() bool      { return c.flags&connectClean != 0 }
func (c *appConnect) hasWill() bool    { return c.flags&connectWill != 0 }
func (c *appConnect) willQoS() byte    { return c.flags & connectWillQoS >> 3 }
func (c *appConnect) willRetain() bool { return c.flags&connectRetain != 0 }

// parseConnect decodes a CONNECT body. It refuses what a broker refuses
// before it can answer with a CONNACK: a malformed packet, an unknown
// protocol name, or reserved flags.
func parseConnect(body []byte) (*appConnect, error) {
	r := &reader{b: body}
	c := &appConnect{}
	c.protoName = r.bytes("protocol name")
	c.version = r.byte("protocol version")
	c.flags = r.byte("connect flags")
	c.keepAlive = r.u16("keep alive")
	if r.err != nil {
		return nil, r.err
	}
	switch {
	case string(c.protoName) == "MQTT" && (c.version == 4 || c.version == 5):
	case string(c.protoName) == "MQIsdp" && c.version == 3:
	case string(c.protoName) == "MQTT" || string(c.protoName) == "MQIsdp":
		return c, errUnsupportedVersion // answered with a CONNACK
	default:
		return nil, fmt.Errorf("%w: protocol name %q", errMalformed, c.protoName)
	}
	if c.flags&0x01 != 0 {
		return nil, fmt.Errorf("%w: reserved connect flag set", errMalformed)
	}
	if c.v5() {
		c.props = r.props("connect properties")
	}
	c.clientID = string(r.bytes("client id"))
	if c.hasWill() {
		if c.v5() {
			c.willProps = r.props("will properties")
		}
		c.willTopic = string(r.bytes("will topic"))
		c.willPayload = r.bytes("will payload")
		if c.willQoS() > 2 {
			r.fail("will QoS 3")
		}
	} else if c.flags&(connectWillQoS|connectRetain) != 0 {
		r.fail("will QoS or retain without a will")
	}
	if c.flags&connectUsername != 0 {
		c.username = r.bytes("user name")
	}
	if c.flags&connectPassword != 0 {
		c.password = r.bytes("password")
	}
	if r.err != nil {
		return nil, r.err
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the CONNECT payload", errMalformed, len(r.b))
	}
	return c, nil
}

var errUnsupportedVersion = errors.New("unsupported protocol version")

// append encodes the CONNECT.
func (c *appConnect) append(b []byte) []byte {
	body := make([]byte, 0, 64+len(c.props)+len(c.clientID)+len(c.willProps)+len(c.willTopic)+len(c.willPayload)+len(c.username)+len(c.password))
	body = appendBytes(body, c.protoName)
	flags := c.flags &^ (connectUsername | connectPassword)
	if c.username != nil {
		flags |= connectUsername
	}
	if c.password != nil {
		flags |= connectPassword
	}
	body = append(body, c.version, flags)
	body = binary.BigEndian.AppendUint16(body, c.keepAlive)
	if c.v5() {
		body = appendProps(body, c.props)
	}
	body = appendString(body, c.clientID)
	if c.hasWill() {
		if c.v5() {
			body = appendProps(body, c.willProps)
		}
		body = appendString(body, c.willTopic)
		body = appendBytes(body, c.willPayload)
	}
	if c.username != nil {
		body = appendBytes(body, c.username)
	}
	if c.password != nil {
		body = appendBytes(body, c.password)
	}
	return appendPacket(b, typeConnect<<4, body)
}

// appConnack is a decoded CONNACK.
type appConnack struct {
	sessionPresent bool
	code           byte // return code (3.1.1) or reason code (5)
	props          []byte
}

func parseConnack(body []byte, v5 bool) (appConnack, error) {
	r := &reader{b: body}
	var c appConnack
	flags := r.byte("connack flags")
	c.sessionPresent = flags&1 != 0
	c.code = r.byte("connack code")
	if v5 && len(r.b) > 0 {
		c.props = r.props("connack properties")
	}
	if r.err != nil {
		return c, r.err
	}
	return c, nil
}

func (c appConnack) append(b []byte, v5 bool) []byte {
	body := make([]byte, 0, 8+len(c.props))
	var flags byte
	if c.sessionPresent {
		flags = 1
	}
	body = append(body, flags, c.code)
	if v5 {
		body = appendProps(body, c.props)
	}
	return appendPacket(b, typeConnack<<4, body)
}

// refused reports whether the CONNACK refuses the connection.
func (c appConnack) refused() bool { return c.code != 0 }

// publishPacket is a decoded PUBLISH; its fields alias the packet body.
type publishPacket struct {
	first   byte // type, DUP, QoS, RETAIN
	topic   string
	id      uint16
	props   []byte // MQTT 5 only
	payload []byte
}

func (p *publishPacket) qos() byte    { return p.first >> 1 & 3 }
func (p *publishPacket) retain() bool { return p.first&1 != 0 }
func (p *publishPacket) dup() bool    { return p.first&0x08 != 0 }

func parsePublishPacket(first byte, body []byte, v5 bool) (publishPacket, error) {
	p := publishPacket{first: first}
	if p.qos() == 3 {
		return p, fmt.Errorf("%w: PUBLISH with QoS 3", errMalformed)
	}
	r := &reader{b: body}
	p.topic = string(r.bytes("topic"))
	if p.qos() > 0 {
		p.id = r.u16("packet id")
		if r.err == nil && p.id == 0 {
			r.fail("packet id 0")
		}
	}
	if v5 {
		p.props = r.props("publish properties")
	}
	if r.err != nil {
		return p, r.err
	}
	p.payload = r.b
	return p, nil
}

// publishLen is the encoded length of p.
func (p *publishPacket) encodedLen(v5 bool) int {
	n := 2 + len(p.topic) + len(p.payload)
	if p.qos() > 0 {
		n += 2
	}
	if v5 {
		n += len(envelope.AppendVarint(nil, len(p.props))) + len(p.props)
	}
	return 1 + len(envelope.AppendVarint(nil, n)) + n
}

func (p *publishPacket) append(b []byte, v5 bool) []byte {
	n := 2 + len(p.topic) + len(p.payload)
	if p.qos() > 0 {
		n += 2
	}
	var pl [4]byte
	plen := envelope.AppendVarint(pl[:0], len(p.props))
	if v5 {
		n += len(plen) + len(p.props)
	}
	b = append(b, p.first)
	b = envelope.AppendVarint(b, n)
	b = appendString(b, p.topic)
	if p.qos() > 0 {
		b = binary.BigEndian.AppendUint16(b, p.id)
	}
	if v5 {
		b = append(b, plen...)
		b = append(b, p.props...)
	}
	return append(b, p.payload...)
}

// subscription is one filter of a SUBSCRIBE.
type subscription struct {
	filter  string
	options byte // QoS, No Local, Retain As Published, Retain Handling (MQTT 5)
}

// parseSubscribe decodes a SUBSCRIBE's packet id and filters.
func parseSubscribe(body []byte, v5 bool) (uint16, []subscription, error) {
	r := &reader{b: body}
	id := r.u16("packet id")
	if v5 {
		r.props("subscribe properties")
	}
	var subs []subscription
	for r.err == nil && len(r.b) > 0 {
		f := string(r.bytes("topic filter"))
		o := r.byte("subscription options")
		subs = append(subs, subscription{filter: f, options: o})
	}
	if r.err == nil && len(subs) == 0 {
		r.fail("SUBSCRIBE without a filter")
	}
	return id, subs, r.err
}

// parseUnsubscribe decodes an UNSUBSCRIBE's packet id and filters.
func parseUnsubscribe(body []byte, v5 bool) (uint16, []string, error) {
	r := &reader{b: body}
	id := r.u16("packet id")
	if v5 {
		r.props("unsubscribe properties")
	}
	var filters []string
	for r.err == nil && len(r.b) > 0 {
		filters = append(filters, string(r.bytes("topic filter")))
	}
	if r.err == nil && len(filters) == 0 {
		r.fail("UNSUBSCRIBE without a filter")
	}
	return id, filters, r.err
}

// parseAck decodes the packet id and reason code of a SUBACK or UNSUBACK
// (the codes that follow the id and, in MQTT 5, the properties).
func parseAckCodes(body []byte, v5 bool) (uint16, []byte, error) {
	r := &reader{b: body}
	id := r.u16("packet id")
	if v5 {
		r.props("ack properties")
	}
	return id, r.b, r.err
}

// ackFor encodes a PUBACK, PUBREC, PUBREL or PUBCOMP; MQTT 5 adds the
// reason code when it is not success.
func ackFor(typ byte, id uint16, v5 bool, reason byte) []byte {
	first := typ << 4
	if typ == typePubrel {
		first |= 0x02
	}
	if v5 && reason != 0 {
		return []byte{first, 3, byte(id >> 8), byte(id), reason}
	}
	return []byte{first, 2, byte(id >> 8), byte(id)}
}

// disconnectFor encodes a DISCONNECT (MQTT 5: with a reason code).
func disconnectFor(v5 bool, reason byte) []byte {
	if v5 && reason != 0 {
		return []byte{typeDisconnect << 4, 1, reason}
	}
	return []byte{typeDisconnect << 4, 0}
}
