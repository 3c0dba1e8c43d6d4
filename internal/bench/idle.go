package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
)

// Idle measures what idle application connections cost a process: it reads
// the resident set size of the given processes (a sidecar, its upstream
// broker), opens Connections MQTT 3.1.1 connections to URL that then send
// nothing (optionally each with one subscription of its own), and reads the
// RSS again once they are all connected and a settling time has passed.
// The clients are bare sockets that wrote a CONNECT (and a SUBSCRIBE) and
// read the answers: they cost the measured processes what an idle app
// would, and this process next to nothing.

// IdleOptions describe one idle-connection measurement.
type IdleOptions struct {
	Name        string // shown in the table; default "idle"
	URL         string // where the apps connect: tcp://host:port
	Connections int    // default 1000
	// PIDs are the processes whose RSS is read (/proc/PID/status); the
	// first is the one per-connection figures are for.
	PIDs []int
	// Subscribe makes each connection subscribe to a topic of its own
	// (TopicRoot/run/i) at QoS 1, as an app waiting for messages would.
	Subscribe bool
	TopicRoot string        // default "idle"
	KeepAlive time.Duration // in the CONNECT (default 300s: longer than the measurement)
	Settle    time.Duration // wait before each reading (default 2s)
	Parallel  int           // connections being set up at once (default 50)
	Timeout   time.Duration // for each connection's handshake (default 10s)
	// InProcess, when set, puts what the connections reach in this
	// process: "direct" is UpstreamURL itself (the clients' own cost),
	// "session" and "bridge" a sidecar in that mode started here, connected
	// to UpstreamURL and protecting TopicRoot/# under a static key. URL and
	// PIDs are then this sidecar (or UpstreamURL) and this process, and the
	// Go heap is measured too: the RSS does not count buffers the sidecar
	// allocated but never touched, the heap does.
	InProcess   string
	UpstreamURL string
	Dir         string // the sidecar's state; default a temporary directory
	Logger      *slog.Logger
	Progress    io.Writer
}

// IdleResult is what Idle measured, per process.
type IdleResult struct {
	Name        string  `json:"name"`
	Connections int     `json:"connections"`
	Subscribed  bool    `json:"subscribed"`
	PID         int     `json:"pid"`
	Process     string  `json:"process"`        // /proc/PID/comm
	RSSBefore   float64 `json:"rss_before_mib"` // before the connections
	RSSAfter    float64 `json:"rss_after_mib"`  // with every connection open and idle
	RSSClosed   float64 `json:"rss_closed_mib"` // after they closed again
	KiBPerConn  float64 `json:"kib_per_conn"`   // (RSSAfter − RSSBefore) / Connections
	ConnectS    float64 `json:"connect_s"`      // time to open them all
	// In process only (0 otherwise): HeapInuse + StackInuse after a GC.
	HeapBefore     float64 `json:"heap_before_mib"`
	HeapAfter      float64 `json:"heap_after_mib"`
	HeapKiBPerConn float64 `json:"heap_kib_per_conn"`
}

// Line is the machine-readable form: "BENCH " and a JSON object.
func (r IdleResult) Line() string { return benchLine(r) }

// WriteIdleTable prints idle-connection results as a table.
func WriteIdleTable(w io.Writer, rs []IdleResult) error {
	fmt.Fprintf(w, "%-24s %8s %6s %8s %-16s %10s %10s %10s %10s %11s %10s %14s %9s\n",
		"scenario", "conns", "subs", "pid", "process", "RSS before", "RSS idle", "RSS closed", "KiB/conn", "heap before", "heap idle", "heap KiB/conn", "connect s")
	for _, r := range rs {
		heap := func(v float64) string {
			if r.HeapAfter == 0 {
				return "-"
			}
			return strconv.FormatFloat(v, 'f', 1, 64)
		}
		fmt.Fprintf(w, "%-24s %8d %6t %8d %-16s %10.1f %10.1f %10.1f %10.1f %11s %10s %14s %9.2f\n",
			r.Name, r.Connections, r.Subscribed, r.PID, r.Process, r.RSSBefore, r.RSSAfter, r.RSSClosed, r.KiBPerConn,
			heap(r.HeapBefore), heap(r.HeapAfter), heap(r.HeapKiBPerConn), r.ConnectS)
	}
	_, err := fmt.Fprintln(w, "(MiB; RSS from /proc/PID/status VmRSS; heap, in process only, is the Go heap and stacks in use after a GC)")
	return err
}

