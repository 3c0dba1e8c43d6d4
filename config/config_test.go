package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	yamlv3 "gopkg.in/yaml.v3"
)

// fixtureFiles are the files the test configurations name, relative to the
// directory the configuration is parsed against.
var fixtureFiles = map[string]string{
	"keys/sidecar.key":       "sidecar private key",
	"keys/keyserver.key":     "keyserver private key",
	"keys/keyserver.key.pub": "ks-public-key\n",
	"keys/a.key.pub":         "a-public-key\n",
	"keys/b.key.pub":         "b-public-key\n",
	"keys/empty.pub":         "\n",
	"keys/twolines.pub":      "line one\nline two\n",
	"keys/demo.group":        "demo group key",
	"tls/ca.pem":             "ca",
	"tls/cert.pem":           "cert",
	"tls/key.pem":            "key",
}

// fixtureDir returns a new directory holding fixtureFiles (mode 0600) and an
// empty directory "adir".
func fixtureDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range fixtureFiles {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "adir"), 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

// checkError fails the test unless err is a one-line *Error wrapping
// ErrInvalid whose text contains want.
func checkError(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one containing %q", want)
	}
	msg := err.Error()
	if !strings.Contains(msg, want) {
		t.Errorf("error\n  %s\ndoes not contain\n  %s", msg, want)
	}
	if !strings.HasPrefix(msg, "config: ") {
		t.Errorf("error %q does not start with \"config: \"", msg)
	}
	if strings.ContainsAny(msg, "\r\n") {
		t.Errorf("error %q spans several lines", msg)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("errors.Is(%q, ErrInvalid) = false", msg)
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Errorf("error %q is not an *Error", msg)
	}
}

func TestParseRejectsBadYAML(t *testing.T) {
	tests := []struct {
		name, yaml, want string
	}{
		{"syntax error", "sidecar:\n  upstream: [\n", "config: did not find expected node content (line 2)"},
		{"bad indentation", "sidecar:\n  a: b\n c: d\n", "(line 2)"},
		{"unknown section", "sidecars: {}\n", "config: sidecars: unknown key (line 1)"},
		{"unknown nested key", "sidecar:\n  upstream:\n    urll: tcp://b:1883\n", "config: sidecar.upstream.urll: unknown key (line 3)"},
		{"unknown key in flow mapping", "sidecar: {queue: {max_mesages: 1}}\n", "config: sidecar.queue.max_mesages: unknown key (line 1)"},
		{"unknown key in a list item", "keyserver:\n  groups:\n    - name: g\n      nme: h\n", "config: keyserver.groups[0].nme: unknown key (line 4)"},
		{"unknown key in inline public key", "keyserver:\n  members:\n    - {name: a, public_kee: x}\n", "config: keyserver.members[0].public_kee: unknown key (line 3)"},
		{"key defined twice", "sidecar:\n  data_dir: a\n  data_dir: b\n", "config: sidecar.data_dir: key defined twice (first at line 2) (line 3)"},
		{"string for integer", "sidecar:\n  queue:\n    max_messages: lots\n", `config: sidecar.queue.max_messages: want an integer, got "lots" (line 3)`},
		{"integer for duration", "sidecar:\n  queue: {batch_interval: 10}\n", `config: sidecar.queue.batch_interval: want a duration such as 10s, 500ms or 24h, got "10" (line 2)`},
		{"long bad duration quoted whole", "sidecar:\n  upstream:\n    keepalive: thirty seconds\n", `config: sidecar.upstream.keepalive: want a duration such as 10s, 500ms or 24h, got "thirty seconds" (line 3)`},
		{"string for list", "sidecar:\n  listen: tcp://127.0.0.1:1883\n", `config: sidecar.listen: want a list, got "tcp://127.0.0.1:1883" (line 2)`},
		{"mapping for string", "sidecar:\n  identity:\n    file: x\n", "config: sidecar.identity: want a string, got a mapping (line 3)"},
		{"list for mapping", "sidecar:\n  static_keys: [a]\n", "config: sidecar.static_keys: want a mapping, got a list (line 2)"},
		{"bad boolean", "sidecar:\n  upstream:\n    tls: {insecure_skip_verify: maybe}\n", `config: sidecar.upstream.tls.insecure_skip_verify: want true or false, got "maybe" (line 3)`},
		{"bad size", "keyserver:\n  groups:\n    - {name: g, max_message_size: 12XB}\n", `config: keyserver.groups[0].max_message_size: invalid size "12XB"`},
		{"list for size", "keyserver:\n  groups:\n    - name: g\n      max_message_size: [1]\n", "config: keyserver.groups[0].max_message_size: want a size such as 4096, 64KiB or 1MiB, got a list (line 4)"},
		{"list at top level", "- sidecar\n", "config: want a mapping, got a list (line 1)"},
		{"two documents", "sidecar: {}\n---\nkeyserver: {}\n", "config: more than one YAML document; want exactly one"},
		{"unknown anchor", "sidecar: {upstream: *up}\n", "config: unknown anchor 'up' referenced"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml), "")
			checkError(t, err, tt.want)
		})
	}
}

const sidecarBase = "sidecar:\n  upstream: {url: \"tcp://broker.example:1883\"}\n"

