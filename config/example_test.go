package config

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

const examplePath = "../config.example.yaml"

// exampleFiles are the files config.example.yaml names, as smqtt keygen
// would create them.
var exampleFiles = []string{
	"keys/sidecar-a.key",
	"keys/keyserver.key",
	"keys/keyserver.key.pub",
	"keys/sidecar-a.key.pub",
	"keys/sidecar-b.key.pub",
}

// loadExample copies config.example.yaml into a new directory next to the
// files it names, and loads it from there.
func loadExample(t *testing.T) (*File, string) {
	t.Helper()
	data, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for i, name := range exampleFiles {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		content := "secret"
		if strings.HasSuffix(name, ".pub") {
			content = "public-key-" + string(rune('a'+i)) + "\n"
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(dir, "smqtt.yaml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return f, dir
}

func TestExampleConfigIsValidForBothRoles(t *testing.T) {
	f, dir := loadExample(t)
	s, err := f.SidecarConfig()
	if err != nil {
		t.Fatalf("sidecar section: %v", err)
	}
	k, err := f.KeyserverConfig()
	if err != nil {
		t.Fatalf("keyserver section: %v", err)
	}
	if w := s.Warnings(); len(w) != 0 {
		t.Errorf("sidecar warnings: %q", w)
	}
	if w := k.Warnings(); len(w) != 0 {
		t.Errorf("keyserver warnings: %q", w)
	}

	// The values the interface contract shows.
	checks := []struct {
		name      string
		got, want any
	}{
		{"sidecar.identity", s.Identity, filepath.Join(dir, "keys/sidecar-a.key")},
		{"sidecar.listen", s.Listen, []string{"tcp://127.0.0.1:1883"}},
		{"sidecar.upstream.url", s.Upstream.URL, "tcp://127.0.0.1:18830"},
		{"sidecar.upstream.client_id", s.Upstream.ClientID, "sidecar-a"},
		{"sidecar.keyserver.public_key_file", s.Keyserver.PublicKeyFile, filepath.Join(dir, "keys/keyserver.key.pub")},
		{"sidecar.keyserver.topic_prefix", s.Keyserver.TopicPrefix, "smqtt/v1"},
		{"sidecar.keyserver.max_staleness", s.Keyserver.MaxStaleness, 60 * time.Second},
		{"sidecar.protect", s.Protect, []ProtectRule{{Topics: []string{"secure/#"}, Group: "demo"}}},
		{"sidecar.unmatched", s.Unmatched, UnmatchedPass},
		{"sidecar.static_keys", len(s.StaticKeys), 0},
		{"sidecar.data_dir", s.DataDir, filepath.Join(dir, "data/sidecar-a")},
		{"sidecar.queue", s.Queue, Queue{MaxMessages: 100000, Sync: SyncBatch, BatchInterval: 10 * time.Millisecond}},
		{"sidecar.metrics_listen", s.MetricsListen, ""},
		{"keyserver.identity", k.Identity, filepath.Join(dir, "keys/keyserver.key")},
		{"keyserver.upstream.url", k.Upstream.URL, "tcp://127.0.0.1:18830"},
		{"keyserver.upstream.client_id", k.Upstream.ClientID, "keyserver"},
		{"keyserver.topic_prefix", k.TopicPrefix, "smqtt/v1"},
		{"keyserver.store", k.Store, filepath.Join(dir, "data/keyserver.db")},
		{"keyserver.members", len(k.Members), 2},
		{"keyserver.kem", k.KEM, KEMHybrid},
		{"keyserver.heartbeat", k.Heartbeat, 10 * time.Second},
		{"keyserver.groups[0]", k.Groups[0], Group{
			Name: "demo", Topics: []string{"secure/#"}, Scheme: SchemeUpdate, Members: []string{"sidecar-a", "sidecar-b"},
			RekeyBatch: time.Second, RekeyLead: 2 * time.Second, SendGrace: 30 * time.Second, ReceiveRetention: 24 * time.Hour,
			Slot: 10 * time.Second, SlotDepth: 16, MemberInterval: time.Hour, SkewSlots: 1, Degree: 4, MaxMessageSize: 256 << 10,
		}},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %#v, want %#v", c.name, c.got, c.want)
		}
	}
}

func TestExampleConfigNeedsTheFilesItNames(t *testing.T) {
	f, dir := loadExample(t)
	if err := os.Remove(filepath.Join(dir, "keys/sidecar-b.key.pub")); err != nil {
		t.Fatal(err)
	}
	_, err := f.KeyserverConfig()
	checkError(t, err, "config: keyserver.members[1].public_key_file: open ")
}

// TestExampleConfigDocumentsEveryKey checks that config.example.yaml names
// every key of the configuration types, set or in a comment, with a comment
// on the same line or just above.
func TestExampleConfigDocumentsEveryKey(t *testing.T) {
	data, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	lines := strings.Split(text, "\n")
	for _, key := range yamlKeys(reflect.TypeFor[File]()) {
		re := regexp.MustCompile(`(^|[\s{,#-])` + regexp.QuoteMeta(key) + `:`)
		found, commented := false, false
		for i, line := range lines {
			if !re.MatchString(line) {
				continue
			}
			found = true
			if strings.Contains(line, "#") || (i > 0 && strings.HasPrefix(strings.TrimSpace(lines[i-1]), "#")) {
				commented = true
			}
		}
		switch {
		case !found:
			t.Errorf("config.example.yaml does not mention key %q", key)
		case !commented:
			t.Errorf("config.example.yaml has key %q without a comment", key)
		}
	}
}

// yamlKeys lists the yaml key names of t and the types it contains.
func yamlKeys(t reflect.Type) []string {
	var keys []string
	seen := map[reflect.Type]bool{}
	var visit func(reflect.Type)
	visit = func(t reflect.Type) {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice || t.Kind() == reflect.Map {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct || seen[t] {
			return
		}
		seen[t] = true
		for i := range t.NumField() {
			fld := t.Field(i)
			if !fld.IsExported() {
				continue
			}
			name, opts, _ := strings.Cut(fld.Tag.Get("yaml"), ",")
			if name != "" && name != "-" && opts == "" {
				keys = append(keys, name)
			}
			visit(fld.Type)
		}
	}
	visit(t)
	return keys
}