// Idle runs the measurement. It fails if a connection cannot be set up.
func Idle(ctx context.Context, o IdleOptions) ([]IdleResult, error) {
	if o.Name == "" {
		o.Name = "idle"
	}
	if o.Connections == 0 {
		o.Connections = 1000
	}
	if o.TopicRoot == "" {
		o.TopicRoot = "idle"
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = 300 * time.Second
	}
	if o.Settle == 0 {
		o.Settle = 2 * time.Second
	}
	if o.Parallel == 0 {
		o.Parallel = 50
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	switch {
	case o.Connections < 0 || o.Parallel < 1:
		return nil, fmt.Errorf("%w: connections and parallel must be positive", ErrOptions)
	case o.KeepAlive < 0 || o.KeepAlive > 65535*time.Second:
		return nil, fmt.Errorf("%w: keep-alive %s is not 0 to 65535s", ErrOptions, o.KeepAlive)
	case strings.ContainsAny(o.TopicRoot, "/+#\x00"):
		return nil, fmt.Errorf("%w: topic root %q is not one topic level", ErrOptions, o.TopicRoot)
	}
	if o.InProcess != "" {
		stop, err := o.startInProcess(ctx)
		if stop != nil {
			defer stop()
		}
		if err != nil {
			return nil, err
		}
	}
	if len(o.PIDs) == 0 {
		return nil, fmt.Errorf("%w: no process to measure", ErrOptions)
	}
	u, err := url.Parse(o.URL)
	if err != nil || (u.Scheme != "tcp" && u.Scheme != "mqtt") || u.Host == "" {
		return nil, fmt.Errorf("%w: url %q is not tcp://host:port", ErrOptions, o.URL)
	}
	rs := make([]IdleResult, len(o.PIDs))
	for i, pid := range o.PIDs {
		rs[i] = IdleResult{Name: o.Name, Connections: o.Connections, Subscribed: o.Subscribe, PID: pid, Process: procComm(pid)}
	}
	inProcess := o.InProcess != ""
	heap := func() float64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return float64(m.HeapInuse+m.StackInuse) / (1 << 20)
	}
	read := func(set func(*IdleResult, float64)) error {
		if inProcess {
			debug.FreeOSMemory()
		}
		for i := range rs {
			v, err := procRSSMiB(rs[i].PID)
			if err != nil {
				return err
			}
			set(&rs[i], v)
		}
		return nil
	}
	if err := sleepCtx(ctx, o.Settle); err != nil {
		return nil, err
	}
	if inProcess {
		rs[0].HeapBefore = heap()
	}
	if err := read(func(r *IdleResult, v float64) { r.RSSBefore = v }); err != nil {
		return nil, err
	}

	var rnd [4]byte
	rand.Read(rnd[:])
	run := hex.EncodeToString(rnd[:])
	conns := make([]net.Conn, o.Connections)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	start := time.Now()
	sem := make(chan struct{}, o.Parallel)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
		done     int
	)
	for i := range conns {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := idleConnect(ctx, u.Host, fmt.Sprintf("idle-%s-%d", run, i), o, fmt.Sprintf("%s/%s/%d", o.TopicRoot, run, i))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = fmt.Errorf("connection %d: %w", i, err)
				}
				return
			}
			conns[i] = c
			done++
			if o.Progress != nil && done%500 == 0 {
				fmt.Fprintf(o.Progress, "bench idle: %d of %d connected\n", done, o.Connections)
			}
		})
		mu.Lock()
		failed := firstErr != nil
		mu.Unlock()
		if failed {
			break
		}
	}
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return nil, firstErr
	}
	connectS := time.Since(start).Seconds()
	if err := sleepCtx(ctx, o.Settle); err != nil {
		return nil, err
	}
	if inProcess {
		rs[0].HeapAfter = heap()
	}
	if err := read(func(r *IdleResult, v float64) { r.RSSAfter = v }); err != nil {
		return nil, err
	}
	for i, c := range conns {
		c.Write([]byte{0xe0, 0}) // DISCONNECT
		c.Close()
		conns[i] = nil
	}
	if err := sleepCtx(ctx, o.Settle); err != nil {
		return nil, err
	}
	if err := read(func(r *IdleResult, v float64) { r.RSSClosed = v }); err != nil {
		return nil, err
	}
	for i := range rs {
		rs[i].ConnectS = connectS
		if o.Connections > 0 {
			rs[i].KiBPerConn = (rs[i].RSSAfter - rs[i].RSSBefore) * 1024 / float64(o.Connections)
			rs[i].HeapKiBPerConn = (rs[i].HeapAfter - rs[i].HeapBefore) * 1024 / float64(o.Connections)
		}
	}
	return rs, nil
}

