package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/bench"
	"github.com/smqtt/smqtt/keyserver"
)

// flagGiven reports whether the command line set the named flag.
func flagGiven(fs *flag.FlagSet, name string) bool {
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	return given
}

// runRekeyCost measures, per member count, what a join and a leave cost the
// key server of each scheme (keyserver.Cost), and prints a table and one
// BENCH line each.
func runRekeyCost(counts []int, suite gkd.Suite, batch int, jsonOnly bool, stdout, stderr io.Writer) error {
	if batch < 2 {
		return fmt.Errorf("--batch: %d, want at least 2 leaves for the batching row", batch)
	}
	var rs []bench.CostResult
	for _, n := range counts {
		if n <= batch {
			return fmt.Errorf("--members: %d is not above --batch %d", n, batch)
		}
		for _, c := range []struct {
			scheme string
			batch  int
		}{{"update", 1}, {"lkh", 1}, {"lkh", batch}, {"slotted", 1}} {
			fmt.Fprintf(stderr, "bench rekey --cost: %s, %d members, %d leave(s) per rekey\n", c.scheme, n, c.batch)
			r, err := keyserver.Cost(keyserver.CostOptions{Scheme: c.scheme, Members: n, Batch: c.batch, Suite: suite})
			if err != nil {
				return err
			}
			rs = append(rs, bench.NewCostResult(r))
		}
	}
	if !jsonOnly {
		fmt.Fprintf(stdout, "key server alone (no broker), %s member identities; leave figures per leave\n\n", suite)
		if err := bench.WriteCostTable(stdout, rs); err != nil {
			return err
		}
		fmt.Fprintln(stdout)
	}
	for _, r := range rs {
		fmt.Fprintln(stdout, r.Line())
	}
	return nil
}
