package proxy

import (
	"bytes"
	"testing"
)

// FuzzSessionDecoders decodes arbitrary bytes as every packet the session
// relay decodes, MQTT 3.1.1 and 5: no input may crash a decoder, and what
// decodes must encode to bytes that decode to the same packet.
func FuzzSessionDecoders(f *testing.F) {
	f.Add(byte(0x10), []byte("\x00\x04MQTT\x05\x02\x00\x1e\x05\x11\x00\x00\x00\x3c\x00\x03abc"))
	f.Add(byte(0x32), []byte("\x00\x08secure/x\x00\x01\x03\x23\x00\x01payload"))
	f.Add(byte(0x20), []byte("\x01\x00\x05\x27\x00\x00\x10\x00"))
	f.Add(byte(0x82), []byte("\x00\x01\x00\x00\x03a/b\x01"))
	f.Fuzz(func(t *testing.T, first byte, body []byte) {
		for _, v5 := range []bool{false, true} {
			if c, err := parseConnect(body); err == nil {
				enc := c.append(nil)
				again, err := parseConnect(stripHeader(enc))
				if err != nil || !bytes.Equal(again.append(nil), enc) {
					t.Fatalf("CONNECT does not survive re-encoding: %v", err)
				}
			}
			if p, err := parsePublishPacket(first&0x0f|0x30, body, v5); err == nil {
				enc := p.append(nil, v5)
				if len(enc) != p.encodedLen(v5) {
					t.Fatalf("PUBLISH encodes to %d bytes, encodedLen says %d", len(enc), p.encodedLen(v5))
				}
				again, err := parsePublishPacket(enc[0], stripHeader(enc), v5)
				if err != nil || again.topic != p.topic || again.id != p.id || !bytes.Equal(again.props, p.props) || !bytes.Equal(again.payload, p.payload) {
					t.Fatalf("PUBLISH does not survive re-encoding: %v", err)
				}
			}
			if c, err := parseConnack(body, v5); err == nil {
				enc := c.append(nil, v5)
				again, err := parseConnack(stripHeader(enc), v5)
				if err != nil || again.code != c.code || again.sessionPresent != c.sessionPresent || !bytes.Equal(again.props, c.props) {
					t.Fatalf("CONNACK does not survive re-encoding: %v", err)
				}
			}
			parseSubscribe(body, v5)
			parseUnsubscribe(body, v5)
			parseAckCodes(body, v5)
		}
		_, outer := splitSealedProps(body)
		_ = outer
	})
}

// stripHeader returns an encoded packet's body.
func stripHeader(pkt []byte) []byte {
	i := 1
	for pkt[i]&0x80 != 0 {
		i++
	}
	return pkt[i+1:]
}
