package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRevokedSidecarSaysSo: a sidecar that the key server revokes (a reload
// that drops it from the group) fails /healthz naming the group, shows
// smqtt_sidecar_group_revoked{group="demo"} 1 and logs it once; re-admitted
// by another reload, it joins again by itself and all three recover.
func TestRevokedSidecarSaysSo(t *testing.T) {
	up := startMosquitto(t)
	dir := t.TempDir()
	for _, name := range []string{"keyserver", "a", "b"} {
		if r := smqtt(t, dir, "keygen", "--kem", "x25519", "-o", name+".key"); r.code != 0 {
			t.Fatalf("keygen: %s", r.stderr)
		}
	}
	ksConfig := func(members string) {
		cfg := fmt.Sprintf(`
keyserver:
  identity: keyserver.key
  upstream: {url: %q, client_id: keyserver}
  store: data/keyserver.db
  kem: x25519
  heartbeat: 500ms
  members:
    - {name: a, public_key_file: a.key.pub}
    - {name: b, public_key_file: b.key.pub}
  groups:
    - {name: demo, topics: ["secure/#"], scheme: update, members: [%s], rekey_lead: 200ms}
`, up.URL(), members)
		if err := os.WriteFile(filepath.Join(dir, "smqtt.yaml"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ksConfig("a, b")
	ks := startRecipeLine(t, dir, os.Environ(), smqttBin+" keyserver -c smqtt.yaml &")
	t.Cleanup(func() {
		ks.stop()
		if t.Failed() {
			t.Logf("key server log:\n%s", ks.out.String())
		}
	})
	waitUntil(t, 20*time.Second, func() bool { return strings.Contains(ks.out.String(), "key server connected") }, "the key server connects")

	metrics := freeAddr(t)
	cfg := fmt.Sprintf(`
sidecar:
  identity: a.key
  listen: ["tcp://%s"]
  upstream: {url: %q, client_id: sidecar-a}
  keyserver: {public_key_file: keyserver.key.pub, max_staleness: 5s}
  protect:
    - {topics: ["secure/#"], group: demo}
  data_dir: data-a
  metrics_listen: %s
`, freeAddr(t), up.URL(), metrics)
	if err := os.WriteFile(filepath.Join(dir, "a.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	sc := startSidecar(t, dir, "a.yaml")
	health, metricsURL := "http://"+metrics+"/healthz", "http://"+metrics+"/metrics"
	revokedSeries := `smqtt_sidecar_group_revoked{group="demo"}`
	waitStatus(t, health, func(c int) bool { return c == http.StatusOK }, "a healthy sidecar")
	if v, ok := scrape(t, metricsURL)[revokedSeries]; !ok || v != 0 {
		t.Fatalf("%s = %v (exported: %v) before any revocation, want 0", revokedSeries, v, ok)
	}

	reload := func(members string) {
		ksConfig(members)
		if err := ks.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	reload("b")
	waitStatus(t, health, func(c int) bool { return c == http.StatusServiceUnavailable }, "health fails once revoked")
	if body := getBody(t, health); !strings.Contains(body, `revoked from group "demo"`) {
		t.Fatalf("/healthz says %q, want it to name the group it was revoked from", body)
	}
	if v := scrape(t, metricsURL)[revokedSeries]; v != 1 {
		t.Fatalf("%s = %v once revoked, want 1", revokedSeries, v)
	}
	sc.logged(t, `revoked from group "demo"`, "group")
	time.Sleep(3 * time.Second) // heartbeats and retried joins meanwhile: the log says it once
	if n := strings.Count(sc.logText(), `revoked from group \"demo\"`); n != 1 {
		t.Fatalf("the revocation was logged %d times, want once:\n%s", n, sc.logText())
	}

	reload("a, b")
	waitStatus(t, health, func(c int) bool { return c == http.StatusOK }, "health recovers once re-admitted")
	if v := scrape(t, metricsURL)[revokedSeries]; v != 0 {
		t.Fatalf("%s = %v once re-admitted, want 0", revokedSeries, v)
	}
	sc.logged(t, `admitted to group "demo" again`, "group")
}

// getBody returns the body of a GET of url.
func getBody(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
