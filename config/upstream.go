package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Types and checks that both roles share.

// Upstream is the connection to the untrusted MQTT broker.
type Upstream struct {
	// URL of the broker: tcp://, mqtt:// (plain), ssl://, tls://, mqtts://
	// (TLS), ws:// or wss:// (WebSocket, optional path), with host:port.
	URL      string `yaml:"url"`
	ClientID string `yaml:"client_id"` // default "smqtt-sidecar-<hostname>" or "smqtt-keyserver"
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	TLS      TLS    `yaml:"tls"` // only with a TLS scheme
	// Keepalive is the MQTT keep-alive interval (default 30s).
	Keepalive time.Duration `yaml:"keepalive"`
	// ConnectTimeout bounds one connection attempt (default 10s).
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
}

// TLS configures a TLS client connection. Empty fields mean the system's
// roots and no client certificate.
type TLS struct {
	CAFile             string `yaml:"ca_file"`              // PEM roots to trust instead of the system's
	CertFile           string `yaml:"cert_file"`            // PEM client certificate, with KeyFile
	KeyFile            string `yaml:"key_file"`             // PEM private key of CertFile
	InsecureSkipVerify bool   `yaml:"insecure_skip_verify"` // testing only: accepts any server certificate
}

// IsZero reports whether no TLS setting is given.
func (t TLS) IsZero() bool { return t == TLS{} }

const (
	defaultKeepalive      = 30 * time.Second
	defaultConnectTimeout = 10 * time.Second
)

// upstreamSchemes are the URL schemes accepted for the upstream broker, and
// whether each uses TLS.
var upstreamSchemes = map[string]bool{
	"tcp": false, "mqtt": false, "ws": false,
	"ssl": true, "tls": true, "mqtts": true, "wss": true,
}

// UsesTLS reports whether the upstream URL's scheme is a TLS one.
func (u *Upstream) UsesTLS() bool {
	p, err := url.Parse(u.URL)
	return err == nil && upstreamSchemes[strings.ToLower(p.Scheme)]
}

func (u *Upstream) setDefaults(prefix string, isSet func(string) bool, clientID string) {
	if !isSet(prefix + ".client_id") {
		u.ClientID = clientID
	}
	if !isSet(prefix + ".keepalive") {
		u.Keepalive = defaultKeepalive
	}
	if !isSet(prefix + ".connect_timeout") {
		u.ConnectTimeout = defaultConnectTimeout
	}
}

func (u *Upstream) resolvePaths(baseDir string) {
	u.TLS.CAFile = resolve(baseDir, u.TLS.CAFile)
	u.TLS.CertFile = resolve(baseDir, u.TLS.CertFile)
	u.TLS.KeyFile = resolve(baseDir, u.TLS.KeyFile)
}

func (u *Upstream) validate(v *validator, prefix string) {
	key := prefix + ".url"
	if u.URL == "" {
		v.errorf(key, "required (the upstream broker, such as tcp://broker.example:1883)")
		return
	}
	p, err := url.Parse(u.URL)
	if err != nil {
		v.errorf(key, "invalid URL %q (want scheme://host:port, such as tcp://broker.example:1883)", u.URL)
		return
	}
	scheme := strings.ToLower(p.Scheme)
	usesTLS, ok := upstreamSchemes[scheme]
	if !ok {
		v.errorf(key, "unsupported scheme %q in %q (want tcp, mqtt, ssl, tls, mqtts, ws or wss)", p.Scheme, u.URL)
		return
	}
	if p.Host == "" || p.Port() == "" || p.Hostname() == "" {
		v.errorf(key, "%q: want %s://host:port", u.URL, scheme)
		return
	}
	if err := validPort(p.Port()); err != nil || p.Port() == "0" {
		v.errorf(key, "%q: invalid port %q", u.URL, p.Port())
		return
	}
	if p.User != nil {
		v.errorf(key, "%q: put credentials in %s.username and %s.password, not in the URL", p.Redacted(), prefix, prefix)
		return
	}
	if u.ClientID == "" {
		v.errorf(prefix+".client_id", "must not be empty")
	}
	if len(u.ClientID) > 65535 {
		v.errorf(prefix+".client_id", "longer than 65535 bytes")
	}
	if u.Password != "" && u.Username == "" {
		v.errorf(prefix+".password", "set without %s.username (MQTT needs a username with a password)", prefix)
	}
	if !usesTLS && !u.TLS.IsZero() {
		v.errorf(prefix+".tls", "set, but scheme %q does not use TLS (use ssl, tls, mqtts or wss)", scheme)
	}
	u.TLS.validate(v, prefix+".tls")
	checkPositive(v, prefix+".keepalive", u.Keepalive)
	checkPositive(v, prefix+".connect_timeout", u.ConnectTimeout)
}