func TestSidecarConfigRejects(t *testing.T) {
	const withKS = "  identity: keys/sidecar.key\n  keyserver: {public_key_file: keys/keyserver.key.pub}\n"
	tests := []struct {
		name, yaml, want string
	}{
		{"no sidecar section", "keyserver: {identity: x}\n", "config: sidecar: section missing"},
		{"empty sidecar section", "sidecar:\n", "config: sidecar: section missing"},

		{"identity missing with keyserver", sidecarBase + "  keyserver: {public_key_file: keys/keyserver.key.pub}\n",
			"config: sidecar.identity: required with a sidecar.keyserver section"},
		{"identity file missing", sidecarBase + "  identity: keys/nope.key\n", "config: sidecar.identity: stat "},
		{"identity is a directory", sidecarBase + "  identity: adir\n", "config: sidecar.identity: "},

		{"no listeners", sidecarBase + "  listen: []\n", "config: sidecar.listen: no listeners"},
		{"listener scheme", sidecarBase + "  listen: [\"http://127.0.0.1:1883\"]\n", `config: sidecar.listen[0]: unsupported scheme "http"`},
		{"listener without port", sidecarBase + "  listen: [\"tcp://127.0.0.1\"]\n", `config: sidecar.listen[0]: listen URL "tcp://127.0.0.1": invalid address`},
		{"listener bad port", sidecarBase + "  listen: [\"tcp://127.0.0.1:99999\"]\n", `config: sidecar.listen[0]: listen URL "tcp://127.0.0.1:99999": invalid address "127.0.0.1:99999": invalid port "99999" (want 0 to 65535)`},
		{"listener with path", sidecarBase + "  listen: [\"ws://127.0.0.1:8080/mqtt\"]\n", `config: sidecar.listen[0]: invalid listen URL "ws://127.0.0.1:8080/mqtt": unexpected path`},
		{"relative unix socket", sidecarBase + "  listen: [\"unix://sock\"]\n", "config: sidecar.listen[0]: invalid listen URL \"unix://sock\" (want unix:///absolute/path)"},
		{"ssl listener without certificate", sidecarBase + "  listen: [\"tcp://127.0.0.1:1883\", \"ssl://127.0.0.1:8883\"]\n",
			`config: sidecar.listen[1]: "ssl://127.0.0.1:8883" needs sidecar.listen_tls`},
		{"listener twice", sidecarBase + "  listen: [\"tcp://127.0.0.1:1883\", \"tcp://127.0.0.1:1883\"]\n",
			`config: sidecar.listen[1]: "tcp://127.0.0.1:1883" listed twice (also at sidecar.listen[0])`},
		{"listen_tls without key", sidecarBase + "  listen_tls: {cert_file: tls/cert.pem}\n", "config: sidecar.listen_tls.key_file: required"},
		{"listen_tls without cert", sidecarBase + "  listen_tls: {key_file: tls/key.pem}\n", "config: sidecar.listen_tls.cert_file: required"},
		{"listen_tls cert file missing", sidecarBase + "  listen_tls: {cert_file: tls/nope.pem, key_file: tls/key.pem}\n", "config: sidecar.listen_tls.cert_file: stat "},

		{"user without name", sidecarBase + "  auth: {users: [{password: p}]}\n", "config: sidecar.auth.users[0].username: empty"},
		{"user without password", sidecarBase + "  auth: {users: [{username: app}]}\n", `config: sidecar.auth.users[0].password: empty (user "app")`},
		{"user twice", sidecarBase + "  auth: {users: [{username: app, password: p}, {username: app, password: q}]}\n",
			`config: sidecar.auth.users[1].username: user "app" listed twice`},

		{"upstream url missing", "sidecar:\n  data_dir: d\n", "config: sidecar.upstream.url: required"},
		{"upstream scheme", "sidecar:\n  upstream: {url: \"htp://b:1883\"}\n", `config: sidecar.upstream.url: unsupported scheme "htp" in "htp://b:1883" (want tcp, mqtt, ssl, tls, mqtts, ws or wss)`},
		{"upstream without scheme", "sidecar:\n  upstream: {url: \"127.0.0.1:1883\"}\n", `config: sidecar.upstream.url: invalid URL "127.0.0.1:1883"`},
		{"upstream without port", "sidecar:\n  upstream: {url: \"tcp://broker\"}\n", `config: sidecar.upstream.url: "tcp://broker": want tcp://host:port`},
		{"upstream without host", "sidecar:\n  upstream: {url: \"ssl://:8883\"}\n", `config: sidecar.upstream.url: "ssl://:8883": want ssl://host:port`},
		{"upstream port zero", "sidecar:\n  upstream: {url: \"tcp://b:0\"}\n", `config: sidecar.upstream.url: "tcp://b:0": invalid port "0"`},
		{"upstream credentials in url", "sidecar:\n  upstream: {url: \"tcp://u:secret@b:1883\"}\n",
			"config: sidecar.upstream.url: \"tcp://u:xxxxx@b:1883\": put credentials in sidecar.upstream.username and sidecar.upstream.password, not in the URL"},
		{"upstream empty client id", "sidecar:\n  upstream: {url: \"tcp://b:1883\", client_id: \"\"}\n", "config: sidecar.upstream.client_id: must not be empty"},
		{"upstream password without username", "sidecar:\n  upstream: {url: \"tcp://b:1883\", password: p}\n", "config: sidecar.upstream.password: set without sidecar.upstream.username"},
		{"upstream tls on plain tcp", "sidecar:\n  upstream: {url: \"tcp://b:1883\", tls: {ca_file: tls/ca.pem}}\n", `config: sidecar.upstream.tls: set, but scheme "tcp" does not use TLS`},
		{"upstream tls cert without key", "sidecar:\n  upstream: {url: \"ssl://b:8883\", tls: {cert_file: tls/cert.pem}}\n", "config: sidecar.upstream.tls.key_file: required with sidecar.upstream.tls.cert_file"},
		{"upstream tls key without cert", "sidecar:\n  upstream: {url: \"ssl://b:8883\", tls: {key_file: tls/key.pem}}\n", "config: sidecar.upstream.tls.cert_file: required with sidecar.upstream.tls.key_file"},
		{"upstream tls ca missing", "sidecar:\n  upstream: {url: \"mqtts://b:8883\", tls: {ca_file: tls/nope.pem}}\n", "config: sidecar.upstream.tls.ca_file: stat "},
		{"upstream keepalive zero", "sidecar:\n  upstream: {url: \"tcp://b:1883\", keepalive: 0s}\n", "config: sidecar.upstream.keepalive: must be positive, got 0s"},
		{"upstream connect timeout negative", "sidecar:\n  upstream: {url: \"tcp://b:1883\", connect_timeout: -1s}\n", "config: sidecar.upstream.connect_timeout: must be positive, got -1s"},

		{"keyserver key missing", sidecarBase + "  identity: keys/sidecar.key\n  keyserver: {topic_prefix: smqtt/v1}\n",
			"config: sidecar.keyserver: want public_key or public_key_file, got neither"},
		{"keyserver key twice", sidecarBase + "  identity: keys/sidecar.key\n  keyserver: {public_key: abc, public_key_file: keys/keyserver.key.pub}\n",
			"config: sidecar.keyserver.public_key_file: set together with public_key; want exactly one"},
		{"keyserver key file missing", sidecarBase + "  identity: keys/sidecar.key\n  keyserver: {public_key_file: keys/nope.pub}\n",
			"config: sidecar.keyserver.public_key_file: open "},
		{"keyserver key file empty", sidecarBase + "  identity: keys/sidecar.key\n  keyserver: {public_key_file: keys/empty.pub}\n",
			"config: sidecar.keyserver.public_key_file: empty public key"},
		{"keyserver key file two lines", sidecarBase + "  identity: keys/sidecar.key\n  keyserver: {public_key_file: keys/twolines.pub}\n",
			"config: sidecar.keyserver.public_key_file: public key spans several lines"},
		{"keyserver topic prefix wildcard", sidecarBase + "  identity: keys/sidecar.key\n  keyserver: {public_key: abc, topic_prefix: \"smqtt/#\"}\n",
			`config: sidecar.keyserver.topic_prefix: invalid topic name "smqtt/#": contains a wildcard`},
		{"keyserver topic prefix trailing slash", sidecarBase + "  identity: keys/sidecar.key\n  keyserver: {public_key: abc, topic_prefix: \"smqtt/\"}\n",
			`config: sidecar.keyserver.topic_prefix: invalid topic name "smqtt/": want no leading or trailing '/'`},
		{"keyserver max staleness zero", sidecarBase + "  identity: keys/sidecar.key\n  keyserver: {public_key: abc, max_staleness: 0s}\n",
			"config: sidecar.keyserver.max_staleness: must be positive, got 0s"},

		{"protect rule without topics", sidecarBase + withKS + "  protect: [{group: demo}]\n", "config: sidecar.protect[0].topics: empty; want at least one topic filter"},
		{"protect filter with # inside", sidecarBase + withKS + "  protect: [{topics: [\"a/#/b\"], group: demo}]\n",
			`config: sidecar.protect[0].topics[0]: invalid topic filter "a/#/b": '#' must be the last level`},
		{"protect filter with partial +", sidecarBase + withKS + "  protect: [{topics: [\"a/b\", \"a+/c\"], group: demo}]\n",
			`config: sidecar.protect[0].topics[1]: invalid topic filter "a+/c": '+' must be a whole level`},
		{"protect empty filter", sidecarBase + withKS + "  protect: [{topics: [\"\"], group: demo}]\n",
			`config: sidecar.protect[0].topics[0]: invalid topic filter "": empty`},
		{"protect filter with NUL", sidecarBase + withKS + "  protect: [{topics: [\"a\\0b\"], group: demo}]\n",
			`config: sidecar.protect[0].topics[0]: invalid topic filter "a\x00b": contains NUL`},
		{"protect shared filter", sidecarBase + withKS + "  protect: [{topics: [\"$share/g/a/#\"], group: demo}]\n",
			`config: sidecar.protect[0].topics[0]: invalid topic filter "$share/g/a/#": a shared-subscription filter cannot name protected topics`},
		{"protect filter twice", sidecarBase + withKS + "  protect:\n    - {topics: [\"a/#\"], group: demo}\n    - {topics: [\"a/#\"], group: other}\n",
			`config: sidecar.protect[1].topics[0]: filter "a/#" already listed at sidecar.protect[0].topics[0]`},
		{"protect empty group", sidecarBase + withKS + "  protect: [{topics: [\"a/#\"]}]\n", "config: sidecar.protect[0].group: empty name"},
		{"protect group name too long", sidecarBase + withKS + "  protect: [{topics: [\"a/#\"], group: " + strings.Repeat("g", 256) + "}]\n",
			"config: sidecar.protect[0].group: name \"gggggggggggggggggggg\"… is 256 bytes, want at most 255"},
		{"protect group without key", sidecarBase + "  static_keys: {demo: keys/demo.group}\n  protect:\n    - {topics: [\"a/#\"], group: demo}\n    - {topics: [\"b/#\"], group: x}\n",
			`config: sidecar.protect[1].group: group "x" has no key: add sidecar.static_keys.x or a sidecar.keyserver section (line 6)`},

		{"unmatched unknown", sidecarBase + "  unmatched: drop\n", `config: sidecar.unmatched: unknown policy "drop" (want pass or deny) (line 3)`},
		{"unmatched empty", sidecarBase + "  unmatched: \"\"\n", `config: sidecar.unmatched: unknown policy ""`},

		{"sender_auth on a static key", sidecarBase + "  static_keys: {demo: keys/demo.group}\n  protect:\n    - {topics: [\"a/#\"], group: demo, sender_auth: true}\n",
			`config: sidecar.protect[0].sender_auth: group "demo" has a static key, and sender authentication needs a key server: only a key server certifies which member signs as which sender; run the group on a key server with keyserver.groups[].sender_auth: true (line 5)`},
		{"static key file missing", sidecarBase + "  static_keys: {demo: keys/nope.group}\n", "config: sidecar.static_keys.demo: stat "},
		{"static key path empty", sidecarBase + "  static_keys: {demo: \"\"}\n", `config: sidecar.static_keys.demo: empty path; want the key file of group "demo"`},
		{"static key group name bad", sidecarBase + "  static_keys: {\"bad\\tname\": keys/demo.group}\n",
			`config: sidecar.static_keys["bad\tname"]: name "bad\tname" contains a control character`},

		{"data dir empty", sidecarBase + "  data_dir: \"\"\n", "config: sidecar.data_dir: empty"},
		{"queue max messages zero", sidecarBase + "  queue: {max_messages: 0}\n", "config: sidecar.queue.max_messages: must be positive, got 0"},
		{"queue sync unknown", sidecarBase + "  queue: {sync: sometimes}\n", `config: sidecar.queue.sync: unknown policy "sometimes" (want none, batch or always)`},
		{"queue batch interval zero", sidecarBase + "  queue: {batch_interval: 0s}\n", "config: sidecar.queue.batch_interval: must be positive, got 0s"},
		{"metrics address without port", sidecarBase + "  metrics_listen: localhost\n", `config: sidecar.metrics_listen: invalid address "localhost" (want host:port)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := Parse([]byte(tt.yaml), fixtureDir(t))
			if err == nil {
				_, err = f.SidecarConfig()
			}
			checkError(t, err, tt.want)
		})
	}
}

func TestSidecarMissingFilesAreNotExist(t *testing.T) {
	f, err := Parse([]byte(sidecarBase+"  static_keys: {demo: keys/nope.group}\n"), fixtureDir(t))
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.SidecarConfig()
	if !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, ErrInvalid) {
		t.Fatalf("error %v: want both fs.ErrNotExist and ErrInvalid", err)
	}
	if !strings.Contains(err.Error(), filepath.Join("keys", "nope.group")) {
		t.Errorf("error %q does not name the missing file", err)
	}
}

const keyserverBase = "keyserver:\n  identity: keys/keyserver.key\n  upstream: {url: \"tcp://broker.example:1883\"}\n"

const twoMembers = "  members:\n    - {name: a, public_key_file: keys/a.key.pub}\n    - {name: b, public_key: b-inline-key}\n"

func TestKeyserverConfigRejects(t *testing.T) {
	group := func(fields string) string {
		return keyserverBase + twoMembers + "  groups:\n    - {name: demo, topics: [\"secure/#\"], members: [a, b]" + fields + "}\n"
	}
	tests := []struct {
		name, yaml, want string
	}{
		{"no keyserver section", sidecarBase, "config: keyserver: section missing"},
		{"identity missing", "keyserver:\n  upstream: {url: \"tcp://b:1883\"}\n", "config: keyserver.identity: required"},
		{"identity file missing", "keyserver:\n  identity: keys/nope.key\n  upstream: {url: \"tcp://b:1883\"}\n", "config: keyserver.identity: stat "},
		{"upstream url missing", "keyserver:\n  identity: keys/keyserver.key\n", "config: keyserver.upstream.url: required"},
		{"upstream scheme", "keyserver:\n  identity: keys/keyserver.key\n  upstream: {url: \"udp://b:1883\"}\n", `config: keyserver.upstream.url: unsupported scheme "udp"`},
		{"topic prefix empty", keyserverBase + "  topic_prefix: \"\"\n", `config: keyserver.topic_prefix: invalid topic name "": empty`},
		{"store empty", keyserverBase + "  store: \"\"\n", "config: keyserver.store: empty"},
		{"store a list", keyserverBase + "  store: [a]\n", "config: keyserver.store: want a file path or {etcd: {endpoints: [...]}}"},
		{"etcd no endpoints", keyserverBase + "  store: {etcd: {}}\n", "config: keyserver.store.etcd.endpoints: empty"},
		{"etcd unknown key", keyserverBase + "  store: {etcd: {endpoint: [x]}}\n", "config: keyserver.store.etcd.endpoint: unknown key (line "},
		{"etcd unknown tls key", keyserverBase + "  store: {etcd: {tls: {ca: x}}}\n", "config: keyserver.store.etcd.tls.ca: unknown key (line "},
		{"etcd endpoint not a URL", keyserverBase + "  store: {etcd: {endpoints: [\"127.0.0.1:2379\"]}}\n", `config: keyserver.store.etcd.endpoints[0]: "127.0.0.1:2379" is not an http:// or https:// URL`},
		{"etcd prefix", keyserverBase + "  store: {etcd: {endpoints: [\"http://e:2379\"], prefix: smqtt}}\n", `config: keyserver.store.etcd.prefix: "smqtt": want a prefix that starts and ends with /`},
		{"etcd lease", keyserverBase + "  store: {etcd: {endpoints: [\"http://e:2379\"], lease_ttl: 1500ms}}\n", "config: keyserver.store.etcd.lease_ttl: 1.5s: want whole seconds, at least 2s"},
		{"etcd cert without key", keyserverBase + "  store: {etcd: {endpoints: [\"https://e:2379\"], tls: {cert_file: keys/a.key.pub}}}\n", "config: keyserver.store.etcd.tls: cert_file and key_file go together"},

		{"member without name", keyserverBase + "  members: [{public_key: k}]\n", "config: keyserver.members[0].name: empty name"},
		{"member twice", keyserverBase + "  members: [{name: a, public_key: k1}, {name: a, public_key: k2}]\n",
			`config: keyserver.members[1].name: member "a" defined twice (also at keyserver.members[0])`},
		{"member without key", keyserverBase + "  members: [{name: a}]\n", "config: keyserver.members[0]: want public_key or public_key_file, got neither"},
		{"member with both keys", keyserverBase + "  members: [{name: a, public_key: k, public_key_file: keys/a.key.pub}]\n",
			"config: keyserver.members[0].public_key_file: set together with public_key"},
		{"member key file missing", keyserverBase + "  members: [{name: a, public_key_file: keys/nope.pub}]\n", "config: keyserver.members[0].public_key_file: open "},
		{"members share a key", keyserverBase + "  members: [{name: a, public_key_file: keys/a.key.pub}, {name: b, public_key: a-public-key}]\n",
			`config: keyserver.members[1]: member "b" has the same public key as keyserver.members[0]`},

		{"kem unknown", keyserverBase + "  kem: rsa\n", `config: keyserver.kem: unknown KEM "rsa" (want hybrid or x25519)`},
		{"heartbeat zero", keyserverBase + "  heartbeat: 0s\n", "config: keyserver.heartbeat: must be positive, got 0s"},
		{"leave delay negative", keyserverBase + "  leave_delay: -5s\n", "config: keyserver.leave_delay: must not be negative, got -5s"},
		{"metrics address", keyserverBase + "  metrics_listen: \":http\"\n", `config: keyserver.metrics_listen: invalid address ":http": invalid port "http"`},

		{"group without name", keyserverBase + "  groups: [{topics: [a]}]\n", "config: keyserver.groups[0].name: empty name"},
		{"group twice", keyserverBase + "  groups: [{name: g, topics: [a]}, {name: g, topics: [b]}]\n",
			`config: keyserver.groups[1].name: group "g" defined twice (also at keyserver.groups[0])`},
		{"group without topics", keyserverBase + "  groups: [{name: g}]\n", "config: keyserver.groups[0].topics: empty; want at least one topic filter"},
		{"group bad filter", keyserverBase + "  groups: [{name: g, topics: [\"a/b#\"]}]\n", `config: keyserver.groups[0].topics[0]: invalid topic filter "a/b#": '#' must be a whole level`},
		{"same filter in two groups", keyserverBase + "  groups:\n    - {name: g, topics: [\"secure/#\"]}\n    - {name: h, topics: [\"x\", \"secure/#\"]}\n",
			`config: keyserver.groups[1].topics[1]: filter "secure/#" already claimed at keyserver.groups[0].topics[0] (line 6)`},
		{"scheme unknown", group(", scheme: rotating"), `config: keyserver.groups[0].scheme: unknown scheme "rotating" (want static, update, slotted or lkh)`},
		{"unknown member", keyserverBase + twoMembers + "  groups: [{name: g, topics: [t], members: [a, b, c]}]\n",
			`config: keyserver.groups[0].members[2]: unknown member "c"`},
		{"member listed twice", keyserverBase + twoMembers + "  groups: [{name: g, topics: [t], members: [a, b, a]}]\n",
			`config: keyserver.groups[0].members[2]: "a" listed twice (also at keyserver.groups[0].members[0])`},
		{"rekey batch negative", group(", rekey_batch: -1s"), "config: keyserver.groups[0].rekey_batch: must not be negative, got -1s"},
		{"rekey lead zero", group(", rekey_lead: 0s"), "config: keyserver.groups[0].rekey_lead: must be positive, got 0s"},
		{"send grace zero", group(", send_grace: 0s"), "config: keyserver.groups[0].send_grace: must be positive, got 0s"},
		{"receive retention zero", group(", receive_retention: 0s"), "config: keyserver.groups[0].receive_retention: must be positive, got 0s"},
		{"receive retention below send grace", group(", send_grace: 1h, receive_retention: 30m"),
			"config: keyserver.groups[0].receive_retention: 30m0s is shorter than send_grace 1h0m0s"},
		{"slot zero", group(", slot: 0s"), "config: keyserver.groups[0].slot: must be positive, got 0s"},
		{"slot depth zero", group(", slot_depth: 0"), "config: keyserver.groups[0].slot_depth: 0 out of range (want 1 to 32)"},
		{"slot depth too deep", group(", slot_depth: 33"), "config: keyserver.groups[0].slot_depth: 33 out of range (want 1 to 32)"},
		{"member interval zero", group(", member_interval: 0s"), "config: keyserver.groups[0].member_interval: must be positive, got 0s"},
		{"skew slots negative", group(", skew_slots: -1"), "config: keyserver.groups[0].skew_slots: -1 out of range (want 0 to 255)"},
		{"skew slots too many", group(", skew_slots: 256"), "config: keyserver.groups[0].skew_slots: 256 out of range (want 0 to 255)"},
		{"slot below a millisecond", group(", slot: 1500us"), "config: keyserver.groups[0].slot: 1.5ms is not a whole number of milliseconds"},
		{"degree one", group(", degree: 1"), "config: keyserver.groups[0].degree: 1 too small (want at least 2)"},
		{"max message size too small", group(", max_message_size: 512"), "config: keyserver.groups[0].max_message_size: 512 out of range"},
		{"max message size too large", group(", max_message_size: 1GiB"), "config: keyserver.groups[0].max_message_size: 1GiB out of range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := Parse([]byte(tt.yaml), fixtureDir(t))
			if err == nil {
				_, err = f.KeyserverConfig()
			}
			checkError(t, err, tt.want)
		})
	}
}

