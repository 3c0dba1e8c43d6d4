package config

import (
	"fmt"
	"maps"
	"net"
	"net/url"
	"os"
	"path"
	"runtime"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// Sidecar is the "sidecar:" section: the local broker that unmodified apps
// connect to, the upstream broker it relays to, and which topics it protects
// with which group's key.
type Sidecar struct {
	// Mode is how apps are relayed upstream (default session).
	Mode SidecarMode `yaml:"mode"`
	// Session configures session mode.
	Session Session `yaml:"session"`
	// Identity is the sidecar's private key file (from smqtt keygen). It is
	// required when a keyserver section is present.
	Identity string `yaml:"identity"`
	// Listen lists where apps connect: tcp://host:port, ssl://host:port
	// (needs ListenTLS), ws://host:port, wss://host:port (needs ListenTLS),
	// unix:///absolute/path. Default ["tcp://127.0.0.1:1883"].
	Listen []string `yaml:"listen"`
	// ListenTLS is the server certificate of the ssl:// and wss:// listeners.
	ListenTLS *ListenTLS `yaml:"listen_tls"`
	// Auth lists the users apps may connect as; empty lets any client in.
	Auth Auth `yaml:"auth"`
	// Upstream is the untrusted broker.
	Upstream Upstream `yaml:"upstream"`
	// Keyserver pins and reaches the key server; nil when every protected
	// group has a static key.
	Keyserver *KeyserverLink `yaml:"keyserver"`
	// Protect maps topics to groups; the first rule whose filter matches a
	// topic wins.
	Protect []ProtectRule `yaml:"protect"`
	// Unmatched says what happens to a topic no rule protects (default pass).
	Unmatched Unmatched `yaml:"unmatched"`
	// StaticKeys maps a group to a key file (smqtt keygen --group): the
	// group then runs without a key server.
	StaticKeys map[string]string `yaml:"static_keys"`
	// DataDir holds the sidecar's state: outbound queue, replay windows,
	// retained registers (default "data/sidecar").
	DataDir string `yaml:"data_dir"`
	// Queue bounds and persists the outbound queue.
	Queue Queue `yaml:"queue"`
	// MetricsListen is the host:port serving /metrics and /healthz; empty
	// turns them off.
	MetricsListen string `yaml:"metrics_listen"`
}

// ListenTLS is the certificate the local ssl:// and wss:// listeners present.
type ListenTLS struct {
	CertFile string `yaml:"cert_file"` // PEM certificate chain
	KeyFile  string `yaml:"key_file"`  // PEM private key
}

// Auth controls which local clients the sidecar's broker accepts.
type Auth struct {
	// Users allowed to connect. Empty allows every client, which Warnings
	// reports for listeners that are reachable from the network.
	Users []User `yaml:"users"`
}

// User is a username and password a local app connects with.
type User struct {
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	// Upstream, when set, is what this user's apps log in upstream with
	// in session mode, instead of the username and password they sent.
	Upstream *Credentials `yaml:"upstream"`
}

// Credentials are an MQTT username and password.
type Credentials struct {
	Username string `yaml:"username"`
	Password string `yaml:"password"`
}

// SidecarMode is how a sidecar relays its apps upstream.
type SidecarMode string

const (
	// ModeSession: one upstream session per app connection, with the app's
	// client id, protocol version, Will and credentials.
	ModeSession SidecarMode = "session"
	// ModeBridge: one shared upstream connection, a local broker and a
	// durable store-and-forward queue.
	ModeBridge SidecarMode = "bridge"
)

// Session is the "sidecar.session:" section.
type Session struct {
	// ClientIDPrefix is put before every app's client id upstream, so that
	// one host's apps cannot take over another's sessions and the broker's
	// ACLs can tell hosts apart.
	ClientIDPrefix string `yaml:"client_id_prefix"`
}

// KeyserverLink is how a sidecar trusts and reaches the key server.
type KeyserverLink struct {
	// The key server's public key, which the sidecar pins.
	PublicKeySource `yaml:",inline"`
	// TopicPrefix starts every key-distribution topic (default "smqtt/v1");
	// it must equal the key server's.
	TopicPrefix string `yaml:"topic_prefix"`
	// MaxStaleness is how long the sidecar keeps sealing without a verified
	// heartbeat from the key server (default 60s).
	MaxStaleness time.Duration `yaml:"max_staleness"`
}

// ProtectRule protects the topics that match any of its filters with the key
// of one group.
type ProtectRule struct {
	Topics []string `yaml:"topics"` // MQTT topic filters
	Group  string   `yaml:"group"`
	// SenderAuth requires the group to be a sender_auth group: the sidecar
	// then accepts only envelopes proved by a member the key server
	// certified, and seals nothing for the group until it may prove its
	// own, whatever the key server says (default false: as the key server
	// says).
	SenderAuth bool `yaml:"sender_auth"`
}

// Unmatched is the policy for topics that no protect rule covers.
type Unmatched string

const (
	UnmatchedPass Unmatched = "pass" // relay in clear, as a plain broker would
	UnmatchedDeny Unmatched = "deny" // refuse publishes and subscriptions
)

// Queue configures the outbound queue of messages waiting for the upstream
// broker.
type Queue struct {
	// MaxMessages bounds the queue (default 100000).
	MaxMessages int `yaml:"max_messages"`
	// Sync is when queued QoS ≥ 1 messages are flushed to disk (default batch).
	Sync SyncPolicy `yaml:"sync"`
	// BatchInterval is the longest a batch waits before its group commit
	// (default 10ms; sync: batch only).
	BatchInterval time.Duration `yaml:"batch_interval"`
}

// SyncPolicy is when the outbound queue is flushed to disk before a QoS ≥ 1
// message is acknowledged to the app.
type SyncPolicy string

const (
	SyncNone   SyncPolicy = "none"   // never wait for the disk: fastest, a crash loses recent messages
	SyncBatch  SyncPolicy = "batch"  // group commit: one flush for all messages of a batch
	SyncAlways SyncPolicy = "always" // one flush per message
)

// Sidecar defaults.
const (
	DefaultListen         = "tcp://127.0.0.1:1883"
	DefaultTopicPrefix    = "smqtt/v1"
	DefaultMaxStaleness   = 60 * time.Second
	DefaultSidecarDataDir = "data/sidecar"
	DefaultMaxMessages    = 100000
	DefaultBatchInterval  = 10 * time.Millisecond
)

func (s *Sidecar) setDefaults(isSet func(string) bool) {
	if !isSet("sidecar.mode") {
		s.Mode = ModeSession
	}
	if !isSet("sidecar.listen") {
		s.Listen = []string{DefaultListen}
	}
	s.Upstream.setDefaults("sidecar.upstream", isSet, defaultSidecarClientID())
	if s.Keyserver != nil {
		if !isSet("sidecar.keyserver.topic_prefix") {
			s.Keyserver.TopicPrefix = DefaultTopicPrefix
		}
		if !isSet("sidecar.keyserver.max_staleness") {
			s.Keyserver.MaxStaleness = DefaultMaxStaleness
		}
	}
	if !isSet("sidecar.unmatched") {
		s.Unmatched = UnmatchedPass
	}
	if !isSet("sidecar.data_dir") {
		s.DataDir = DefaultSidecarDataDir
	}
	if !isSet("sidecar.queue.max_messages") {
		s.Queue.MaxMessages = DefaultMaxMessages
	}
	if !isSet("sidecar.queue.sync") {
		s.Queue.Sync = SyncBatch
	}
	if !isSet("sidecar.queue.batch_interval") {
		s.Queue.BatchInterval = DefaultBatchInterval
	}
}

// defaultSidecarClientID is "smqtt-sidecar-" followed by the host name.
func defaultSidecarClientID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		return "smqtt-sidecar"
	}
	return "smqtt-sidecar-" + host
}

