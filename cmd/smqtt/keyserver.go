package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/smqtt/smqtt/config"
	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/mqttconn"
	"github.com/smqtt/smqtt/keyserver"
)

func runKeyserver(args []string, stdout, stderr io.Writer) error {
	cfgPath, log, err := roleArgs("keyserver", args, stderr)
	if err != nil {
		return err
	}
	opts, cfg, err := loadKeyserver(cfgPath, log)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts.Registry = reg
	var srv keyServer
	var health func() (string, error)
	if opts.Etcd != nil {
		ha, err := keyserver.NewHA(opts)
		if err != nil {
			return err
		}
		srv, health = ha, ha.Health
	} else {
		if err := makeStoreDir(opts.StorePath); err != nil {
			return err
		}
		one, err := keyserver.New(opts)
		if err != nil {
			return err
		}
		srv = one
		health = func() (string, error) {
			if !one.Connected() {
				return "", errors.New("upstream not connected")
			}
			return "ok", nil
		}
	}
	if err := srv.Start(); err != nil {
		return err
	}
	log.Info("key server started", "public_key_id", opts.Identity.Public().ID(), "groups", len(opts.Groups), "members", len(opts.Members), "etcd", opts.Etcd != nil)
	if cfg.MetricsListen != "" {
		m, err := serveMetricsBody(cfg.MetricsListen, reg, health, log)
		if err != nil {
			srv.Close()
			return err
		}
		defer m.Shutdown(context.Background())
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	for s := range sig {
		if s == syscall.SIGHUP {
			newOpts, _, err := loadKeyserver(cfgPath, log)
			if err == nil {
				err = srv.Reload(newOpts)
			}
			if err != nil {
				log.Error("reload refused; keeping the running configuration", "error", oneLine(err))
				continue
			}
			log.Info("configuration reloaded")
			continue
		}
		log.Info("shutting down", "signal", s.String())
		break
	}
	return srv.Close()
}

// makeStoreDir creates the directory of the key server's store file, mode
// 0700 (it holds every group's key), as the sidecar does for its data_dir:
// a first start needs no mkdir.
func makeStoreDir(store string) error {
	if err := os.MkdirAll(filepath.Dir(store), 0o700); err != nil {
		return fmt.Errorf("keyserver.store: %w", err)
	}
	return nil
}

// keyServer is one key server alone (bbolt) or one of several (etcd).
type keyServer interface {
	Start() error
	Reload(keyserver.Options) error
	Close() error
}

// loadKeyserver reads and checks the keyserver section and loads every key
// it names.
func loadKeyserver(path string, log *slog.Logger) (keyserver.Options, *config.Keyserver, error) {
	f, err := config.Load(path)
	if err != nil {
		return keyserver.Options{}, nil, err
	}
	cfg, err := f.KeyserverConfig()
	if err != nil {
		return keyserver.Options{}, nil, err
	}
	for _, w := range cfg.Warnings() {
		log.Warn(w)
	}
	id, err := gkd.LoadIdentity(cfg.Identity)
	if err != nil {
		return keyserver.Options{}, nil, fmt.Errorf("keyserver.identity: %w", err)
	}
	members := map[string]*gkd.PublicKey{}
	for i, m := range cfg.Members {
		line, err := m.Load()
		if err != nil {
			return keyserver.Options{}, nil, fmt.Errorf("keyserver.members[%d].public_key: %w", i, err)
		}
		pk, err := gkd.ParsePublicKey(line)
		if err != nil {
			return keyserver.Options{}, nil, fmt.Errorf("keyserver.members[%d].public_key: %w", i, err)
		}
		if string(pk.Suite()) != string(cfg.KEM) {
			return keyserver.Options{}, nil, fmt.Errorf("keyserver.members[%d].public_key: a %s key, but keyserver.kem is %s (make it with smqtt keygen --kem %s)", i, pk.Suite(), cfg.KEM, cfg.KEM)
		}
		members[m.Name] = pk
	}
	var groups []keyserver.GroupConfig
	for i, g := range cfg.Groups {
		if g.Scheme == config.SchemeLKH && g.Degree > gkd.MaxLKHDegree {
			return keyserver.Options{}, nil, fmt.Errorf("keyserver.groups[%d].degree: %d too large (want at most %d)", i, g.Degree, gkd.MaxLKHDegree)
		}
		groups = append(groups, keyserver.GroupConfig{
			Name: g.Name, Topics: g.Topics, Scheme: string(g.Scheme), Members: g.Members,
			RekeyBatch: g.RekeyBatch, RekeyLead: g.RekeyLead, SendGrace: g.SendGrace, ReceiveRetention: g.ReceiveRetention,
			Degree: g.Degree, MaxMessageSize: int(g.MaxMessageSize),
			Slot: g.Slot, SlotDepth: g.SlotDepth, MemberInterval: g.MemberInterval, SkewSlots: g.SkewSlots,
			SenderAuth: g.SenderAuth,
		})
	}
	upTLS, err := clientTLS(cfg.Upstream)
	if err != nil {
		return keyserver.Options{}, nil, err
	}
	var etcd *keyserver.EtcdOptions
	if e := cfg.Etcd; e != nil {
		t, err := etcdTLS(e)
		if err != nil {
			return keyserver.Options{}, nil, err
		}
		etcd = &keyserver.EtcdOptions{
			Endpoints: e.Endpoints, Prefix: e.Prefix, DialTimeout: e.DialTimeout, LeaseTTL: e.LeaseTTL, Timeout: e.Timeout, TLS: t,
		}
	}
	return keyserver.Options{
		Etcd:        etcd,
		Identity:    id,
		Upstream:    upstreamOptions(cfg.Upstream, upTLS),
		TopicPrefix: cfg.TopicPrefix,
		StorePath:   cfg.Store,
		Members:     members,
		Groups:      groups,
		Heartbeat:   cfg.Heartbeat,
		LeaveDelay:  cfg.LeaveDelay,
		Logger:      log,
	}, cfg, nil
}

// upstreamOptions turns an upstream config section into connection options.
func upstreamOptions(u config.Upstream, t *tls.Config) mqttconn.Options {
	return mqttconn.Options{
		URL: u.URL, ClientID: u.ClientID, Username: u.Username, Password: u.Password,
		TLS: t, KeepAlive: u.Keepalive, ConnectTimeout: u.ConnectTimeout,
	}
}

// etcdTLS returns the etcd client's TLS settings: nil for http:// endpoints
// without TLS files.
func etcdTLS(e *config.EtcdStore) (*tls.Config, error) {
	https := false
	for _, ep := range e.Endpoints {
		https = https || strings.HasPrefix(ep, "https://")
	}
	if !https && e.TLS == (config.EtcdTLS{}) {
		return nil, nil
	}
	u := config.Upstream{URL: "ssl://etcd"}
	u.TLS.CAFile, u.TLS.CertFile, u.TLS.KeyFile = e.TLS.CAFile, e.TLS.CertFile, e.TLS.KeyFile
	c, err := clientTLS(u)
	if err != nil {
		return nil, fmt.Errorf("keyserver.store.etcd.tls: %w", err)
	}
	return c, nil
}
