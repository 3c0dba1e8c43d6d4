package queue

import (
	"context"
	"testing"
)

// benchRecord is a typical sealed QoS 1 message: a 300-byte payload.
var benchRecord = Record{QoS: 1, Topic: "secure/plant-7/line-3/temperature", Payload: make([]byte, 300)}

// BenchmarkAppendAck measures one sender's round: Append, Next, Ack.
// With write-behind, Flush runs every 32 appends, as an application's
// batched acknowledgements would call it.
func BenchmarkAppendAck(b *testing.B) {
	for _, o := range []Options{{Sync: SyncNone}, {Sync: SyncBatch}, {Sync: SyncAlways}, {Sync: SyncBatch, WriteBehind: true}} {
		name := "sync=" + o.Sync.String()
		if o.WriteBehind {
			name += "/write-behind"
		}
		b.Run(name, func(b *testing.B) {
			o.Dir = b.TempDir()
			q := openQueue(b, o)
			n := 0
			ctx := context.Background()
			b.SetBytes(int64(frameLen(benchRecord.Topic, benchRecord.Payload)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := q.Append(ctx, benchRecord); err != nil {
					b.Fatal(err)
				}
				if n++; n%32 == 0 {
					if err := q.Flush(); err != nil {
						b.Fatal(err)
					}
				}
				r, err := q.Next(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if err := q.Ack(r.ID); err != nil {
					b.Fatal(err)
				}
			}
			reportQueue(b, q)
		})
	}
}

// BenchmarkAppendAckParallel has concurrent appenders, each acking its own
// records: with SyncAlways they share fsyncs.
func BenchmarkAppendAckParallel(b *testing.B) {
	for _, s := range allSyncs {
		b.Run("sync="+s.String(), func(b *testing.B) {
			q := openQueue(b, Options{Dir: b.TempDir(), Sync: s})
			b.SetBytes(int64(frameLen(benchRecord.Topic, benchRecord.Payload)))
			b.ReportAllocs()
			b.SetParallelism(4)
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				for pb.Next() {
					id, err := q.Append(ctx, benchRecord)
					if err != nil {
						b.Error(err)
						return
					}
					if err := q.Ack(id); err != nil {
						b.Error(err)
						return
					}
				}
			})
			reportQueue(b, q)
		})
	}
}

func reportQueue(b *testing.B, q *Queue) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "appends/s")
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.fsyncs > 0 {
		b.ReportMetric(float64(b.N)/float64(q.fsyncs), "appends/fsync")
	}
}