func (s *Sidecar) resolvePaths(baseDir string) {
	s.Identity = resolve(baseDir, s.Identity)
	if s.ListenTLS != nil {
		s.ListenTLS.CertFile = resolve(baseDir, s.ListenTLS.CertFile)
		s.ListenTLS.KeyFile = resolve(baseDir, s.ListenTLS.KeyFile)
	}
	s.Upstream.resolvePaths(baseDir)
	if s.Keyserver != nil {
		s.Keyserver.PublicKeyFile = resolve(baseDir, s.Keyserver.PublicKeyFile)
	}
	for g, p := range s.StaticKeys {
		s.StaticKeys[g] = resolve(baseDir, p)
	}
	s.DataDir = resolve(baseDir, s.DataDir)
}

func (s *Sidecar) validate(v *validator) {
	switch s.Mode {
	case ModeSession, ModeBridge:
	default:
		v.errorf("sidecar.mode", "unknown mode %q (want session or bridge)", s.Mode)
	}
	if p := s.Session.ClientIDPrefix; p != "" {
		if s.Mode == ModeBridge {
			v.errorf("sidecar.session.client_id_prefix", "applies to mode session only (the mode is bridge)")
		} else if err := validClientIDPrefix(p); err != nil {
			v.wrap("sidecar.session.client_id_prefix", err)
		}
	}
	switch {
	case s.Identity != "":
		checkFile(v, "sidecar.identity", s.Identity)
	case s.Keyserver != nil:
		v.errorf("sidecar.identity", "required with a sidecar.keyserver section (create one with smqtt keygen -o FILE)")
	}

	if len(s.Listen) == 0 {
		v.errorf("sidecar.listen", "no listeners; want at least one, such as %s", DefaultListen)
	}
	for i, raw := range s.Listen {
		key := fmt.Sprintf("sidecar.listen[%d]", i)
		l, err := ParseListener(raw)
		if err != nil {
			v.wrap(key, err)
			continue
		}
		if l.TLS() && s.ListenTLS == nil {
			v.errorf(key, "%q needs sidecar.listen_tls", raw)
		}
	}
	checkUnique(v, "sidecar.listen", s.Listen)
	if t := s.ListenTLS; t != nil {
		switch {
		case t.CertFile == "":
			v.errorf("sidecar.listen_tls.cert_file", "required")
		case t.KeyFile == "":
			v.errorf("sidecar.listen_tls.key_file", "required")
		default:
			checkFile(v, "sidecar.listen_tls.cert_file", t.CertFile)
			checkFile(v, "sidecar.listen_tls.key_file", t.KeyFile)
		}
	}

	for i, u := range s.Auth.Users {
		key := fmt.Sprintf("sidecar.auth.users[%d]", i)
		switch {
		case u.Username == "":
			v.errorf(key+".username", "empty")
		case u.Password == "":
			v.errorf(key+".password", "empty (user %q)", u.Username)
		}
		for j := range i {
			if s.Auth.Users[j].Username == u.Username {
				v.errorf(key+".username", "user %q listed twice (also at sidecar.auth.users[%d])", u.Username, j)
			}
		}
		if up := u.Upstream; up != nil {
			switch {
			case s.Mode == ModeBridge:
				v.errorf(key+".upstream", "applies to mode session only (the mode is bridge: every app shares sidecar.upstream's credentials)")
			case up.Password != "" && up.Username == "":
				v.errorf(key+".upstream.password", "set without a username")
			}
		}
	}

	s.Upstream.validate(v, "sidecar.upstream")

	if k := s.Keyserver; k != nil {
		k.PublicKeySource.validate(v, "sidecar.keyserver")
		if err := validTopicPrefix(k.TopicPrefix); err != nil {
			v.wrap("sidecar.keyserver.topic_prefix", err)
		}
		checkPositive(v, "sidecar.keyserver.max_staleness", k.MaxStaleness)
	}

	seen := map[string]string{} // filter -> key where it first appeared
	for i, r := range s.Protect {
		key := fmt.Sprintf("sidecar.protect[%d]", i)
		if len(r.Topics) == 0 {
			v.errorf(key+".topics", "empty; want at least one topic filter")
		}
		for j, f := range r.Topics {
			fkey := fmt.Sprintf("%s.topics[%d]", key, j)
			if err := validPolicyFilter(f); err != nil {
				v.wrap(fkey, err)
			} else if prev, dup := seen[f]; dup {
				v.errorf(fkey, "filter %q already listed at %s", f, prev)
			} else {
				seen[f] = fkey
			}
		}
		if err := validName(r.Group); err != nil {
			v.errorf(key+".group", "%w", err)
			continue
		}
		_, static := s.StaticKeys[r.Group]
		if !static && s.Keyserver == nil {
			v.errorf(key+".group", "group %q has no key: add %s or a sidecar.keyserver section",
				r.Group, joinPath("sidecar.static_keys", r.Group))
		}
		if static && r.SenderAuth {
			v.errorf(key+".sender_auth", "group %q has a static key, and sender authentication needs a key server: only a key server certifies which member signs as which sender; run the group on a key server with keyserver.groups[].sender_auth: true", r.Group)
		}
	}

	switch s.Unmatched {
	case UnmatchedPass, UnmatchedDeny:
	default:
		v.errorf("sidecar.unmatched", "unknown policy %q (want pass or deny)", s.Unmatched)
	}

	for _, g := range slices.Sorted(maps.Keys(s.StaticKeys)) {
		key := joinPath("sidecar.static_keys", g)
		if err := validName(g); err != nil {
			v.errorf(key, "%w", err)
		} else if s.StaticKeys[g] == "" {
			v.errorf(key, "empty path; want the key file of group %q (smqtt keygen --group -o FILE)", g)
		} else {
			checkFile(v, key, s.StaticKeys[g])
		}
	}

	if s.DataDir == "" {
		v.errorf("sidecar.data_dir", "empty; want a directory for the sidecar's state")
	}

	if s.Queue.MaxMessages <= 0 {
		v.errorf("sidecar.queue.max_messages", "must be positive, got %d", s.Queue.MaxMessages)
	}
	switch s.Queue.Sync {
	case SyncNone, SyncBatch, SyncAlways:
	default:
		v.errorf("sidecar.queue.sync", "unknown policy %q (want none, batch or always)", s.Queue.Sync)
	}
	checkPositive(v, "sidecar.queue.batch_interval", s.Queue.BatchInterval)

	if s.MetricsListen != "" {
		checkAddress(v, "sidecar.metrics_listen", s.MetricsListen)
	}
}