// startInProcess sets o.URL and o.PIDs for an in-process measurement,
// starting the sidecar it names; stop, when not nil, closes what it started.
func (o *IdleOptions) startInProcess(ctx context.Context) (stop func(), err error) {
	if o.UpstreamURL == "" {
		return nil, fmt.Errorf("%w: in-process %s needs an upstream URL", ErrOptions, o.InProcess)
	}
	o.PIDs = []int{os.Getpid()}
	var mode proxy.Mode
	switch o.InProcess {
	case "direct":
		o.URL = o.UpstreamURL
		return nil, nil
	case string(proxy.ModeSession), string(proxy.ModeBridge):
		mode = proxy.Mode(o.InProcess)
	default:
		return nil, fmt.Errorf("%w: in-process %q is not direct, session or bridge", ErrOptions, o.InProcess)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	var tmp string
	dir := o.Dir
	if dir == "" {
		if tmp, err = os.MkdirTemp("", "smqtt-bench-idle-"); err != nil {
			return nil, err
		}
		dir = tmp
	}
	var key envelope.GroupKey
	rand.Read(key[:])
	ring := keyclient.NewRing()
	if err := ring.AddStatic(Group, key); err != nil {
		return nil, err
	}
	rules := []proxy.Rule{{Filters: []string{o.TopicRoot + "/#"}, Group: Group}}
	sc, u, err := startSidecar(ctx, mode, o.UpstreamURL, "bench-idle-sidecar-"+o.InProcess, filepath.Join(dir, "idle-"+o.InProcess), rules, ring, o.Logger)
	stop = func() {
		if sc != nil {
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			sc.Close(cctx)
			cancel()
		}
		if tmp != "" {
			os.RemoveAll(tmp)
		}
	}
	o.URL = u
	return stop, err
}

// idleConnect opens one MQTT 3.1.1 connection and, when asked, subscribes
// it to topic; the connection then stays silent.
func idleConnect(ctx context.Context, host, id string, o IdleOptions, topic string) (net.Conn, error) {
	d := net.Dialer{Timeout: o.Timeout}
	c, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(o.Timeout))
	var p []byte
	// CONNECT: "MQTT", level 4, clean session, keep-alive, client id.
	vh := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, byte(o.KeepAlive / time.Second >> 8), byte(o.KeepAlive / time.Second)}
	body := append(vh, mqttString(id)...)
	p = append(p, 0x10)
	p = envelope.AppendVarint(p, len(body))
	p = append(p, body...)
	if _, err := c.Write(p); err != nil {
		c.Close()
		return nil, err
	}
	r := bufio.NewReaderSize(c, 64)
	typ, body, err := readPacket(r)
	switch {
	case err != nil:
		c.Close()
		return nil, fmt.Errorf("CONNACK: %w", err)
	case typ != 0x20 || len(body) != 2 || body[1] != 0:
		c.Close()
		return nil, fmt.Errorf("connection refused: packet %#x % x", typ, body)
	}
	if o.Subscribe {
		body := append([]byte{0, 1}, mqttString(topic)...)
		body = append(body, 1)
		p = append(p[:0], 0x82)
		p = envelope.AppendVarint(p, len(body))
		p = append(p, body...)
		if _, err := c.Write(p); err != nil {
			c.Close()
			return nil, err
		}
		typ, body, err := readPacket(r)
		switch {
		case err != nil:
			c.Close()
			return nil, fmt.Errorf("SUBACK: %w", err)
		case typ != 0x90 || len(body) != 3 || body[2] > 2:
			c.Close()
			return nil, fmt.Errorf("subscription refused: packet %#x % x", typ, body)
		}
	}
	if r.Buffered() > 0 {
		c.Close()
		return nil, fmt.Errorf("unexpected packet after the handshake")
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

func mqttString(s string) []byte {
	return append([]byte{byte(len(s) >> 8), byte(len(s))}, s...)
}

// readPacket reads one MQTT packet: its type (the first byte's high
// nibble, shifted back into place) and body.
func readPacket(r *bufio.Reader) (byte, []byte, error) {
	h, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mult := 0, 1
	for i := 0; ; i++ {
		b, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(b&0x7f) * mult
		if b&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, nil, fmt.Errorf("malformed remaining length")
		}
		mult *= 128
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, err
	}
	return h & 0xf0, body, nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// procRSSMiB is a process's VmRSS in MiB.
func procRSSMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("RSS of process %d: %w", pid, err)
	}
	for line := range bytes.Lines(b) {
		rest, ok := bytes.CutPrefix(line, []byte("VmRSS:"))
		if !ok {
			continue
		}
		if f := strings.Fields(string(rest)); len(f) >= 1 {
			kb, err := strconv.ParseFloat(f[0], 64)
			if err == nil {
				return kb / 1024, nil
			}
		}
	}
	return 0, fmt.Errorf("RSS of process %d: no VmRSS in /proc/%d/status", pid, pid)
}

func procComm(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}