func TestSidecarDefaults(t *testing.T) {
	dir := fixtureDir(t)
	f, err := Parse([]byte(sidecarBase+"  identity: keys/sidecar.key\n  keyserver: {public_key: ks}\n"), dir)
	if err != nil {
		t.Fatal(err)
	}
	s, err := f.SidecarConfig()
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	checks := []struct {
		name      string
		got, want any
	}{
		{"listen", s.Listen, []string{"tcp://127.0.0.1:1883"}},
		{"upstream.client_id", s.Upstream.ClientID, "smqtt-sidecar-" + host},
		{"upstream.keepalive", s.Upstream.Keepalive, 30 * time.Second},
		{"upstream.connect_timeout", s.Upstream.ConnectTimeout, 10 * time.Second},
		{"keyserver.topic_prefix", s.Keyserver.TopicPrefix, "smqtt/v1"},
		{"keyserver.max_staleness", s.Keyserver.MaxStaleness, 60 * time.Second},
		{"unmatched", s.Unmatched, UnmatchedPass},
		{"data_dir", s.DataDir, filepath.Join(dir, "data/sidecar")},
		{"queue.max_messages", s.Queue.MaxMessages, 100000},
		{"queue.sync", s.Queue.Sync, SyncBatch},
		{"queue.batch_interval", s.Queue.BatchInterval, 10 * time.Millisecond},
		{"listen_tls", s.ListenTLS, (*ListenTLS)(nil)},
		{"metrics_listen", s.MetricsListen, ""},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %#v, want %#v", c.name, c.got, c.want)
		}
	}
	if f.Keyserver != nil {
		t.Errorf("keyserver section = %+v, want nil when the file has none", f.Keyserver)
	}
}

