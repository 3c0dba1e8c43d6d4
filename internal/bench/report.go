package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
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
