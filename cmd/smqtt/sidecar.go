package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/smqtt/smqtt/config"
	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

func runSidecar(args []string, stdout, stderr io.Writer) error {
	cfgPath, log, err := roleArgs("sidecar", args, stderr)
	if err != nil {
		return err
	}
	f, err := config.Load(cfgPath)
	if err != nil {
		return err
	}
	cfg, err := f.SidecarConfig()
	if err != nil {
		return err
	}
	for _, w := range cfg.Warnings() {
		log.Warn(w)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts, err := sidecarOptions(cfg, log, reg)
	if err != nil {
		return err
	}
	sc, err := proxy.New(opts)
	if err != nil {
		return err
	}
	registerGroupGauges(reg, cfg, opts.Keys.(*keyclient.Ring))
	var kc *keyclient.Client
	if cfg.Keyserver != nil {
		if kc, err = startKeyClient(cfg, opts, sc, reg, log); err != nil {
			sc.Close(context.Background())
			return err
		}
		defer kc.Close() // a clean shutdown leaves the groups
	}
	if err := sc.Start(); err != nil {
		return err
	}
	for i, a := range sc.Addrs() {
		log.Info("listening for local apps", "listen", cfg.Listen[i], "addr", a.String())
	}
	var metricsSrv *http.Server
	if cfg.MetricsListen != "" {
		metricsSrv, err = serveMetrics(cfg.MetricsListen, reg, func() error { return sidecarHealth(sc, opts, kc) }, log)
		if err != nil {
			sc.Close(context.Background())
			return err
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	s := <-sig
	for ; s == syscall.SIGHUP; s = <-sig {
		if err := reloadSidecar(cfgPath, cfg, sc, opts, kc); err != nil {
			log.Error("reload refused; keeping the running configuration", "error", oneLine(err))
			continue
		}
		log.Info("configuration reloaded: protect rules and unmatched policy applied")
	}
	log.Info("shutting down", "signal", s.String(), "queued", sc.QueueLen())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if metricsSrv != nil {
		metricsSrv.Shutdown(ctx)
	}
	if err := sc.Close(ctx); err != nil {
		return err
	}
	if n := sc.QueueLen(); n > 0 {
		log.Warn("messages left in the outbound queue; they are sent at the next start", "queued", n)
	}
	return nil
}

// reloadSidecar applies a changed configuration's protect rules, unmatched
// policy and new static keys, and joins the key-server groups that new rules
// name; anything else needs a restart and is refused.
func reloadSidecar(path string, running *config.Sidecar, sc *proxy.Sidecar, opts proxy.Options, kc *keyclient.Client) error {
	f, err := config.Load(path)
	if err != nil {
		return err
	}
	cfg, err := f.SidecarConfig()
	if err != nil {
		return err
	}
	if !reflect.DeepEqual(restartOnly(cfg), restartOnly(running)) {
		return errors.New("sidecar.mode, sidecar.session, sidecar.auth, sidecar.listen, sidecar.upstream, sidecar.data_dir and sidecar.keyserver change only with a restart")
	}
	ring := opts.Keys.(*keyclient.Ring)
	for group, path := range cfg.StaticKeys {
		if _, known := running.StaticKeys[group]; known {
			continue
		}
		k, err := gkd.LoadGroupKey(path)
		if err != nil {
			return fmt.Errorf("sidecar.static_keys.%s: %w", group, err)
		}
		if err := ring.AddStatic(group, envelope.GroupKey(k)); err != nil {
			return err
		}
	}
	if kc != nil {
		// Joined before the rules change, so that the key server's policy
		// names the new groups as the rules do.
		kc.AddGroups(keyServerGroups(cfg)...)
	}
	rules := protectRules(cfg, ring)
	return sc.SetRules(rules, cfg.Unmatched == config.UnmatchedDeny)
}

// protectRules turns the protect rules into the proxy's, and has the ring
// require sender authentication for the groups whose rules ask for it.
func protectRules(cfg *config.Sidecar, ring *keyclient.Ring) []proxy.Rule {
	var rules []proxy.Rule
	for _, r := range cfg.Protect {
		rules = append(rules, proxy.Rule{Filters: r.Topics, Group: r.Group})
		if r.SenderAuth {
			ring.RequireSenderAuth(r.Group)
		}
	}
	return rules
}

// restartOnly is the part of a sidecar configuration that a reload cannot
// change.
func restartOnly(c *config.Sidecar) any {
	return []any{c.Mode, c.Session, c.Auth, c.Listen, c.Upstream, c.DataDir, c.Keyserver != nil}
}

// keyServerGroups returns the groups of the protect rules that have no
// static key: their keys come from the key server.
func keyServerGroups(cfg *config.Sidecar) []string {
	var groups []string
	seen := map[string]bool{}
	for _, r := range cfg.Protect {
		if _, static := cfg.StaticKeys[r.Group]; !static && !seen[r.Group] {
			seen[r.Group] = true
			groups = append(groups, r.Group)
		}
	}
	return groups
}

// sidecarOptions turns a validated sidecar config into proxy options.
func sidecarOptions(cfg *config.Sidecar, log *slog.Logger, reg prometheus.Registerer) (proxy.Options, error) {
	ring := keyclient.NewRing()
	for group, path := range cfg.StaticKeys {
		k, err := gkd.LoadGroupKey(path)
		if err != nil {
			return proxy.Options{}, fmt.Errorf("sidecar.static_keys.%s: %w", group, err)
		}
		if err := ring.AddStatic(group, envelope.GroupKey(k)); err != nil {
			return proxy.Options{}, fmt.Errorf("sidecar.static_keys.%s: %w", group, err)
		}
	}
	rules := protectRules(cfg, ring)
	sync, err := queue.ParseSync(string(cfg.Queue.Sync))
	if err != nil {
		return proxy.Options{}, fmt.Errorf("sidecar.queue.sync: %w", err)
	}
	upTLS, err := clientTLS(cfg.Upstream)
	if err != nil {
		return proxy.Options{}, err
	}
	var listenTLS *tls.Config
	if cfg.ListenTLS != nil && cfg.ListenTLS.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.ListenTLS.CertFile, cfg.ListenTLS.KeyFile)
		if err != nil {
			return proxy.Options{}, fmt.Errorf("sidecar.listen_tls: %w", err)
		}
		listenTLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	users := map[string]string{}
	creds := map[string]proxy.Credentials{}
	for _, u := range cfg.Auth.Users {
		users[u.Username] = u.Password
		if u.Upstream != nil {
			creds[u.Username] = proxy.Credentials{Username: u.Upstream.Username, Password: u.Upstream.Password}
		}
	}
	return proxy.Options{
		Mode:                proxy.Mode(cfg.Mode),
		ClientIDPrefix:      cfg.Session.ClientIDPrefix,
		UpstreamCredentials: creds,
		Listen:              cfg.Listen,
		ListenTLS:           listenTLS,
		Users:               users,
		Upstream:            upstreamOptions(cfg.Upstream, upTLS),
		Rules:               rules,
		Deny:                cfg.Unmatched == config.UnmatchedDeny,
		Keys:                ring,
		NoKeyWait:           5 * time.Second,
		DataDir:             cfg.DataDir,
		Queue: queue.Options{
			MaxMessages:   cfg.Queue.MaxMessages,
			Sync:          sync,
			BatchInterval: cfg.Queue.BatchInterval,
		},
		Logger:   log,
		Registry: reg,
	}, nil
}

// registerGroupGauges exports, per protected group, the epoch the sidecar
// seals with and whether it can seal now (a key, fresh heartbeats).
func registerGroupGauges(reg prometheus.Registerer, cfg *config.Sidecar, ring *keyclient.Ring) {
	seen := map[string]bool{}
	for _, r := range cfg.Protect {
		g := r.Group
		if seen[g] {
			continue
		}
		seen[g] = true
		labels := prometheus.Labels{"group": g}
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "smqtt_sidecar_group_epoch", Help: "The epoch the sidecar seals the group's messages with (0: none).", ConstLabels: labels,
		}, func() float64 {
			e, _ := ring.SendEpoch(g)
			return float64(e)
		}))
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "smqtt_sidecar_group_sealing", Help: "1 while the sidecar holds a fresh key to seal the group's messages.", ConstLabels: labels,
		}, func() float64 {
			if _, err := ring.Sealer(g); err != nil {
				return 0
			}
			return 1
		}))
	}
}