func TestSidecarKeyserverSectionAbsentStaysNil(t *testing.T) {
	f, err := Parse([]byte(sidecarBase+"  static_keys: {demo: keys/demo.group}\n  protect: [{topics: [\"a/#\"], group: demo}]\n"), fixtureDir(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err := f.SidecarConfig()
	if err != nil {
		t.Fatal(err)
	}
	if s.Keyserver != nil {
		t.Errorf("Keyserver = %+v, want nil", s.Keyserver)
	}
}

func TestKeyserverEtcdStore(t *testing.T) {
	dir := fixtureDir(t)
	f, err := Parse([]byte(keyserverBase+"  store:\n    etcd: {endpoints: [\"http://e1:2379\", \"http://e2:2379\"]}\n"), dir)
	if err != nil {
		t.Fatal(err)
	}
	k, err := f.KeyserverConfig()
	if err != nil {
		t.Fatal(err)
	}
	want := EtcdStore{Endpoints: []string{"http://e1:2379", "http://e2:2379"}, Prefix: "/smqtt/", DialTimeout: 5 * time.Second, LeaseTTL: 3 * time.Second, Timeout: 5 * time.Second}
	if k.Store != "" || k.Etcd == nil || !reflect.DeepEqual(*k.Etcd, want) {
		t.Errorf("store %q, etcd %+v, want %+v", k.Store, k.Etcd, want)
	}
	f, _ = Parse([]byte(keyserverBase), dir)
	if k, err := f.KeyserverConfig(); err != nil || k.Etcd != nil || k.Store != filepath.Join(dir, DefaultStore) {
		t.Errorf("default store %q, etcd %v, %v", k.Store, k.Etcd, err)
	}
}

func TestKeyserverDefaults(t *testing.T) {
	dir := fixtureDir(t)
	f, err := Parse([]byte(keyserverBase+"  groups: [{name: g, topics: [t]}]\n"), dir)
	if err != nil {
		t.Fatal(err)
	}
	k, err := f.KeyserverConfig()
	if err != nil {
		t.Fatal(err)
	}
	want := Group{
		Name: "g", Topics: []string{"t"}, Scheme: SchemeUpdate,
		RekeyBatch: time.Second, RekeyLead: 2 * time.Second, SendGrace: 30 * time.Second,
		ReceiveRetention: 24 * time.Hour, Slot: 10 * time.Second, SlotDepth: 16,
		MemberInterval: time.Hour, SkewSlots: 1, Degree: 4, MaxMessageSize: 256 << 10,
	}
	if !reflect.DeepEqual(k.Groups[0], want) {
		t.Errorf("group = %+v\nwant    %+v", k.Groups[0], want)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"upstream.client_id", k.Upstream.ClientID, "smqtt-keyserver"},
		{"upstream.keepalive", k.Upstream.Keepalive, 30 * time.Second},
		{"topic_prefix", k.TopicPrefix, "smqtt/v1"},
		{"store", k.Store, filepath.Join(dir, "data/keyserver.db")},
		{"kem", k.KEM, KEMHybrid},
		{"heartbeat", k.Heartbeat, 10 * time.Second},
		{"leave_delay", k.LeaveDelay, 30 * time.Second},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %#v, want %#v", c.name, c.got, c.want)
		}
	}
}

