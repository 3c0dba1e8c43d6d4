package queue

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzRecover writes arbitrary bytes as a segment file and as the ack log,
// and checks that Open never fails or panics on them, hands out only
// well-formed records that were in the file, and leaves a directory that
// reopens cleanly.
func FuzzRecover(f *testing.F) {
	f.Add([]byte(segmentMagic), []byte(nil))
	f.Fuzz(func(t *testing.T, seg, acks []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, segmentName(1)), seg, 0o600); err != nil {
			t.Fatal(err)
		}
		if len(acks) > 0 {
			if err := os.WriteFile(filepath.Join(dir, ackLogName), acks, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		opts := Options{Dir: dir, BatchInterval: idle, MemoryBytes: 64}
		q, err := Open(opts)
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		defer q.Close()
		got := pending(t, q)
		var last uint64
		for _, r := range got {
			if r.ID <= last || r.QoS > 2 {
				t.Fatalf("record %+v after ID %d", r, last)
			}
			last = r.ID
			frame := make([]byte, frameLen(r.Topic, r.Payload))
			putFrame(frame, r.ID, r.QoS, r.Retain, r.Topic, r.Payload)
			if !bytes.Contains(seg, frame) {
				t.Fatalf("record %d is not in the segment file", r.ID)
			}
		}
		rec := q.Recovered()
		if rec.Unacked != len(got) || rec.Records < len(got) || rec.Dropped > int64(len(seg)+len(acks)) {
			t.Fatalf("Recovered() = %+v with %d records handed out", rec, len(got))
		}
		if (rec.Dropped > 0 || rec.Err != nil) && !errors.Is(rec.Err, ErrCorrupt) {
			t.Fatalf("Recovered() = %+v: damage not reported as ErrCorrupt", rec)
		}

		r := Record{QoS: 1, Topic: "t", Payload: []byte("after recovery")}
		if r.ID, err = q.Append(context.Background(), r); err != nil {
			t.Fatalf("Append after recovery: %v", err)
		}
		if r.ID <= last {
			t.Fatalf("Append assigned ID %d, not above %d", r.ID, last)
		}
		if err := q.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		q, err = Open(opts)
		if err != nil {
			t.Fatalf("second Open: %v", err)
		}
		defer q.Close()
		checkRecords(t, pending(t, q), append(got, r))
		if err := q.Recovered().Err; err != nil {
			t.Fatalf("second Open: Recovered().Err = %v", err)
		}
	})
}
