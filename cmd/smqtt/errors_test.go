package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBadArgumentsAndConfigsFailWithOneLine: every bad argument or
// configuration exits non-zero, prints nothing on stdout, and explains
// itself on stderr in exactly one line that names the flag or the key path.
func TestBadArgumentsAndConfigsFailWithOneLine(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return name
	}
	if r := smqtt(t, dir, "keygen", "--group", "-o", "demo.key"); r.code != 0 {
		t.Fatalf("keygen --group: %s", r.stderr)
	}
	cases := []struct {
		name string
		args []string
		want []string // substrings of the one line
	}{
		{"missing config file", []string{"sidecar", "-c", "missing.yaml"}, []string{"missing.yaml"}},
		{"no config named", []string{"sidecar"}, []string{"-c"}},
		{"unknown key", []string{"sidecar", "-c", write("unknown.yaml", `
sidecar:
  upstream: {url: tcp://127.0.0.1:1883}
  protect: [{topics: ["secure/#"], group: demo}]
  static_keys: {demo: demo.key}
  upstreem: {url: tcp://127.0.0.1:1883}
`)}, []string{"sidecar.upstreem", "unknown key"}},
		{"bad upstream URL", []string{"sidecar", "-c", write("badurl.yaml", `
sidecar:
  upstream: {url: "broker.example"}
  protect: [{topics: ["secure/#"], group: demo}]
  static_keys: {demo: demo.key}
`)}, []string{"sidecar.upstream.url", "broker.example"}},
		{"unsupported upstream scheme", []string{"sidecar", "-c", write("scheme.yaml", `
sidecar:
  upstream: {url: "http://broker.example:1883"}
  protect: [{topics: ["secure/#"], group: demo}]
  static_keys: {demo: demo.key}
`)}, []string{"sidecar.upstream.url", "http"}},
		{"protected group without a key", []string{"sidecar", "-c", write("nokey.yaml", `
sidecar:
  upstream: {url: tcp://127.0.0.1:1883}
  protect: [{topics: ["secure/#"], group: demo}]
`)}, []string{"sidecar.protect[0].group", "demo"}},
		{"static key file missing", []string{"sidecar", "-c", write("nofile.yaml", `
sidecar:
  upstream: {url: tcp://127.0.0.1:1883}
  protect: [{topics: ["secure/#"], group: demo}]
  static_keys: {demo: gone.key}
`)}, []string{"sidecar.static_keys.demo", "gone.key"}},
		{"unknown key server key", []string{"keyserver", "-c", write("ks.yaml", `
keyserver:
  identity: ks.key
  colour: blue
`)}, []string{"keyserver.colour"}},
		{"bad log format", []string{"sidecar", "-c", "unknown.yaml", "--log-format", "xml"}, []string{"--log-format", "xml"}},
		{"keygen without -o", []string{"keygen"}, []string{"-o"}},
		{"keygen with an unknown suite", []string{"keygen", "--kem", "rsa", "-o", "x.key"}, []string{"--kem", "rsa"}},
		{"demo with too few clients", []string{"demo", "--clients", "1"}, []string{"--clients"}},
		{"unknown command", []string{"frobnicate"}, []string{"frobnicate"}},
		{"stray argument", []string{"keygen", "-o", "y.key", "extra"}, []string{"extra"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := smqtt(t, dir, c.args...)
			if r.code == 0 {
				t.Fatalf("smqtt %s exited 0", strings.Join(c.args, " "))
			}
			if r.stdout != "" {
				t.Errorf("stdout %q, want nothing", r.stdout)
			}
			got := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
			if len(got) != 1 || got[0] == "" {
				t.Fatalf("stderr has %d lines, want exactly one:\n%s", len(got), r.stderr)
			}
			for _, w := range c.want {
				if !strings.Contains(got[0], w) {
					t.Errorf("stderr %q does not name %q", got[0], w)
				}
			}
		})
	}
	for _, name := range []string{"x.key", "y.key"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			t.Errorf("a refused keygen wrote %s", name)
		}
	}
}

// TestStaticKeyReadableByOthersIsRefused: a group key file that other users
// can read stops the sidecar, and the last line says which key and how to
// fix it.
func TestStaticKeyReadableByOthersIsRefused(t *testing.T) {
	dir := t.TempDir()
	if r := smqtt(t, dir, "keygen", "--group", "-o", "demo.key"); r.code != 0 {
		t.Fatalf("keygen --group: %s", r.stderr)
	}
	if err := os.Chmod(filepath.Join(dir, "demo.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := `
sidecar:
  upstream: {url: tcp://127.0.0.1:1883}
  protect: [{topics: ["secure/#"], group: demo}]
  static_keys: {demo: demo.key}
  data_dir: data
`
	if err := os.WriteFile(filepath.Join(dir, "sidecar.yaml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	r := smqtt(t, dir, "sidecar", "-c", "sidecar.yaml")
	if r.code == 0 {
		t.Fatal("the sidecar started with a world-readable group key")
	}
	got := lines(r.stderr)
	if len(got) == 0 {
		t.Fatal("the sidecar refused to start and said nothing")
	}
	last := got[len(got)-1]
	for _, w := range []string{"sidecar.static_keys.demo", "chmod 600"} {
		if !strings.Contains(last, w) {
			t.Errorf("last line of stderr %q does not name %q", last, w)
		}
	}
}