func (t *TLS) validate(v *validator, prefix string) {
	if t.CAFile != "" {
		checkFile(v, prefix+".ca_file", t.CAFile)
	}
	switch {
	case t.CertFile != "" && t.KeyFile == "":
		v.errorf(prefix+".key_file", "required with %s.cert_file", prefix)
	case t.CertFile == "" && t.KeyFile != "":
		v.errorf(prefix+".cert_file", "required with %s.key_file", prefix)
	case t.CertFile != "":
		checkFile(v, prefix+".cert_file", t.CertFile)
		checkFile(v, prefix+".key_file", t.KeyFile)
	}
}

// PublicKeySource is a public key given inline (public_key, the line that
// `smqtt keygen` prints) or in a file (public_key_file, the FILE.pub that it
// writes). Exactly one of the two is set.
type PublicKeySource struct {
	PublicKey     string `yaml:"public_key"`
	PublicKeyFile string `yaml:"public_key_file"`
}

// Load returns the public key text, reading PublicKeyFile if that is the
// source. Surrounding white space is removed; the text is not parsed here.
func (p PublicKeySource) Load() (string, error) {
	if p.PublicKeyFile == "" {
		return strings.TrimSpace(p.PublicKey), nil
	}
	b, err := os.ReadFile(p.PublicKeyFile)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// validate checks that exactly one source is set and that it yields a
// non-empty single line. It returns the key text, or "" after a problem.
func (p PublicKeySource) validate(v *validator, prefix string) string {
	switch {
	case p.PublicKey == "" && p.PublicKeyFile == "":
		v.errorf(prefix, "want public_key or public_key_file, got neither")
		return ""
	case p.PublicKey != "" && p.PublicKeyFile != "":
		v.errorf(prefix+".public_key_file", "set together with public_key; want exactly one")
		return ""
	}
	key := prefix + ".public_key"
	if p.PublicKeyFile != "" {
		key += "_file"
	}
	text, err := p.Load()
	switch {
	case err != nil:
		v.wrap(key, err)
		return ""
	case text == "":
		v.errorf(key, "empty public key")
		return ""
	case strings.ContainsAny(text, "\r\n"):
		v.errorf(key, "public key spans several lines; want the single line that smqtt keygen prints")
		return ""
	}
	return text
}

// validName checks a group or member name: 1 to 255 bytes of UTF-8 without
// control characters.
func validName(name string) error {
	switch {
	case name == "":
		return errors.New("empty name")
	case len(name) > 255:
		return fmt.Errorf("name %.20q… is %d bytes, want at most 255", name, len(name))
	case strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f || r == 0xfffd }):
		return fmt.Errorf("name %q contains a control character or invalid UTF-8", name)
	}
	return nil
}

// validTopicPrefix checks the prefix of the key-distribution topics.
func validTopicPrefix(prefix string) error {
	if err := ValidTopic(prefix); err != nil {
		return err
	}
	if strings.HasPrefix(prefix, "/") || strings.HasSuffix(prefix, "/") || strings.HasPrefix(prefix, "$") {
		return fmt.Errorf("%w %q: want no leading or trailing '/' and no leading '$'", ErrInvalidTopic, prefix)
	}
	return nil
}

// validPolicyFilter checks a filter of a topic policy (protect rules, group
// topics): a valid filter, and not a shared-subscription one.
func validPolicyFilter(filter string) error {
	if err := ValidFilter(filter); err != nil {
		return err
	}
	if strings.HasPrefix(filter, sharePrefix) {
		return fmt.Errorf("%w %q: a shared-subscription filter cannot name protected topics", ErrInvalidFilter, filter)
	}
	return nil
}

// validHostPort checks a listening address "host:port" (host may be empty
// for all interfaces; port 0 picks a free port).
func validHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("invalid address %q (want host:port)", addr)
	}
	if err := validPort(port); err != nil {
		return fmt.Errorf("invalid address %q: %w", addr, err)
	}
	return nil
}

func validPort(port string) error {
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("invalid port %q (want 0 to 65535)", port)
	}
	return nil
}

// isLoopbackHost reports whether host names only this machine.
func isLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkUnique reports the second occurrence of a value in a list.
func checkUnique(v *validator, prefix string, list []string) {
	for i, s := range list {
		if j := slices.Index(list[:i], s); j >= 0 {
			v.errorf(fmt.Sprintf("%s[%d]", prefix, i), "%q listed twice (also at %s[%d])", s, prefix, j)
			return
		}
	}
}