// validClientIDPrefix checks a client id prefix: UTF-8 without U+0000 or
// wildcards, short enough to leave room for the app's id.
func validClientIDPrefix(p string) error {
	switch {
	case !utf8.ValidString(p) || strings.ContainsRune(p, 0):
		return fmt.Errorf("%q is not a valid MQTT string", p)
	case strings.ContainsAny(p, "+#/"):
		return fmt.Errorf("%q contains '+', '#' or '/'; brokers' ACL patterns take client ids as topic levels", p)
	case len(p) > 64:
		return fmt.Errorf("%d bytes, longer than 64", len(p))
	}
	return nil
}

// Warnings lists settings that are valid but weaken the sidecar's security,
// one line each, for the operator's log: a network-reachable listener that
// accepts any client, an upstream whose certificate is not checked, key files
// that other users can read.
func (s *Sidecar) Warnings() []string {
	var w []string
	for i, raw := range s.Listen {
		l, err := ParseListener(raw)
		if err == nil && !l.Loopback() && len(s.Auth.Users) == 0 {
			w = append(w, fmt.Sprintf("sidecar.listen[%d]: %s accepts any client from the network without a password; add sidecar.auth.users", i, raw))
		}
	}
	if s.ListenTLS != nil && !slices.ContainsFunc(s.Listen, func(raw string) bool {
		l, err := ParseListener(raw)
		return err == nil && l.TLS()
	}) {
		w = append(w, "sidecar.listen_tls: set, but no ssl:// or wss:// listener uses it")
	}
	if s.Upstream.TLS.InsecureSkipVerify {
		w = append(w, "sidecar.upstream.tls.insecure_skip_verify: the upstream broker's certificate is not checked")
	}
	w = appendModeWarning(w, "sidecar.identity", s.Identity)
	for _, g := range slices.Sorted(maps.Keys(s.StaticKeys)) {
		w = appendModeWarning(w, joinPath("sidecar.static_keys", g), s.StaticKeys[g])
	}
	return w
}

