package gkd

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"testing"
	"time"
)

// vectorMessages returns the messages of the committed vectors.
func vectorMessages(f *testing.F) (msgs [][]byte, bodies map[MsgType][]byte) {
	raw, err := os.ReadFile(vectorsFile)
	if err != nil {
		f.Fatal(err)
	}
	var file vectorFile
	if err := json.Unmarshal(raw, &file); err != nil {
		f.Fatal(err)
	}
	bodies = map[MsgType][]byte{}
	for _, v := range file.Vectors {
		msg, err := hex.DecodeString(v.Message)
		if err != nil {
			f.Fatal(err)
		}
		body, err := hex.DecodeString(v.Body)
		if err != nil {
			f.Fatal(err)
		}
		msgs, bodies[MsgType(v.Type)] = append(msgs, msg), body
	}
	return msgs, bodies
}

// FuzzParse feeds arbitrary bytes to Parse, then the body of a plain message
// to its parser, and checks the signature against a key. Nothing may panic;
// errors must be the documented ones; whatever parses must re-encode to the
// input.
func FuzzParse(f *testing.F) {
	msgs, _ := vectorMessages(f)
	for _, m := range msgs {
		f.Add(m)
	}
	f.Add([]byte{})
	f.Add([]byte{2})
	key := seededIdentity(f, SuiteX25519, 0x00).Public()

	f.Fuzz(func(t *testing.T, raw []byte) {
		m, err := Parse(raw)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("Parse error %v wraps neither ErrMalformed nor ErrVersion", err)
			}
			if m != nil {
				t.Fatal("Parse returned a message with an error")
			}
			return
		}
		ms, err := millis(m.Time)
		if err != nil {
			t.Fatal(err)
		}
		again := appendHeader(nil, &m.Header, ms, len(m.Body))
		again = append(append(again, m.Body...), m.Sig...)
		if !bytes.Equal(again, raw) {
			t.Fatalf("re-encoding the parsed message gives %x, want %x", again, raw)
		}
		if err := m.Verify(key); err != nil && !errors.Is(err, ErrSignature) {
			t.Fatalf("Verify error %v does not wrap ErrSignature", err)
		}
		if m.Type.Sealed() {
			return
		}
		checkParseBody(t, m.Type, m.Body)
	})
}

// FuzzParseBody feeds arbitrary bodies of arbitrary types to ParseBody.
func FuzzParseBody(f *testing.F) {
	_, bodies := vectorMessages(f)
	for typ, body := range bodies {
		f.Add(uint8(typ), body)
	}
	f.Add(uint8(0), []byte{})
	f.Add(uint8(TypePolicy), []byte{0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, typ uint8, body []byte) {
		checkParseBody(t, MsgType(typ), body)
	})
}

func checkParseBody(t *testing.T, typ MsgType, body []byte) {
	b, err := ParseBody(typ, body)
	if err != nil {
		if !errors.Is(err, ErrMalformed) || b != nil {
			t.Fatalf("ParseBody(%s) = %v, %v; want nil and ErrMalformed", typ, b, err)
		}
		return
	}
	if b.Type() != typ {
		t.Fatalf("ParseBody(%s) returned a %s", typ, b.Type())
	}
	enc, err := b.MarshalBinary()
	if err != nil {
		t.Fatalf("MarshalBinary of a parsed %s: %v", typ, err)
	}
	if !bytes.Equal(enc, body) {
		t.Fatalf("%s re-encodes to %x, want %x", typ, enc, body)
	}
}

// FuzzReplayCacheUnmarshal feeds arbitrary bytes to UnmarshalBinary. It must
// not panic, must reject with ErrMalformed, and must accept only canonical
// encodings, after which the cache works.
func FuzzReplayCacheUnmarshal(f *testing.F) {
	c := NewReplayCache(time.Minute, 100)
	for i := range 3 {
		if err := c.Check([8]byte{byte(i)}, nonceN(i), replayNow, replayNow); err != nil {
			f.Fatal(err)
		}
	}
	enc, _ := c.MarshalBinary()
	f.Add(enc)
	empty, _ := NewReplayCache(time.Minute, 1).MarshalBinary()
	f.Add(empty)
	f.Add([]byte{1})

	f.Fuzz(func(t *testing.T, data []byte) {
		c := NewReplayCache(time.Minute, 4)
		if err := c.UnmarshalBinary(data); err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("UnmarshalBinary error %v does not wrap ErrMalformed", err)
			}
			return
		}
		again, err := c.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(again, data) {
			t.Fatalf("re-encoding gives %x, want %x", again, data)
		}
		err = c.Check(replayAlice, nonceN(1<<20), replayNow, replayNow)
		if err != nil && !errors.Is(err, ErrStale) && !errors.Is(err, ErrReplay) && !errors.Is(err, ErrBusy) {
			t.Fatalf("Check after a restore: %v", err)
		}
	})
}
