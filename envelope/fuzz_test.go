package envelope_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/smqtt/smqtt/envelope"
)

// FuzzOpen feeds arbitrary bytes and topics to Open. It must never panic,
// must fail with one of the four documented errors, and may succeed only on
// an envelope that the Sealer reproduces byte for byte: that is, only on a
// message sealed under the key.
func FuzzOpen(f *testing.F) {
	key := testKey(1)
	s := mustSealer(f, testGroup, testEpoch, key, 0x0102030405060708)
	for i, pt := range []string{"", "x", `{"t":21.5}`} {
		msg, err := s.SealSeq(nil, testTopic, envelope.Flags(i%2), uint64(i+1), []byte(pt))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(msg, testTopic)
	}
	f.Add([]byte{}, testTopic)
	f.Add([]byte("broker-injected plaintext that is longer than the overhead"), testTopic)
	o := envelope.NewOpener(newRing().set(testGroup, testEpoch, key), 8)

	f.Fuzz(func(t *testing.T, msg []byte, topic string) {
		dst := []byte("dst")
		h, out, err := o.Open(dst, testGroup, topic, msg)
		if err != nil {
			if r := envelope.Reason(err); r == "other" || r == "" {
				t.Fatalf("Open error %v has no reason label", err)
			}
			if !bytes.Equal(out, dst) || h != (envelope.Header{}) {
				t.Fatalf("failed Open returned header %+v and %q", h, out)
			}
			return
		}
		resealer := mustSealer(t, testGroup, h.Epoch, key, h.Sender)
		again, err := resealer.SealSeq(nil, topic, h.Flags, h.Seq, out[len(dst):])
		if err != nil {
			t.Fatal(err)
		}
		// A proof is not the AEAD's to check (a ProofChecker does): the
		// envelope proper is what sealing must reproduce.
		env, _, _, err := envelope.SplitProof(msg)
		if err != nil {
			t.Fatalf("Open accepted %x, whose proof does not parse: %v", msg, err)
		}
		if !bytes.Equal(again, env) {
			t.Fatalf("Open accepted %x, which sealing its output does not reproduce (%x)", msg, again)
		}
	})
}

// FuzzParseHeader checks that ParseHeader never panics, accepts only
// well-formed headers, and that AppendTo reproduces the bytes it parsed.
func FuzzParseHeader(f *testing.F) {
	h := envelope.Header{Version: 1, Flags: envelope.FlagRetain, Epoch: 7, Sender: 42, Seq: 1}
	f.Add(h.AppendTo(make([]byte, 0, envelope.Overhead))[:envelope.HeaderLen])
	f.Add(append(h.AppendTo(nil), make([]byte, envelope.TagLen)...))
	f.Add([]byte{2})
	f.Fuzz(func(t *testing.T, msg []byte) {
		h, err := envelope.ParseHeader(msg)
		if err != nil {
			if !errors.Is(err, envelope.ErrMalformed) && !errors.Is(err, envelope.ErrVersion) {
				t.Fatalf("ParseHeader error %v is neither ErrMalformed nor ErrVersion", err)
			}
			return
		}
		if len(msg) < envelope.Overhead || h.Version != envelope.Version || !h.Flags.Valid() || h.Seq == 0 {
			t.Fatalf("ParseHeader accepted %x as %+v", msg, h)
		}
		if got := h.AppendTo(nil); !bytes.Equal(got, msg[:envelope.HeaderLen]) {
			t.Fatalf("AppendTo(%+v) = %x, parsed from %x", h, got, msg[:envelope.HeaderLen])
		}
	})
}

// FuzzReplayWindowUnmarshal checks that UnmarshalBinary never panics, that
// what it accepts re-encodes to the same bytes, and that the result behaves
// as a window.
func FuzzReplayWindowUnmarshal(f *testing.F) {
	var w envelope.ReplayWindow
	empty, _ := w.MarshalBinary()
	f.Add(empty)
	for _, seq := range []uint64{1, 2, 5, 100, 9000, 20000} {
		w.Accept(seq)
		enc, _ := w.MarshalBinary()
		f.Add(enc)
	}
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0, 5, 0x30})
	f.Fuzz(func(t *testing.T, data []byte) {
		var w envelope.ReplayWindow
		if err := w.UnmarshalBinary(data); err != nil {
			if !errors.Is(err, envelope.ErrReplayWindowEncoding) {
				t.Fatalf("UnmarshalBinary error %v is not ErrReplayWindowEncoding", err)
			}
			return
		}
		enc, err := w.MarshalBinary()
		if err != nil || !bytes.Equal(enc, data) {
			t.Fatalf("UnmarshalBinary accepted %x but MarshalBinary gives %x (%v)", data, enc, err)
		}
		h := w.Highest()
		if h > 0 && (w.Check(h) || w.Accept(h)) {
			t.Fatalf("highest %d is not marked accepted", h)
		}
		if h < ^uint64(0) && !w.Accept(h+1) {
			t.Fatalf("seq %d above highest %d rejected", h+1, h)
		}
	})
}
