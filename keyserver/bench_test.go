package keyserver_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/fleet"
)

// BenchmarkUpdateLeave200 joins 200 in-process key clients to one UPDATE
// group, then makes one member leave per iteration and waits until every
// remaining member holds the new epoch's key. It reports the time from the
// leave to the last member's new key, and the rekey messages sent (UPDATE
// sends one sealed message per remaining member: O(n)).
func BenchmarkUpdateLeave200(b *testing.B) {
	const members = 200
	up, err := embedded.Start(embedded.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer up.Close()
	var names []string
	for i := 0; i < members; i++ {
		names = append(names, fmt.Sprintf("m%03d", i))
	}
	f, err := fleet.New(fleet.Options{
		UpstreamURL: up.URL(), UpstreamAddr: up.Addr(), Dir: b.TempDir(),
		Scheme: "update", Members: names, RekeyBatch: time.Millisecond, Heartbeat: time.Hour,
	})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	nodes := make([]*fleet.Node, members)
	var wg sync.WaitGroup
	errs := make(chan error, members)
	for i, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			node, err := f.KeyClient(n, nil, 60*time.Second)
			nodes[i] = node
			if err != nil {
				errs <- fmt.Errorf("%s: %w", n, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	epoch, _ := f.KS.GroupEpoch(fleet.Group)
	waitKeys(b, nodes, epoch, start)
	b.Logf("%d members joined in %v (epoch %d)", members, time.Since(start).Round(time.Millisecond), epoch)

	if b.N > members-2 {
		b.N = members - 2
	}
	var total time.Duration
	sentBefore := rekeysSeen(up)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		leaver := nodes[len(nodes)-1]
		nodes = nodes[:len(nodes)-1]
		t0 := time.Now()
		leaver.Keys.Close()
		for {
			if e, _ := f.KS.GroupEpoch(fleet.Group); e > epoch {
				epoch = e
				break
			}
			time.Sleep(time.Millisecond)
		}
		waitKeys(b, nodes, epoch, t0)
		total += time.Since(t0)
	}
	b.StopTimer()
	sent := rekeysSeen(up) - sentBefore
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/full-rekey")
	b.ReportMetric(float64(sent)/float64(b.N), "rekey-msgs/leave")
	b.Logf("one leave in a group of %d: full rekey in %.1f ms, %d sealed rekey messages (one per remaining member)",
		members, float64(total.Microseconds())/1000/float64(b.N), sent/b.N)
}

// waitKeys waits until every node holds epoch's key.
func waitKeys(b *testing.B, nodes []*fleet.Node, epoch uint32, since time.Time) {
	for _, n := range nodes {
		for {
			if _, ok := n.Ring.GroupKey(fleet.Group, epoch); ok {
				break
			}
			if time.Since(since) > 60*time.Second {
				b.Fatalf("%s never got epoch %d", n.Name, epoch)
			}
			time.Sleep(time.Millisecond)
		}
	}
}

// rekeysSeen counts the unicast messages the key server sent to members.
func rekeysSeen(up *embedded.Broker) int {
	n := 0
	for _, s := range up.Spy.All() {
		if strings.Contains(s.Topic, "/m/") && s.Client == "keyserver" {
			n++
		}
	}
	return n
}
