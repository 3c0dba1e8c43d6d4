package envelope_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/smqtt/smqtt/envelope"
)

func prop(id byte, value ...byte) []byte { return append([]byte{id}, value...) }

func str(s string) []byte { return append([]byte{byte(len(s) >> 8), byte(len(s))}, s...) }

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestSplitPropsRoundTrip: the sealed properties and the payload come back
// exactly, user properties in their order, whatever the payload holds.
func TestSplitPropsRoundTrip(t *testing.T) {
	props := cat(
		prop(envelope.PropUser, cat(str("z"), str("1"))...),
		prop(envelope.PropPayloadFormat, 1),
		prop(envelope.PropUser, cat(str("a"), str("2"))...),
		prop(envelope.PropCorrelationData, str("\x00\xffbin")...),
		prop(envelope.PropResponseTopic, str("reply/to")...),
		prop(envelope.PropContentType, str("text/plain")...),
		prop(envelope.PropUser, cat(str("z"), str("1"))...), // repeated pairs stay
	)
	for _, payload := range [][]byte{nil, []byte("x"), bytes.Repeat([]byte{0x26}, 300)} {
		plain := envelope.AppendProps(nil, props, payload)
		gotProps, gotPayload, err := envelope.SplitProps(plain)
		if err != nil || !bytes.Equal(gotProps, props) || !bytes.Equal(gotPayload, payload) {
			t.Fatalf("SplitProps = %x, %x, %v; want %x, %x", gotProps, gotPayload, err, props, payload)
		}
	}
	long := bytes.Repeat(prop(envelope.PropUser, cat(str("k"), str("v"))...), 40) // 320 bytes: a 2-byte length
	if p, _, err := envelope.SplitProps(envelope.AppendProps(nil, long, []byte("p"))); err != nil || !bytes.Equal(p, long) {
		t.Fatalf("320 bytes of properties: %v", err)
	}
}

// TestSplitPropsRefusesWhatAnAppCouldNotTake: properties a broker acts on,
// unknown ones, repeated single ones, truncated ones and values MQTT
// forbids are refused as malformed: never handed to an application.
func TestSplitPropsRefusesWhatAnAppCouldNotTake(t *testing.T) {
	cases := map[string][]byte{
		"message expiry may not be sealed": prop(0x02, 0, 0, 0, 9),
		"topic alias may not be sealed":    prop(0x23, 0, 1),
		"subscription identifier":          prop(0x0b, 5),
		"unknown property":                 prop(0x7f, 0),
		"payload format twice":             cat(prop(envelope.PropPayloadFormat, 1), prop(envelope.PropPayloadFormat, 0)),
		"content type twice":               cat(prop(envelope.PropContentType, str("a")...), prop(envelope.PropContentType, str("b")...)),
		"payload format 2":                 prop(envelope.PropPayloadFormat, 2),
		"truncated string":                 prop(envelope.PropContentType, 0, 9, 'a'),
		"truncated user property":          prop(envelope.PropUser, cat(str("k"), []byte{0, 5, 'v'})...),
		"invalid UTF-8":                    prop(envelope.PropContentType, str("\xff\xfe")...),
		"U+0000 in a user property":        prop(envelope.PropUser, cat(str("k"), str("a\x00b"))...),
		"wildcard response topic":          prop(envelope.PropResponseTopic, str("reply/#")...),
		"empty response topic":             prop(envelope.PropResponseTopic, str("")...),
		"identifier without value":         {envelope.PropUser},
	}
	for name, props := range cases {
		t.Run(name, func(t *testing.T) {
			_, _, err := envelope.SplitProps(envelope.AppendProps(nil, props, []byte("payload")))
			if !errors.Is(err, envelope.ErrMalformed) {
				t.Fatalf("err = %v, want ErrMalformed", err)
			}
		})
	}
	for name, plain := range map[string][]byte{
		"empty plaintext":         nil,
		"length past the end":     {5, 1, 1},
		"five-byte length":        {0x80, 0x80, 0x80, 0x80, 0x01},
		"unterminated length":     {0x80},
		"length beyond plaintext": append(envelope.AppendVarint(nil, 300), make([]byte, 299)...),
	} {
		if _, _, err := envelope.SplitProps(plain); !errors.Is(err, envelope.ErrMalformed) {
			t.Errorf("%s: err = %v, want ErrMalformed", name, err)
		}
	}
}

func TestVarint(t *testing.T) {
	for _, n := range []int{0, 1, 127, 128, 16383, 16384, 2097151, 2097152, envelope.MaxPropsLen} {
		b := envelope.AppendVarint(nil, n)
		got, size, ok := envelope.ParseVarint(append(b, 0xaa))
		if !ok || got != n || size != len(b) {
			t.Errorf("varint %d: encoded %x, decoded %d (%d bytes, %v)", n, b, got, size, ok)
		}
	}
}

// FuzzSplitProps: any plaintext either splits into properties that pass
// CheckSealedProps and re-encode to the same bytes, or is refused as
// malformed; it never panics.
func FuzzSplitProps(f *testing.F) {
	f.Add(envelope.AppendProps(nil, prop(envelope.PropUser, cat(str("k"), str("v"))...), []byte("p")))
	f.Add(envelope.AppendProps(nil, prop(envelope.PropPayloadFormat, 1), nil))
	f.Add([]byte{0x80, 0x80, 0x80, 0x80})
	f.Fuzz(func(t *testing.T, plain []byte) {
		props, payload, err := envelope.SplitProps(plain)
		if err != nil {
			if !errors.Is(err, envelope.ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if err := envelope.CheckSealedProps(props); err != nil {
			t.Fatalf("split properties fail their own check: %v", err)
		}
		n, size, _ := envelope.ParseVarint(plain)
		if n != len(props) || !bytes.Equal(plain[size:], append(append([]byte(nil), props...), payload...)) {
			t.Fatal("split does not cover the plaintext")
		}
	})
}
