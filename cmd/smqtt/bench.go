package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/bench"
	"github.com/smqtt/smqtt/proxy"
)

func runBench(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "rekey" {
		return runBenchRekey(args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "idle" {
		return runBenchIdle(args[1:], stdout, stderr)
	}
	fs := newFlags("bench", `bench [--topologies direct,passthrough,protected] [--upstream URL] [--qos N] [--size N] [--messages N] ...
       smqtt bench rekey -h     (key distribution: joins and the rekey after a leave)
       smqtt bench idle -h      (memory per idle app connection of a sidecar process)

Drives real MQTT clients through each topology and prints a table, then one
"BENCH {json}" line per scenario. Apps, sidecars and (unless --upstream) the
broker run in this process, so CPU and RSS are the whole process's.
Topologies: direct (apps on the upstream broker), passthrough (two sidecars,
nothing protected), protected (two sidecars, every benchmark topic sealed
under a static group key), signed (protected, in a sender_auth group: batch
proofs made and checked), chain (apps publish on --chain-pub and subscribe
on --chain-sub, e.g. the two ends of a Mosquitto bridge chain).`, stderr)
	topologies := strings.Join([]string{bench.Direct, bench.Passthrough, bench.Protected}, ",")
	fs.StringVar(&topologies, "topologies", topologies, "comma-separated: "+strings.Join(bench.Topologies, ", "))
	fs.StringVar(&topologies, "topology", topologies, "same as --topologies")
	upstream := fs.String("upstream", "", "external upstream broker URL (default: an embedded mochi-mqtt broker)")
	chainPub := fs.String("chain-pub", "", "topology chain: broker URL the publishers connect to")
	chainSub := fs.String("chain-sub", "", "topology chain: broker URL the subscribers connect to")
	qos := fs.Int("qos", 1, "QoS of publishes and subscriptions: 0, 1 or 2")
	size := fs.Int("size", 256, fmt.Sprintf("payload bytes (at least %d)", bench.HeaderLen))
	messages := fs.Int("messages", 20000, "messages per publisher")
	publishers := fs.Int("publishers", 1, "publishing apps")
	subscribers := fs.Int("subscribers", 1, "subscribing apps, each gets every message (fan-out)")
	keepSession := fs.Bool("keep-session", false, "subscribers ask for a persistent session (clean session 0), which a sidecar keeps on disk")
	rate := fs.Float64("rate", 0, "messages per second per publisher (0: as fast as the path takes)")
	spread := fs.Int("spread", 1, "each publisher cycles over this many topics and subscribers take one (with signed: the worst case of batch proofs, one check per message)")
	window := fs.Int("window", 1000, "publishes not yet acknowledged, per publisher")
	timeout := fs.Duration("timeout", 60*time.Second, "each scenario stops after this long")
	name := fs.String("name", "", "prefix of the scenario names (e.g. the upstream's name)")
	mode := fs.String("mode", "session", "the sidecars' mode (passthrough, protected): session or bridge (scenario names get -bridge)")
	topicRoot := fs.String("topic-root", "bench", "first level of the benchmark's topics (keeps it apart from other traffic on a shared broker)")
	jsonOnly := fs.Bool("json", false, "print only the BENCH lines")
	newLog := logFlags(fs, stderr, "error")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log, err := newLog()
	if err != nil {
		return err
	}
	var topos []string
	for _, t := range strings.Split(topologies, ",") {
		t = strings.TrimSpace(t)
		if !slices.Contains(bench.Topologies, t) {
			return fmt.Errorf("--topologies: %q is not one of %s", t, strings.Join(bench.Topologies, ", "))
		}
		topos = append(topos, t)
	}
	if slices.Contains(topos, bench.Chain) && (*chainPub == "" || *chainSub == "") {
		return fmt.Errorf("--topologies: chain needs --chain-pub and --chain-sub")
	}
	switch {
	case *qos < 0 || *qos > 2:
		return fmt.Errorf("--qos: %d is not 0, 1 or 2", *qos)
	case *size < bench.HeaderLen:
		return fmt.Errorf("--size: %d is below the %d-byte header", *size, bench.HeaderLen)
	case *messages < 1:
		return fmt.Errorf("--messages: %d must be at least 1", *messages)
	case *publishers < 1:
		return fmt.Errorf("--publishers: %d must be at least 1", *publishers)
	case *subscribers < 1:
		return fmt.Errorf("--subscribers: %d must be at least 1", *subscribers)
	case *rate < 0:
		return fmt.Errorf("--rate: %g is negative", *rate)
	case *spread < 1 || *spread > *messages:
		return fmt.Errorf("--spread: %d is not between 1 and --messages", *spread)
	case *window < 1:
		return fmt.Errorf("--window: %d must be at least 1", *window)
	case *timeout <= 0:
		return fmt.Errorf("--timeout: %s must be positive", *timeout)
	case *topicRoot == "" || strings.ContainsAny(*topicRoot, "/+#\x00"):
		return fmt.Errorf("--topic-root: %q is not one topic level", *topicRoot)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if !*jsonOnly {
		up := *upstream
		if up == "" {
			up = "embedded mochi-mqtt (in this process)"
		}
		fmt.Fprintf(stdout, "upstream %s; QoS %d, %d-byte payloads, %d messages × %d publishers, %d subscribers, rate %s\n\n",
			up, *qos, *size, *messages, *publishers, *subscribers, rateString(*rate))
	}
	rs, err := bench.Suite(ctx, bench.Options{
		Name: *name, UpstreamURL: *upstream, ChainPub: *chainPub, ChainSub: *chainSub,
		QoS: byte(*qos), Size: *size, Messages: *messages, Publishers: *publishers, Subscribers: *subscribers, KeepSession: *keepSession,
		Rate: *rate, Spread: *spread, Window: *window, Timeout: *timeout, TopicRoot: *topicRoot, Mode: proxy.Mode(*mode), Progress: stderr, Logger: log,
	}, topos, nil)
	if !*jsonOnly && len(rs) > 0 {
		if werr := bench.WriteTable(stdout, rs); werr != nil {
			return werr
		}
		fmt.Fprintln(stdout)
	}
	for _, r := range rs {
		fmt.Fprintln(stdout, r.Line())
	}
	return err
}

func rateString(r float64) string {
	if r == 0 {
		return "unlimited"
	}
	return strconv.FormatFloat(r, 'f', -1, 64) + " msg/s per publisher"
}

func runBenchRekey(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench rekey", `bench rekey [--members 100,200] [--scheme update,lkh,slotted] [--suite hybrid|x25519] [--json]
bench rekey --cost [--members 100,1000,10000,100000] [--batch 16] [--json]

For each member count n: n key-only members join one group (join time and
joins/s), then one leaves; it measures the time until every remaining member
holds the new epoch's key, and counts the messages, wrapped keys and bytes the
key server sent for it (update: one sealed Rekey per member; lkh: broadcast
chunks of wrapped keys; slotted: one sealed K2 refresh per member). Runs an
embedded broker and key server in this process.

With --cost, the key server alone, without broker or members, measures what one
join and one leave cost it in groups of up to 100,000 members, per scheme
(update, lkh, lkh with --batch leaves gathered in one rekey, slotted): keys and
bytes sent, and its time, store commit included.`, stderr)
	members := fs.String("members", "100,200", "comma-separated member counts (each at least 2)")
	scheme := fs.String("scheme", "update,lkh", "group key schemes to compare: update, lkh, or update,lkh")
	suite := fs.String("suite", string(gkd.SuiteHybrid), "KEM of the identities: hybrid (ML-KEM-768 + X25519) or x25519")
	batch := fs.Duration("rekey-batch", 100*time.Millisecond, "the key server gathers joins and leaves this long before one rekey")
	timeout := fs.Duration("timeout", 120*time.Second, "bound for the joins, and again for the leave")
	jsonOnly := fs.Bool("json", false, "print only the BENCH lines")
	cost := fs.Bool("cost", false, "measure the key server's cost per join and leave up to --members 100,1000,10000,100000, without broker")
	leaves := fs.Int("batch", 16, "with --cost: leaves gathered into one lkh rekey for the batching row")
	newLog := logFlags(fs, stderr, "error")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log, err := newLog()
	if err != nil {
		return err
	}
	if *cost && !flagGiven(fs, "members") {
		*members = "100,1000,10000,100000"
	}
	if *suite != string(gkd.SuiteHybrid) && *suite != string(gkd.SuiteX25519) {
		return fmt.Errorf("--suite: %q is not hybrid or x25519", *suite)
	}
	var counts []int
	for _, s := range strings.Split(*members, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 2 {
			return fmt.Errorf("--members: %q is not a count of at least 2", s)
		}
		counts = append(counts, n)
	}
	if *cost {
		return runRekeyCost(counts, gkd.Suite(*suite), *leaves, *jsonOnly, stdout, stderr)
	}
	schemes := strings.Split(*scheme, ",")
	for _, sch := range schemes {
		if sch != "update" && sch != "lkh" && sch != "slotted" {
			return fmt.Errorf("--scheme: %q is not a scheme (update, lkh, slotted, or a list: update,lkh)", sch)
		}
	}
	if *batch <= 0 {
		return fmt.Errorf("--rekey-batch: %s must be positive", *batch)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if !*jsonOnly {
		fmt.Fprintf(stdout, "embedded broker and key server in this process; scheme %s, %s identities, rekey batch %s\n\n", *scheme, *suite, *batch)
	}
	var rs []bench.RekeyResult
	var runErr error
scenarios:
	for _, n := range counts {
		for _, sch := range schemes {
			fmt.Fprintf(stderr, "bench rekey: %s, %d members\n", sch, n)
			r, err := bench.Rekey(ctx, bench.RekeyOptions{
				Members: n, Scheme: sch, Suite: gkd.Suite(*suite), RekeyBatch: *batch,
				Timeout: *timeout, Progress: stderr, Logger: log,
			})
			if err != nil {
				runErr = err
				break scenarios
			}
			rs = append(rs, r)
		}
	}
	if !*jsonOnly && len(rs) > 0 {
		if err := bench.WriteRekeyTable(stdout, rs); err != nil {
			return err
		}
		fmt.Fprintln(stdout)
	}
	for _, r := range rs {
		fmt.Fprintln(stdout, r.Line())
	}
	return runErr
}

func runBenchIdle(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench idle", `bench idle --url tcp://HOST:PORT --pid PID[,PID...] [--connections 1000] [--subscribe] [--json]
bench idle --in-process direct,session,bridge --upstream URL [--connections 1000] [--subscribe] [--json]

Memory per idle application connection: reads the resident set size
(/proc/PID/status VmRSS) of each --pid (a sidecar, and e.g. its upstream
broker), opens --connections MQTT 3.1.1 connections to --url that then stay
silent (with --subscribe each first subscribes to a topic of its own), reads
the RSS again once all are open and --settle has passed, and once more after
they closed. The per-connection figure is for the first --pid.

With --in-process, each named target runs in this process instead (direct:
the connections go to --upstream itself, which measures the clients' own
cost; session, bridge: a sidecar in that mode, connected to --upstream), and
the Go heap and stacks in use are measured too.`, stderr)
	target := fs.String("url", "", "where the idle apps connect (tcp://host:port), e.g. a sidecar's listener")
	pids := fs.String("pid", "", "comma-separated process ids whose RSS to read; the first is the measured one")
	conns := fs.Int("connections", 1000, "idle connections to open")
	subscribe := fs.Bool("subscribe", false, "each connection subscribes to a topic of its own (QoS 1)")
	settle := fs.Duration("settle", 2*time.Second, "wait before each reading")
	keepAlive := fs.Duration("keepalive", 300*time.Second, "keep-alive in the CONNECT (the connections send no PINGREQ)")
	name := fs.String("name", "idle", "scenario name (with --in-process: the prefix of each target's)")
	inProcess := fs.String("in-process", "", "comma-separated targets run in this process: direct, session, bridge (needs --upstream)")
	upstream := fs.String("upstream", "", "with --in-process: the upstream broker URL")
	jsonOnly := fs.Bool("json", false, "print only the BENCH lines")
	newLog := logFlags(fs, stderr, "error")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log, err := newLog()
	if err != nil {
		return err
	}
	var targets []string
	var ps []int
	if *inProcess != "" {
		if *target != "" || *pids != "" || *upstream == "" {
			return fmt.Errorf("bench idle: --in-process needs --upstream, and takes no --url or --pid")
		}
		for _, t := range strings.Split(*inProcess, ",") {
			t = strings.TrimSpace(t)
			if t != "direct" && t != string(proxy.ModeSession) && t != string(proxy.ModeBridge) {
				return fmt.Errorf("--in-process: %q is not direct, session or bridge", t)
			}
			targets = append(targets, t)
		}
	} else {
		if *target == "" || *pids == "" {
			return fmt.Errorf("bench idle: --url and --pid (or --in-process and --upstream) are required")
		}
		for _, s := range strings.Split(*pids, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil || n <= 0 {
				return fmt.Errorf("--pid: %q is not a process id", s)
			}
			ps = append(ps, n)
		}
		targets = []string{""}
	}
	if *conns < 1 {
		return fmt.Errorf("--connections: %d must be at least 1", *conns)
	}
	if *settle <= 0 {
		return fmt.Errorf("--settle: %s must be positive", *settle)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var rs []bench.IdleResult
	for _, t := range targets {
		n := *name
		if t != "" {
			n += "-" + t
		}
		r, err := bench.Idle(ctx, bench.IdleOptions{
			Name: n, URL: *target, Connections: *conns, PIDs: ps, Subscribe: *subscribe,
			KeepAlive: *keepAlive, Settle: *settle, InProcess: t, UpstreamURL: *upstream, Logger: log, Progress: stderr,
		})
		if err != nil {
			return err
		}
		rs = append(rs, r...)
	}
	if !*jsonOnly {
		if err := bench.WriteIdleTable(stdout, rs); err != nil {
			return err
		}
		fmt.Fprintln(stdout)
	}
	for _, r := range rs {
		fmt.Fprintln(stdout, r.Line())
	}
	return nil
}