// Listeners returns the parsed Listen URLs, skipping any that do not parse
// (SidecarConfig has rejected those).
func (s *Sidecar) Listeners() []Listener {
	var out []Listener
	for _, raw := range s.Listen {
		if l, err := ParseListener(raw); err == nil {
			out = append(out, l)
		}
	}
	return out
}

// A Listener is one parsed sidecar.listen URL.
type Listener struct {
	Scheme  string // tcp, ssl, ws, wss or unix
	Address string // host:port, or the socket's path for unix
}

// TLS reports whether the listener serves TLS (ssl or wss).
func (l Listener) TLS() bool { return l.Scheme == "ssl" || l.Scheme == "wss" }

// Loopback reports whether only this machine can reach the listener: a unix
// socket, or a TCP address on localhost or a loopback IP.
func (l Listener) Loopback() bool {
	if l.Scheme == "unix" {
		return true
	}
	host, _, err := net.SplitHostPort(l.Address)
	return err == nil && isLoopbackHost(host)
}

// ParseListener parses a listen URL: tcp://host:port, ssl://host:port,
// ws://host:port, wss://host:port or unix:///absolute/path. An empty host
// listens on all interfaces; port 0 picks a free port.
func ParseListener(raw string) (Listener, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return Listener{}, fmt.Errorf("invalid listen URL %q (want tcp://host:port, ssl://, ws://, wss:// or unix:///path)", raw)
	}
	scheme := strings.ToLower(u.Scheme)
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return Listener{}, fmt.Errorf("invalid listen URL %q (want scheme://host:port, nothing more)", raw)
	}
	switch scheme {
	case "unix":
		if u.Host != "" || !path.IsAbs(u.Path) || u.Path == "/" {
			return Listener{}, fmt.Errorf("invalid listen URL %q (want unix:///absolute/path)", raw)
		}
		return Listener{Scheme: scheme, Address: u.Path}, nil
	case "tcp", "ssl", "ws", "wss":
		if u.Path != "" && u.Path != "/" {
			return Listener{}, fmt.Errorf("invalid listen URL %q: unexpected path %q", raw, u.Path)
		}
		if err := validHostPort(u.Host); err != nil {
			return Listener{}, fmt.Errorf("listen URL %q: %w", raw, err)
		}
		return Listener{Scheme: scheme, Address: u.Host}, nil
	}
	return Listener{}, fmt.Errorf("unsupported scheme %q in listen URL %q (want tcp, ssl, ws, wss or unix)", u.Scheme, raw)
}

// appendModeWarning warns when a secret file can be read by other users.
func appendModeWarning(w []string, key, file string) []string {
	if file == "" || runtime.GOOS == "windows" {
		return w
	}
	fi, err := os.Stat(file)
	if err != nil || fi.Mode().Perm()&0o077 == 0 {
		return w
	}
	return append(w, fmt.Sprintf("%s: %s can be read by other users (mode %04o); run chmod 600 on it", key, file, fi.Mode().Perm()))
}
