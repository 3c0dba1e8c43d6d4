//go:build soak

package soak

import (
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/smqtt/smqtt/internal/fleet"
	"github.com/smqtt/smqtt/internal/mosquitto"
)

func TestSoak(t *testing.T) {
	d := 10 * time.Minute
	if v := os.Getenv("SMQTT_SOAK"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := mosquitto.Available(); !ok {
		t.Skip("mosquitto not installed")
	}
	m, err := mosquitto.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	f, err := fleet.New(fleet.Options{UpstreamURL: m.URL(), UpstreamAddr: m.Addr(), Dir: t.TempDir(),
		Members: []string{"a", "b", "visitor"}, Heartbeat: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a, err := f.Join("a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := f.Join("b")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fleet.Settle(10*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	if err := b.App.Subscribe("secure/soak", 1); err != nil {
		t.Fatal(err)
	}

	sample := func() (int, uint64) {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return runtime.NumGoroutine(), ms.HeapAlloc
	}
	g0, h0 := sample()
	t.Logf("start: %d goroutines, heap %.1f MiB", g0, float64(h0)/(1<<20))

	received := make(chan int, 1<<20)
	go func() {
		for msg := range b.App.Inbox {
			v, _ := strconv.Atoi(string(msg.Payload))
			received <- v
		}
	}()
	start := time.Now()
	tick := time.NewTicker(2 * time.Millisecond) // 500 msg/s
	defer tick.Stop()
	sent, rekeys, restarts := 0, 0, 0
	nextVisit, nextRestart, nextSample := start.Add(20*time.Second), start.Add(60*time.Second), start.Add(30*time.Second)
	var gMid int
	var hMid uint64
	for time.Since(start) < d {
		<-tick.C
		sent++
		a.App.Client.Publish("secure/soak", 1, false, []byte(strconv.Itoa(sent)))
		now := time.Now()
		if now.After(nextVisit) {
			nextVisit = now.Add(20 * time.Second)
			go func() { // a member joins and leaves: two rekeys
				if v, err := f.KeyClient("visitor", nil, 15*time.Second); err == nil {
					time.Sleep(2 * time.Second)
					v.Close()
				}
			}()
			rekeys += 2
		}
		if now.After(nextRestart) {
			nextRestart = now.Add(60 * time.Second)
			if err := m.Restart(); err != nil {
				t.Fatal(err)
			}
			restarts++
		}
		if now.After(nextSample) && gMid == 0 {
			gMid, hMid = sample()
			t.Logf("after 30 s: %d goroutines, heap %.1f MiB", gMid, float64(hMid)/(1<<20))
		}
	}
	next, dup := 1, 0
	deadline := time.After(2 * time.Minute)
	for next <= sent {
		select {
		case v := <-received:
			switch {
			case v == next:
				next++
			case v < next:
				dup++
			default:
				t.Fatalf("message %d arrived when %d was due", v, next)
			}
		case <-deadline:
			t.Fatalf("after %s: %d of %d arrived", d, next-1, sent)
		}
	}
	time.Sleep(5 * time.Second) // let visitors and rekeys settle
	g1, h1 := sample()
	t.Logf("%s: %d messages (%.0f/s), %d rekeys, %d upstream restarts; lost 0, duplicated %d; goroutines %d -> %d -> %d, heap %.1f -> %.1f -> %.1f MiB",
		d, sent, float64(sent)/d.Seconds(), rekeys, restarts, dup, g0, gMid, g1,
		float64(h0)/(1<<20), float64(hMid)/(1<<20), float64(h1)/(1<<20))
	if dup != 0 {
		t.Errorf("%d duplicates delivered", dup)
	}
	if g1 > gMid+50 {
		t.Errorf("goroutines grew from %d to %d", gMid, g1)
	}
	if h1 > 2*hMid+16<<20 {
		t.Errorf("heap grew from %.1f to %.1f MiB", float64(hMid)/(1<<20), float64(h1)/(1<<20))
	}
}
