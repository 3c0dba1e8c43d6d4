package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/keyserver"
)

// flagGiven reports whether the command line set the named flag.
func flagGiven(fs *flag.FlagSet, name string) bool {
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	return given
}

// costLine is the machine-readable form of one cost measurement.
type costLine struct {
	Name          string  `json:"name"`
	Scheme        string  `json:"scheme"`
	Members       int     `json:"members"`
	Batch         int     `json:"batch"`
	JoinMessages  float64 `json:"join_msgs"`
	JoinKeys      float64 `json:"join_keys"`
	JoinBytes     float64 `json:"join_bytes"`
	JoinMs        float64 `json:"join_ms"`
	LeaveMessages float64 `json:"leave_msgs"`
	LeaveKeys     float64 `json:"leave_keys"`
	LeaveBytes    float64 `json:"leave_bytes"`
	LeaveMs       float64 `json:"leave_ms"`
}

// runRekeyCost measures, per member count, what a join and a leave cost the
// key server of each scheme (keyserver.Cost), and prints a table and one
// BENCH line each.
func runRekeyCost(members string, suite gkd.Suite, batch int, jsonOnly bool, stdout, stderr io.Writer) error {
	if batch < 2 {
		return fmt.Errorf("--batch: %d, want at least 2 leaves for the batching row", batch)
	}
	if suite != gkd.SuiteHybrid && suite != gkd.SuiteX25519 {
		return fmt.Errorf("--suite: %q is not hybrid or x25519", suite)
	}
	var counts []int
	for _, s := range strings.Split(members, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= batch {
			return fmt.Errorf("--members: %q is not a count above --batch %d", s, batch)
		}
		counts = append(counts, n)
	}
	var lines []costLine
	for _, n := range counts {
		for _, c := range []struct {
			scheme string
			batch  int
		}{{"update", 1}, {"lkh", 1}, {"lkh", batch}, {"slotted", 1}} {
			fmt.Fprintf(stderr, "bench rekey --cost: %s, %d members, %d leave(s) per rekey\n", c.scheme, n, c.batch)
			r, err := keyserver.Cost(keyserver.CostOptions{Scheme: c.scheme, Members: n, Batch: c.batch, Suite: suite})
			if err != nil {
				return err
			}
			name := fmt.Sprintf("cost-%s-%d", c.scheme, n)
			if c.batch > 1 {
				name = fmt.Sprintf("cost-%s-batch%d-%d", c.scheme, c.batch, n)
			}
			lines = append(lines, costLine{
				Name: name, Scheme: c.scheme, Members: n, Batch: c.batch,
				JoinMessages: r.Join.Messages, JoinKeys: r.Join.WrappedKeys, JoinBytes: r.Join.Bytes,
				JoinMs:        float64(r.Join.ServerTime.Microseconds()) / 1e3,
				LeaveMessages: r.Leave.Messages, LeaveKeys: r.Leave.WrappedKeys, LeaveBytes: r.Leave.Bytes,
				LeaveMs: float64(r.Leave.ServerTime.Microseconds()) / 1e3,
			})
		}
	}
	if !jsonOnly {
		fmt.Fprintf(stdout, "key server alone (no broker), %s member identities; leave figures per leave\n\n", suite)
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "scheme\tleaves/rekey\tmembers\tjoin msgs\tjoin keys\tjoin bytes\tjoin ms\tleave msgs\tleave keys\tleave bytes\tleave ms\t")
		for _, l := range lines {
			fmt.Fprintf(tw, "%s\t%d\t%d\t%.0f\t%.1f\t%.0f\t%.2f\t%.1f\t%.1f\t%.0f\t%.2f\t\n",
				l.Scheme, l.Batch, l.Members, l.JoinMessages, l.JoinKeys, l.JoinBytes, l.JoinMs, l.LeaveMessages, l.LeaveKeys, l.LeaveBytes, l.LeaveMs)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintln(stdout)
	}
	for _, l := range lines {
		b, err := json.Marshal(l)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "BENCH %s\n", b)
	}
	return nil
}
