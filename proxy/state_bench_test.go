package proxy

import (
	"strconv"
	"testing"

	"github.com/smqtt/smqtt/proxy/queue"
)

// BenchmarkReplayCommit is the inbound worker's per-batch cost: a batch of
// messages from one sender, its window stored in one transaction.
func BenchmarkReplayCommit(b *testing.B) {
	for _, batch := range []int{1, 16} {
		b.Run("batch="+strconv.Itoa(batch), func(b *testing.B) {
			st, err := openReplayState(b.TempDir(), queue.SyncBatch)
			if err != nil {
				b.Fatal(err)
			}
			defer st.close()
			seq := uint64(0)
			b.ReportAllocs()
			for b.Loop() {
				for range batch {
					seq++
					st.accept("g", 1, 42, seq)
				}
				if err := st.commit(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