func TestExplicitZeroIsKeptWhereAllowed(t *testing.T) {
	f, err := Parse([]byte(keyserverBase+"  leave_delay: 0s\n  groups:\n    - {name: g, topics: [t], rekey_batch: 0s, skew_slots: 0, sender_auth: true}\n"), fixtureDir(t))
	if err != nil {
		t.Fatal(err)
	}
	k, err := f.KeyserverConfig()
	if err != nil {
		t.Fatal(err)
	}
	g := k.Groups[0]
	if g.RekeyBatch != 0 || g.SkewSlots != 0 || k.LeaveDelay != 0 || !g.SenderAuth {
		t.Errorf("rekey_batch=%v skew_slots=%d leave_delay=%v sender_auth=%v, want 0s 0 0s true", g.RekeyBatch, g.SkewSlots, k.LeaveDelay, g.SenderAuth)
	}
}

func TestNullValueTakesDefault(t *testing.T) {
	f, err := Parse([]byte(sidecarBase+"  listen:\n  unmatched: ~\n  queue:\n    sync:\n"), fixtureDir(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err := f.SidecarConfig()
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Listen) != 1 || s.Unmatched != UnmatchedPass || s.Queue.Sync != SyncBatch {
		t.Errorf("listen=%v unmatched=%q sync=%q, want the defaults", s.Listen, s.Unmatched, s.Queue.Sync)
	}
}

func TestKeysSetThroughAliasesAndMergesCountAsSet(t *testing.T) {
	yaml := `
sidecar:
  upstream: &up
    url: tcp://broker.example:1883
    client_id: shared-id
    keepalive: 5s
keyserver:
  identity: keys/keyserver.key
  upstream: *up
  groups:
    - &base {name: g, topics: [t], skew_slots: 0, degree: 8}
    - <<: *base
      name: h
      topics: [u]
`
	f, err := Parse([]byte(yaml), fixtureDir(t))
	if err != nil {
		t.Fatal(err)
	}
	k, err := f.KeyserverConfig()
	if err != nil {
		t.Fatal(err)
	}
	if k.Upstream.ClientID != "shared-id" || k.Upstream.Keepalive != 5*time.Second {
		t.Errorf("aliased upstream: client_id=%q keepalive=%v, want shared-id 5s", k.Upstream.ClientID, k.Upstream.Keepalive)
	}
	if g := k.Groups[1]; g.Name != "h" || g.SkewSlots != 0 || g.Degree != 8 {
		t.Errorf("merged group: name=%q skew_slots=%d degree=%d, want h 0 8", g.Name, g.SkewSlots, g.Degree)
	}
}

func TestRelativePathsResolveAgainstConfigDir(t *testing.T) {
	dir := fixtureDir(t)
	abs := filepath.Join(dir, "keys", "demo.group")
	yaml := "sidecar:\n" +
		"  identity: keys/sidecar.key\n" +
		"  upstream: {url: \"ssl://b:8883\", tls: {ca_file: tls/ca.pem, cert_file: tls/cert.pem, key_file: tls/key.pem}}\n" +
		"  keyserver: {public_key_file: keys/keyserver.key.pub}\n" +
		"  listen_tls: {cert_file: tls/cert.pem, key_file: tls/key.pem}\n" +
		"  static_keys: {demo: " + abs + "}\n" +
		"  data_dir: state\n" +
		"keyserver:\n  identity: keys/keyserver.key\n  upstream: {url: \"tcp://b:1883\"}\n  store: ks.db\n" +
		"  members: [{name: a, public_key_file: keys/a.key.pub}]\n"
	path := filepath.Join(dir, "smqtt.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	// Load from another working directory: the paths must not depend on it.
	t.Chdir(t.TempDir())
	f, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := f.SidecarConfig()
	if err != nil {
		t.Fatal(err)
	}
	k, err := f.KeyserverConfig()
	if err != nil {
		t.Fatal(err)
	}
	in := func(p string) string { return filepath.Join(dir, p) }
	checks := []struct{ name, got, want string }{
		{"sidecar.identity", s.Identity, in("keys/sidecar.key")},
		{"sidecar.upstream.tls.ca_file", s.Upstream.TLS.CAFile, in("tls/ca.pem")},
		{"sidecar.upstream.tls.cert_file", s.Upstream.TLS.CertFile, in("tls/cert.pem")},
		{"sidecar.upstream.tls.key_file", s.Upstream.TLS.KeyFile, in("tls/key.pem")},
		{"sidecar.keyserver.public_key_file", s.Keyserver.PublicKeyFile, in("keys/keyserver.key.pub")},
		{"sidecar.listen_tls.cert_file", s.ListenTLS.CertFile, in("tls/cert.pem")},
		{"sidecar.listen_tls.key_file", s.ListenTLS.KeyFile, in("tls/key.pem")},
		{"sidecar.static_keys.demo (absolute)", s.StaticKeys["demo"], abs},
		{"sidecar.data_dir", s.DataDir, in("state")},
		{"keyserver.identity", k.Identity, in("keys/keyserver.key")},
		{"keyserver.store", k.Store, in("ks.db")},
		{"keyserver.members[0].public_key_file", k.Members[0].PublicKeyFile, in("keys/a.key.pub")},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.name, c.got, c.want)
		}
	}
	pk, err := s.Keyserver.Load()
	if err != nil || pk != "ks-public-key" {
		t.Errorf("keyserver public key = %q, %v; want %q", pk, err, "ks-public-key")
	}
}

