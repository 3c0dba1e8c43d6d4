package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/fleet"
)

// RekeyOptions describe one key-distribution scenario: Members key clients
// join one group, then one leaves.
type RekeyOptions struct {
	Members int       // at least 2
	Scheme  string    // update (default), lkh or slotted
	Suite   gkd.Suite // default gkd.SuiteHybrid
	// RekeyBatch is how long the key server gathers joins and leaves before
	// one rekey (default 100ms).
	RekeyBatch time.Duration
	Timeout    time.Duration // for the joins, and again for the leave (default 120s)
	Dir        string        // key server store; default a temporary directory
	Progress   io.Writer
	Logger     *slog.Logger
}

// RekeyResult is what one key-distribution scenario measured.
type RekeyResult struct {
	Name      string  `json:"name"`
	Scheme    string  `json:"scheme"`
	Members   int     `json:"members"`
	JoinS     float64 `json:"join_s"`      // from the first key client's start to the last one joined
	JoinsPerS float64 `json:"joins_per_s"` // Members / JoinS
	// LeaveMs is from the leaving client's shutdown to every remaining
	// member holding the new epoch's key.
	LeaveMs     float64 `json:"leave_ms"`
	RekeyMsgs   int     `json:"rekey_msgs"`   // messages the key server sent for the leave: sealed Rekeys (update) or GroupRekey chunks (lkh)
	WrappedKeys int     `json:"wrapped_keys"` // keys sent for the leave: one per Rekey (update), one per wrapped key (lkh)
	RekeyBytes  int     `json:"rekey_bytes"`  // payload bytes of those messages
	CPUSeconds  float64 `json:"cpu_s"`        // process CPU over joins and leave
	RSSMiB      float64 `json:"rss_mib"`
}

// Line is the machine-readable form: "BENCH " and a JSON object.
func (r RekeyResult) Line() string { return benchLine(r) }

// Rekey measures joins and one leave on an embedded broker, whose spy counts
// the key server's messages.
func Rekey(ctx context.Context, o RekeyOptions) (RekeyResult, error) {
	if o.Scheme == "" {
		o.Scheme = "update"
	}
	if o.Suite == "" {
		o.Suite = gkd.SuiteHybrid
	}
	if o.Timeout == 0 {
		o.Timeout = 120 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Members < 2 {
		return RekeyResult{}, fmt.Errorf("%w: members %d: a leave needs at least 2", ErrOptions, o.Members)
	}
	if o.Scheme != "update" && o.Scheme != "lkh" && o.Scheme != "slotted" {
		return RekeyResult{}, fmt.Errorf("%w: scheme %q: update, lkh or slotted", ErrOptions, o.Scheme)
	}
	r := RekeyResult{Name: fmt.Sprintf("rekey-%s-%d", o.Scheme, o.Members), Scheme: o.Scheme, Members: o.Members}
	dir := o.Dir
	if dir == "" {
		tmp, err := os.MkdirTemp("", "smqtt-bench-rekey-")
		if err != nil {
			return r, err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	}
	broker, err := embedded.Start(embedded.Options{})
	if err != nil {
		return r, fmt.Errorf("bench rekey: embedded broker: %w", err)
	}
	defer broker.Close()
	names := make([]string, o.Members)
	for i := range names {
		names[i] = fmt.Sprintf("member-%04d", i)
	}
	f, err := fleet.New(fleet.Options{
		UpstreamURL: broker.URL(), UpstreamAddr: broker.Addr(), Dir: dir,
		Scheme: o.Scheme, Suite: o.Suite, Members: names, RekeyBatch: o.RekeyBatch, Logger: o.Logger,
	})
	if err != nil {
		return r, fmt.Errorf("bench rekey: fleet: %w", err)
	}
	defer func() {
		// The key server goes first, so that the members' leaves at
		// shutdown cause no rekeys.
		f.KS.Close()
		f.KS = nil
		f.Close()
	}()

	cpu0 := processCPU()
	start := time.Now()
	nodes := make([]*fleet.Node, 0, o.Members)
	for _, name := range names {
		n, err := f.KeyClient(name, nil, 0) // started; joined below
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return r, fmt.Errorf("bench rekey: %s: %w", name, err)
		}
		nodes = append(nodes, n)
	}
	jctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	for i, n := range nodes {
		if err := n.Keys.WaitJoined(jctx); err != nil {
			return r, fmt.Errorf("bench rekey: %d of %d joined, then %s: %w", i, o.Members, n.Name, err)
		}
		if o.Progress != nil && (i+1)%50 == 0 {
			fmt.Fprintf(o.Progress, "bench %s: %d joined\n", r.Name, i+1)
		}
	}
	r.JoinS = time.Since(start).Seconds()
	r.JoinsPerS = float64(o.Members) / r.JoinS

	// Let the joins' rekeys settle: every member holds the current epoch.
	epoch, _ := f.KS.GroupEpoch(fleet.Group)
	if err := holdEpoch(ctx, nodes, epoch, o.Timeout); err != nil {
		return r, fmt.Errorf("bench rekey: after the joins: %w", err)
	}

	broker.Spy.Reset()
	leaver, rest := nodes[len(nodes)-1], nodes[:len(nodes)-1]
	start = time.Now()
	leaver.Close()
	deadline := time.Now().Add(o.Timeout)
	next := epoch
	for next == epoch {
		if time.Now().After(deadline) {
			return r, fmt.Errorf("bench rekey: the key server did not rekey within %s of a leave", o.Timeout)
		}
		time.Sleep(time.Millisecond)
		next, _ = f.KS.GroupEpoch(fleet.Group)
	}
	if err := holdEpoch(ctx, rest, next, time.Until(deadline)); err != nil {
		return r, fmt.Errorf("bench rekey: after the leave: %w", err)
	}
	r.LeaveMs = float64(time.Since(start).Microseconds()) / 1e3
	r.CPUSeconds = processCPU() - cpu0
	r.RSSMiB = rssMiB()
	for _, m := range broker.Spy.All() {
		if m.Client != "keyserver" {
			continue
		}
		msg, err := gkd.Parse(m.Payload)
		if err != nil {
			continue
		}
		switch {
		case msg.Type == gkd.TypeRekey && strings.Contains(m.Topic, "/m/"):
			r.RekeyMsgs++
			r.WrappedKeys++
			r.RekeyBytes += len(m.Payload)
		case msg.Type == gkd.TypeGroupRekey:
			gr, err := gkd.ParseGroupRekey(msg.Body)
			if err != nil {
				continue
			}
			r.RekeyMsgs++
			r.WrappedKeys += (len(gr.Chunk) - gkd.LKHChunkHeaderSize) / gkd.LKHWrapSize
			r.RekeyBytes += len(m.Payload)
		}
	}
	return r, nil
}

// holdEpoch waits until every node holds the key of epoch (for slotted:
// of K2 generation epoch).
func holdEpoch(ctx context.Context, nodes []*fleet.Node, epoch uint32, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for _, n := range nodes {
		for {
			if st := n.Keys.Status(); len(st) > 0 && st[0].Epoch == epoch {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s does not hold epoch %d after %s", n.Name, epoch, wait)
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			time.Sleep(time.Millisecond)
		}
	}
	return nil
}
