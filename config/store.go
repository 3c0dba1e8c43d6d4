package config

import (
	"fmt"
	"net/url"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// StoreSpec is keyserver.store: either the path of a bbolt file (one key
// server), or a mapping {etcd: {...}} (several key servers sharing the
// state in etcd, one of them leading).
type StoreSpec struct {
	Path string
	Etcd *EtcdStore
}

// EtcdStore is keyserver.store.etcd.
type EtcdStore struct {
	// Endpoints are the etcd client URLs (http:// or https://).
	Endpoints []string `yaml:"endpoints"`
	// Prefix starts every key the key servers write (default "/smqtt/");
	// the key servers of one deployment share it, and nothing else may.
	Prefix string `yaml:"prefix"`
	// DialTimeout bounds connecting to etcd (default 5s).
	DialTimeout time.Duration `yaml:"dial_timeout"`
	// LeaseTTL is the leader's lease: a leader that stops renewing it is
	// replaced this long after (default 3s; whole seconds, at least 2s).
	LeaseTTL time.Duration `yaml:"lease_ttl"`
	// Timeout bounds one commit; a leader whose commit takes longer steps
	// down (default 5s).
	Timeout time.Duration `yaml:"timeout"`
	// TLS are the client's TLS settings (with https:// endpoints).
	TLS EtcdTLS `yaml:"tls"`
}

// EtcdTLS is keyserver.store.etcd.tls.
type EtcdTLS struct {
	CAFile   string `yaml:"ca_file"`   // CA bundle checking etcd's certificate (default: the system's)
	CertFile string `yaml:"cert_file"` // client certificate, with key_file
	KeyFile  string `yaml:"key_file"`
}

// Defaults of keyserver.store.etcd.
const (
	DefaultEtcdPrefix      = "/smqtt/"
	DefaultEtcdDialTimeout = 5 * time.Second
	DefaultEtcdLeaseTTL    = 3 * time.Second
	DefaultEtcdTimeout     = 5 * time.Second
)

var etcdKeys = map[string][]string{
	"":     {"etcd"},
	"etcd": {"endpoints", "prefix", "dial_timeout", "lease_ttl", "timeout", "tls"},
	"tls":  {"ca_file", "cert_file", "key_file"},
}

// UnmarshalYAML accepts a path or {etcd: {...}}; unknown keys are errors as
// everywhere else.
func (s *StoreSpec) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		s.Path, s.Etcd = n.Value, nil
		return nil
	case yaml.MappingNode:
		if err := checkKeys(n, ""); err != nil {
			return err
		}
		var w struct {
			Etcd *EtcdStore `yaml:"etcd"`
		}
		if err := n.Decode(&w); err != nil {
			return err
		}
		if w.Etcd == nil {
			w.Etcd = &EtcdStore{}
		}
		s.Path, s.Etcd = "", w.Etcd
		return nil
	}
	return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d column %d: want a file path or {etcd: {endpoints: [...]}}, got %s",
		n.Line, n.Column, describeNode(n))}}
}

// checkKeys reports a key of mapping n (at level) that etcdKeys does not
// know, as the strict decoder reports one.
func checkKeys(n *yaml.Node, level string) error {
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		known := false
		for _, name := range etcdKeys[level] {
			known = known || k.Value == name
		}
		if !known {
			return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: field %s not found in type config.EtcdStore", k.Line, k.Value)}}
		}
		if _, nested := etcdKeys[k.Value]; nested && v.Kind == yaml.MappingNode {
			if err := checkKeys(v, k.Value); err != nil {
				return err
			}
		}
	}
	return nil
}

func (e *EtcdStore) validate(v *validator, p string) {
	if len(e.Endpoints) == 0 {
		v.errorf(p+".endpoints", "empty; want the etcd client URLs, such as http://127.0.0.1:2379")
	}
	for i, ep := range e.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			v.errorf(fmt.Sprintf("%s.endpoints[%d]", p, i), "%q is not an http:// or https:// URL", ep)
		}
	}
	if !strings.HasPrefix(e.Prefix, "/") || !strings.HasSuffix(e.Prefix, "/") {
		v.errorf(p+".prefix", "%q: want a prefix that starts and ends with /, such as /smqtt/", e.Prefix)
	}
	checkPositive(v, p+".dial_timeout", e.DialTimeout)
	if e.LeaseTTL < 2*time.Second || e.LeaseTTL%time.Second != 0 {
		v.errorf(p+".lease_ttl", "%v: want whole seconds, at least 2s", e.LeaseTTL)
	}
	checkPositive(v, p+".timeout", e.Timeout)
	if e.TLS.CAFile != "" {
		checkFile(v, p+".tls.ca_file", e.TLS.CAFile)
	}
	if (e.TLS.CertFile == "") != (e.TLS.KeyFile == "") {
		v.errorf(p+".tls", "cert_file and key_file go together")
	}
	if e.TLS.CertFile != "" {
		checkFile(v, p+".tls.cert_file", e.TLS.CertFile)
		checkFile(v, p+".tls.key_file", e.TLS.KeyFile)
	}
}