func TestParseWithoutBaseDirKeepsRelativePaths(t *testing.T) {
	f, err := Parse([]byte(sidecarBase+"  identity: keys/sidecar.key\n"), "")
	if err != nil {
		t.Fatal(err)
	}
	if f.Sidecar.Identity != "keys/sidecar.key" || f.Sidecar.DataDir != "data/sidecar" {
		t.Errorf("identity=%q data_dir=%q, want them unchanged", f.Sidecar.Identity, f.Sidecar.DataDir)
	}
}

func TestLoadReportsUnreadableFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "missing.yaml"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load(missing) = %v, want fs.ErrNotExist", err)
	}
	if errors.Is(err, ErrInvalid) {
		t.Errorf("a missing file is reported as ErrInvalid: %v", err)
	}
	if !strings.HasPrefix(err.Error(), "config: ") {
		t.Errorf("error %q does not start with \"config: \"", err)
	}
}

func TestEmptyFileHasNoSections(t *testing.T) {
	for _, doc := range []string{"", "# only a comment\n", "---\n"} {
		f, err := Parse([]byte(doc), "")
		if err != nil {
			t.Fatalf("Parse(%q): %v", doc, err)
		}
		if f.Sidecar != nil || f.Keyserver != nil {
			t.Errorf("Parse(%q) = %+v, want no sections", doc, f)
		}
		_, err = f.SidecarConfig()
		checkError(t, err, "config: sidecar: section missing")
	}
}