// startKeyClient joins, through the key server, every protected group that
// has no static key, and feeds the key server's topic policy to the sidecar.
func startKeyClient(cfg *config.Sidecar, opts proxy.Options, sc *proxy.Sidecar, reg prometheus.Registerer, log *slog.Logger) (*keyclient.Client, error) {
	id, err := gkd.LoadIdentity(cfg.Identity)
	if err != nil {
		return nil, fmt.Errorf("sidecar.identity: %w", err)
	}
	line, err := cfg.Keyserver.Load()
	if err != nil {
		return nil, fmt.Errorf("sidecar.keyserver.public_key: %w", err)
	}
	serverKey, err := gkd.ParsePublicKey(line)
	if err != nil {
		return nil, fmt.Errorf("sidecar.keyserver.public_key: %w", err)
	}
	groups := keyServerGroups(cfg)
	var kc *keyclient.Client
	up := opts.Upstream
	up.ClientID += "-keys"
	firstPolicy := make(chan error, 1)
	kc, err = keyclient.NewClient(keyclient.ClientOptions{
		Identity:          id,
		Server:            serverKey,
		Upstream:          up,
		TopicPrefix:       cfg.Keyserver.TopicPrefix,
		Groups:            groups,
		MaxStaleness:      cfg.Keyserver.MaxStaleness,
		Ring:              opts.Keys.(*keyclient.Ring),
		Logger:            log,
		PolicyVersionFile: filepath.Join(cfg.DataDir, "policy-version"),
		OnPolicy: func(p gkd.Policy) {
			err := sc.SetServerPolicy(policyRules(p, kc.GroupName))
			if err != nil {
				log.Error("the key server's topic policy conflicts with the local protect rules (its filters are protected all the same)", "error", err)
			} else {
				log.Info("topic policy from the key server installed", "version", p.Version, "filters", len(p.Entries))
			}
			select {
			case firstPolicy <- err:
			default:
			}
		},
	})
	if err != nil {
		return nil, err
	}
	kc.Start()
	for _, g := range groups {
		labels := prometheus.Labels{"group": g}
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "smqtt_sidecar_join_seconds", Help: "Time from the last answered join request to the key server's response.", ConstLabels: labels,
		}, func() float64 { return groupStatus(kc, g).JoinLatency.Seconds() }))
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "smqtt_sidecar_group_revoked", Help: "1 while the key server refuses this sidecar as not (or no longer) a member of the group.", ConstLabels: labels,
		}, func() float64 {
			if groupStatus(kc, g).Revoked {
				return 1
			}
			return 0
		}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := kc.WaitJoined(ctx); err != nil {
		if errors.Is(err, keyclient.ErrRefused) {
			kc.Close()
			return nil, fmt.Errorf("sidecar.keyserver: %w", err)
		}
		log.Warn("groups not joined yet; protected messages wait for their keys", "error", err)
	}
	select {
	case err := <-firstPolicy:
		if err != nil {
			kc.Close()
			return nil, err
		}
	case <-time.After(10 * time.Second):
		log.Warn("no topic policy from the key server yet; protecting the local rules only until it arrives")
	}
	for _, st := range kc.Status() {
		log.Info("group", "group", st.Group, "joined", st.Joined, "epoch", st.Epoch, "sender", st.Sender, "join_latency", st.JoinLatency)
	}
	return kc, nil
}

