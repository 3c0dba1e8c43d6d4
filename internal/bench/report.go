package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/smqtt/smqtt/keyserver"
)

// LinePrefix starts every machine-readable line.
const LinePrefix = "BENCH "

func benchLine(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		// The result types hold only numbers and strings.
		panic(fmt.Sprintf("bench: encoding a result: %v", err))
	}
	return LinePrefix + string(b)
}

// WriteTable prints throughput results as an aligned table.
func WriteTable(w io.Writer, rs []Result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tqos\tsize\tsent\treceived\tlost\tdup\tooo\tmsg/s\tp50 ms\tp90 ms\tp99 ms\tmax ms\tprocess CPU s/1k\tprocess RSS MiB\t")
	for _, r := range rs {
		name := r.Name
		if r.TimedOut {
			name += " (timed out)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t%.4f\t%.0f\t\n",
			name, r.QoS, r.Size, r.Sent, r.Received, r.Lost, r.Dup, r.OOO, r.MsgsPerS,
			r.P50us/1e3, r.P90us/1e3, r.P99us/1e3, r.MaxUs/1e3, r.CPUSPer1k, r.RSSMiB)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintln(w, "(apps, sidecars and, by default, the broker run in this one process: CPU and RSS are the whole process's)")
	return err
}

// WriteRekeyTable prints key-distribution results as an aligned table.
func WriteRekeyTable(w io.Writer, rs []RekeyResult) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tscheme\tmembers\tjoin s\tjoins/s\tleave→all rekeyed ms\trekey msgs\twrapped keys\trekey bytes\tprocess CPU s\tprocess RSS MiB\t")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.2f\t%.1f\t%.0f\t%d\t%d\t%d\t%.2f\t%.0f\t\n",
			r.Name, r.Scheme, r.Members, r.JoinS, r.JoinsPerS, r.LeaveMs, r.RekeyMsgs, r.WrappedKeys, r.RekeyBytes, r.CPUSeconds, r.RSSMiB)
	}
	return tw.Flush()
}

// CostResult is one line of `smqtt bench rekey --cost`: what one join and one
// leave (per leave, in batches of Batch) cost the key server of a scheme.
type CostResult struct {
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

// NewCostResult names and flattens a keyserver.Cost measurement.
func NewCostResult(r keyserver.CostResult) CostResult {
	name := fmt.Sprintf("cost-%s-%d", r.Scheme, r.Members)
	if r.Batch > 1 {
		name = fmt.Sprintf("cost-%s-batch%d-%d", r.Scheme, r.Batch, r.Members)
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }
	return CostResult{
		Name: name, Scheme: r.Scheme, Members: r.Members, Batch: r.Batch,
		JoinMessages: r.Join.Messages, JoinKeys: r.Join.WrappedKeys, JoinBytes: r.Join.Bytes, JoinMs: ms(r.Join.ServerTime),
		LeaveMessages: r.Leave.Messages, LeaveKeys: r.Leave.WrappedKeys, LeaveBytes: r.Leave.Bytes, LeaveMs: ms(r.Leave.ServerTime),
	}
}

// Line is the machine-readable form: "BENCH " and a JSON object.
func (r CostResult) Line() string { return benchLine(r) }

// WriteCostTable prints cost results as a table.
func WriteCostTable(w io.Writer, rs []CostResult) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scheme\tleaves/rekey\tmembers\tjoin msgs\tjoin keys\tjoin bytes\tjoin ms\tleave msgs\tleave keys\tleave bytes\tleave ms\t")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.0f\t%.1f\t%.0f\t%.2f\t%.1f\t%.1f\t%.0f\t%.2f\t\n",
			r.Scheme, r.Batch, r.Members, r.JoinMessages, r.JoinKeys, r.JoinBytes, r.JoinMs, r.LeaveMessages, r.LeaveKeys, r.LeaveBytes, r.LeaveMs)
	}
	return tw.Flush()
}