func TestValidationErrorCarriesLineAndPath(t *testing.T) {
	yaml := "sidecar:\n  upstream:\n    url: tcp://b:1883\n  queue:\n    sync: never\n"
	f, err := Parse([]byte(yaml), "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.SidecarConfig()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v is not an *Error", err)
	}
	if e.Path != "sidecar.queue.sync" || e.Line != 5 {
		t.Errorf("Path=%q Line=%d, want sidecar.queue.sync 5", e.Path, e.Line)
	}
}

func TestSidecarWarnings(t *testing.T) {
	dir := fixtureDir(t)
	if err := os.WriteFile(filepath.Join(dir, "keys/open.group"), []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		yaml string
		want []string // substrings, one per warning, in order
	}{
		{"loopback listeners without users", sidecarBase + "  listen: [\"tcp://127.0.0.1:1\", \"ws://localhost:2\", \"tcp://[::1]:3\", \"unix:///run/s.sock\"]\n", nil},
		{"network listener without users", sidecarBase + "  listen: [\"tcp://127.0.0.1:1\", \"tcp://0.0.0.0:1883\", \"ws://:8080\"]\n",
			[]string{"sidecar.listen[1]: tcp://0.0.0.0:1883 accepts any client", "sidecar.listen[2]: ws://:8080 accepts any client"}},
		{"network listener with users", sidecarBase + "  listen: [\"tcp://0.0.0.0:1883\"]\n  auth: {users: [{username: app, password: pw}]}\n", nil},
		{"unused listen_tls", sidecarBase + "  listen_tls: {cert_file: tls/cert.pem, key_file: tls/key.pem}\n", []string{"sidecar.listen_tls: set, but no ssl:// or wss:// listener"}},
		{"insecure upstream", "sidecar:\n  upstream: {url: \"ssl://b:8883\", tls: {insecure_skip_verify: true}}\n", []string{"sidecar.upstream.tls.insecure_skip_verify"}},
		{"readable key file", sidecarBase + "  static_keys: {open: keys/open.group, demo: keys/demo.group}\n", []string{"sidecar.static_keys.open: " + filepath.Join(dir, "keys/open.group") + " can be read by other users (mode 0644)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := Parse([]byte(tt.yaml), dir)
			if err != nil {
				t.Fatal(err)
			}
			s, err := f.SidecarConfig()
			if err != nil {
				t.Fatal(err)
			}
			got := s.Warnings()
			if len(got) != len(tt.want) {
				t.Fatalf("Warnings() = %q, want %d warnings", got, len(tt.want))
			}
			for i := range got {
				if !strings.Contains(got[i], tt.want[i]) {
					t.Errorf("warning %d = %q, want it to contain %q", i, got[i], tt.want[i])
				}
			}
		})
	}
}