// groupStatus returns what the key client knows of group g.
func groupStatus(kc *keyclient.Client, g string) keyclient.GroupStatus {
	for _, st := range kc.Status() {
		if st.Group == g {
			return st
		}
	}
	return keyclient.GroupStatus{Group: g}
}

// policyRules turns the key server's policy into sidecar rules; groups this
// sidecar does not belong to get a name no local group can have.
func policyRules(p gkd.Policy, lookup func(id [8]byte) (string, bool)) []proxy.Rule {
	var rules []proxy.Rule
	for _, e := range p.Entries {
		name, ok := lookup(e.Group)
		if !ok {
			name = fmt.Sprintf("#%x", e.Group)
		}
		rules = append(rules, proxy.Rule{Filters: []string{e.Filter}, Group: name})
	}
	return rules
}

// clientTLS builds the upstream TLS configuration, or nil for plain schemes.
func clientTLS(u config.Upstream) (*tls.Config, error) {
	if !u.UsesTLS() {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: u.TLS.InsecureSkipVerify}
	if u.TLS.CAFile != "" {
		pem, err := os.ReadFile(u.TLS.CAFile)
		if err != nil {
			return nil, fmt.Errorf("upstream.tls.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("upstream.tls.ca_file: %s holds no PEM certificate", u.TLS.CAFile)
		}
		c.RootCAs = pool
	}
	if u.TLS.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(u.TLS.CertFile, u.TLS.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("upstream.tls.cert_file: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// sidecarHealth is nil when upstream is connected, the key server (if any)
// admits the sidecar to every group it joins, and every protected group has
// a key to seal with.
func sidecarHealth(sc *proxy.Sidecar, opts proxy.Options, kc *keyclient.Client) error {
	if !sc.Connected() {
		return errors.New("upstream not connected")
	}
	if kc != nil {
		for _, st := range kc.Status() {
			switch {
			case st.Revoked:
				return fmt.Errorf("revoked from group %q: %s", st.Group, st.Refused)
			case st.Refused != "":
				return fmt.Errorf("group %q: refused by the key server: %s", st.Group, st.Refused)
			}
		}
	}
	for _, r := range opts.Rules {
		if _, err := opts.Keys.Sealer(r.Group); err != nil {
			return fmt.Errorf("group %q: no key", r.Group)
		}
	}
	return nil
}

// serveMetrics serves /metrics and /healthz on addr.
func serveMetrics(addr string, reg *prometheus.Registry, health func() error, log *slog.Logger) (*http.Server, error) {
	return serveMetricsBody(addr, reg, func() (string, error) { return "ok", health() }, log)
}

// serveMetricsBody is serveMetrics with a health check that also says what
// a healthy process is doing (a key server: leader or standby).
func serveMetricsBody(addr string, reg *prometheus.Registry, health func() (string, error), log *slog.Logger) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		body, err := health()
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, body)
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics_listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "error", err)
		}
	}()
	log.Info("serving /metrics and /healthz", "addr", ln.Addr().String())
	return srv, nil
}