func TestKeyserverWarnings(t *testing.T) {
	f, err := Parse([]byte("keyserver:\n  identity: keys/keyserver.key\n  upstream: {url: \"wss://b:443\", tls: {insecure_skip_verify: true}}\n  heartbeat: 45s\n  groups: [{name: lonely, topics: [t]}]\n"), fixtureDir(t))
	if err != nil {
		t.Fatal(err)
	}
	k, err := f.KeyserverConfig()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"keyserver.upstream.tls.insecure_skip_verify", "keyserver.heartbeat: 45s", `keyserver.groups[0].members: group "lonely" has no members`}
	got := k.Warnings()
	if len(got) != len(want) {
		t.Fatalf("Warnings() = %q, want %d", got, len(want))
	}
	for i := range want {
		if !strings.Contains(got[i], want[i]) {
			t.Errorf("warning %d = %q, want it to contain %q", i, got[i], want[i])
		}
	}
}

func TestParseListener(t *testing.T) {
	tests := []struct {
		in       string
		want     Listener
		tls      bool
		loopback bool
	}{
		{"tcp://127.0.0.1:1883", Listener{"tcp", "127.0.0.1:1883"}, false, true},
		{"TCP://localhost:0", Listener{"tcp", "localhost:0"}, false, true},
		{"ssl://0.0.0.0:8883", Listener{"ssl", "0.0.0.0:8883"}, true, false},
		{"ws://:8080", Listener{"ws", ":8080"}, false, false},
		{"wss://[::1]:8443/", Listener{"wss", "[::1]:8443"}, true, true},
		{"unix:///run/smqtt.sock", Listener{"unix", "/run/smqtt.sock"}, false, true},
	}
	for _, tt := range tests {
		got, err := ParseListener(tt.in)
		if err != nil {
			t.Errorf("ParseListener(%q): %v", tt.in, err)
			continue
		}
		if got != tt.want || got.TLS() != tt.tls || got.Loopback() != tt.loopback {
			t.Errorf("ParseListener(%q) = %+v tls=%v loopback=%v, want %+v tls=%v loopback=%v",
				tt.in, got, got.TLS(), got.Loopback(), tt.want, tt.tls, tt.loopback)
		}
	}
	for _, bad := range []string{"", "127.0.0.1:1883", "tcp://", "tcp://h", "tcp://u@h:1", "tcp://h:1?x=y", "mqtt://h:1", "unix:///", "unix:rel"} {
		if _, err := ParseListener(bad); err == nil {
			t.Errorf("ParseListener(%q) succeeded, want an error", bad)
		}
	}
}

func TestUpstreamUsesTLS(t *testing.T) {
	for url, want := range map[string]bool{
		"tcp://b:1": false, "mqtt://b:1": false, "ws://b:1": false,
		"ssl://b:1": true, "tls://b:1": true, "mqtts://b:1": true, "WSS://b:1": true,
	} {
		if got := (&Upstream{URL: url}).UsesTLS(); got != want {
			t.Errorf("UsesTLS(%q) = %v, want %v", url, got, want)
		}
	}
}

func TestParseByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
	}{
		{"0", 0}, {"1000", 1000}, {"256KiB", 256 << 10}, {"256 kib", 256 << 10}, {"1MiB", 1 << 20},
		{"2GiB", 2 << 30}, {"1KB", 1000}, {"3MB", 3e6}, {"1GB", 1e9}, {"512B", 512}, {" 7b ", 7},
	}
	for _, tt := range tests {
		got, err := ParseByteSize(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "KiB", "1.5MiB", "-1", "+1", "1TB", "12XB", "9999999999GiB", "0x10"} {
		if got, err := ParseByteSize(bad); err == nil {
			t.Errorf("ParseByteSize(%q) = %d, want an error", bad, got)
		}
	}
	for size, want := range map[ByteSize]string{0: "0", 1000: "1000", 256 << 10: "256KiB", 3 << 20: "3MiB", 1 << 30: "1GiB", 1536: "1536"} {
		if got := size.String(); got != want {
			t.Errorf("ByteSize(%d).String() = %q, want %q", int64(size), got, want)
		}
		if back, err := ParseByteSize(size.String()); err != nil || back != size {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d", size.String(), back, err, size)
		}
	}
}

func TestAliasBombIsRefused(t *testing.T) {
	var b strings.Builder
	b.WriteString("l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n")
	for i := 1; i <= 6; i++ {
		fmt.Fprintf(&b, "l%d: &l%d [", i, i)
		for j := range 10 {
			if j > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "*l%d", i-1)
		}
		b.WriteString("]\n")
	}
	_, err := Parse([]byte(b.String()), "")
	checkError(t, err, "config: document expands to more than 100000 nodes")
}

func TestMergeOfSeveralMappingsCountsAsSet(t *testing.T) {
	yaml := `
keyserver:
  groups:
    - &g1 {name: g, topics: [t], degree: 8}
    - &g2 {name: h, topics: [u], skew_slots: 0}
    - <<: [*g1, *g2]
      name: i
      topics: [v]
`
	f, err := Parse([]byte(yaml), "")
	if err != nil {
		t.Fatal(err)
	}
	if g := f.Keyserver.Groups[2]; g.Name != "i" || g.Degree != 8 || g.SkewSlots != 0 || g.Slot != DefaultSlot {
		t.Errorf("merged group: name=%q degree=%d skew_slots=%d slot=%v, want i 8 0 %v", g.Name, g.Degree, g.SkewSlots, g.Slot, DefaultSlot)
	}
}

func TestSidecarListeners(t *testing.T) {
	s := &Sidecar{Listen: []string{"tcp://127.0.0.1:1883", "bogus://x", "unix:///run/s.sock"}}
	want := []Listener{{"tcp", "127.0.0.1:1883"}, {"unix", "/run/s.sock"}}
	if got := s.Listeners(); !reflect.DeepEqual(got, want) {
		t.Errorf("Listeners() = %+v, want %+v", got, want)
	}
}

func TestErrorIsOneLine(t *testing.T) {
	e := &Error{Path: "sidecar.x", Line: 3, Err: errors.New("first\nsecond\r\nthird")}
	if got, want := e.Error(), "config: sidecar.x: first second third (line 3)"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestByteSizeMarshalsAsString(t *testing.T) {
	out, err := yamlv3.Marshal(map[string]ByteSize{"max_message_size": 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(out), "max_message_size: 256KiB\n"; got != want {
		t.Errorf("Marshal = %q, want %q", got, want)
	}
}
