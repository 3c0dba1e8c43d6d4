package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smqtt/smqtt/internal/embedded"
	"github.com/smqtt/smqtt/internal/mqtttest"
)

// sidecarProcess is a running `smqtt sidecar` with JSON logs.
type sidecarProcess struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // its exit status, once done

	mu   sync.Mutex
	logs []map[string]any
	raw  strings.Builder
	news chan struct{} // signalled on every log line
}

func startSidecar(t *testing.T, dir, config string) *sidecarProcess {
	t.Helper()
	p := &sidecarProcess{done: make(chan struct{}), news: make(chan struct{}, 1)}
	p.cmd = exec.Command(smqttBin, "sidecar", "-c", config, "--log-format", "json")
	p.cmd.Dir = dir
	return p.run(t)
}

// run starts p.cmd and reads its JSON logs.
func (p *sidecarProcess) run(t *testing.T) *sidecarProcess {
	t.Helper()
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logsRead := make(chan struct{})
	go func() {
		defer close(logsRead)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			var rec map[string]any
			err := json.Unmarshal(sc.Bytes(), &rec)
			p.mu.Lock()
			p.raw.WriteString(sc.Text() + "\n")
			if err != nil {
				rec = map[string]any{"msg": "NOT JSON: " + sc.Text()}
			}
			p.logs = append(p.logs, rec)
			p.mu.Unlock()
			select {
			case p.news <- struct{}{}:
			default:
			}
		}
	}()
	go func() {
		<-logsRead // Wait must not run before the pipe is drained
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", p.cmd.Args[1], p.logText())
		}
	})
	return p
}

func (p *sidecarProcess) logText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.raw.String()
}

// logged waits up to 10 s for a log record whose message starts with msg
// and returns its attribute key.
func (p *sidecarProcess) logged(t *testing.T, msg, key string) string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		p.mu.Lock()
		for _, rec := range p.logs {
			if m, _ := rec["msg"].(string); strings.HasPrefix(m, msg) {
				v, _ := rec[key].(string)
				p.mu.Unlock()
				return v
			}
		}
		p.mu.Unlock()
		select {
		case <-p.news:
		case <-p.done:
			t.Fatalf("the sidecar exited (%v) before logging %q", p.err, msg)
		case <-deadline:
			t.Fatalf("the sidecar did not log %q within 10 s", msg)
		}
	}
}

// TestSidecarServesAppsReportsHealthAndStopsCleanly runs `smqtt sidecar`
// with a static key made by `smqtt keygen --group`, in front of an embedded
// upstream broker: two plain MQTT apps exchange messages through it, the
// broker sees no plaintext of the protected one, /metrics counts them, a
// SIGHUP applies new protect rules (and refuses a change that needs a
// restart), /healthz follows the upstream connection, and SIGTERM stops it
// with exit status 0.
func TestSidecarServesAppsReportsHealthAndStopsCleanly(t *testing.T) {
	dir := t.TempDir()
	if r := smqtt(t, dir, "keygen", "--group", "-o", "demo.key"); r.code != 0 {
		t.Fatalf("keygen --group: %s", r.stderr)
	}
	up, err := embedded.Start(embedded.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	writeConfig := func(clientID, protected string) {
		t.Helper()
		cfg := fmt.Sprintf(`
sidecar:
  listen: ["tcp://127.0.0.1:0"]
  upstream: {url: %q, client_id: %s}
  protect:
    - {topics: [%s], group: demo}
  static_keys: {demo: demo.key}
  data_dir: data
  metrics_listen: 127.0.0.1:0
`, up.URL(), clientID, protected)
		if err := os.WriteFile(filepath.Join(dir, "sidecar.yaml"), []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig("sidecar-under-test", `"secure/#"`)

	sc := startSidecar(t, dir, "sidecar.yaml")
	appAddr := sc.logged(t, "listening for local apps", "addr")
	httpAddr := sc.logged(t, "serving /metrics and /healthz", "addr")
	if appAddr == "" || httpAddr == "" {
		t.Fatalf("addresses not logged (apps %q, metrics %q)", appAddr, httpAddr)
	}
	healthz := "http://" + httpAddr + "/healthz"
	waitStatus(t, healthz, func(code int) bool { return code == http.StatusOK }, "/healthz to answer 200")

	before := scrape(t, "http://"+httpAddr+"/metrics")

	pub, err := mqtttest.Connect("tcp://"+appAddr, "legacy-pub", mqtttest.AppOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pub.Close)
	sub, err := mqtttest.Connect("tcp://"+appAddr, "legacy-sub", mqtttest.AppOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	for _, f := range []string{"secure/#", "plain/#"} {
		if err := sub.Subscribe(f, 1); err != nil {
			t.Fatal(err)
		}
	}
	sent := map[string]string{
		"secure/door":   "unlock code 4711",
		"plain/weather": "sunny",
	}
	for topic, payload := range sent {
		if err := pub.Publish(topic, 1, false, []byte(payload)); err != nil {
			t.Fatal(err)
		}
	}
	for n := len(sent); n > 0; n-- {
		m, ok := sub.Next(10 * time.Second)
		if !ok {
			t.Fatal("the subscriber did not receive every message within 10 s")
		}
		if want, known := sent[m.Topic]; !known || string(m.Payload) != want {
			t.Fatalf("the subscriber received %q on %s", m.Payload, m.Topic)
		}
		delete(sent, m.Topic)
	}
	if up.Spy.Contains([]byte("unlock code 4711")) {
		t.Error("the upstream broker saw the protected payload in clear")
	}
	if !up.Spy.Contains([]byte("sunny")) {
		t.Error("the upstream broker did not see the unprotected payload as it was")
	}

	after := scrape(t, "http://"+httpAddr+"/metrics")
	for _, series := range []string{
		`smqtt_sidecar_messages_total{direction="out",protection="protected"}`,
		`smqtt_sidecar_messages_total{direction="out",protection="plain"}`,
		`smqtt_sidecar_messages_total{direction="in",protection="protected"}`,
		`smqtt_sidecar_messages_total{direction="in",protection="plain"}`,
	} {
		if after[series] < before[series]+1 {
			t.Errorf("%s went from %v to %v, want an increase", series, before[series], after[series])
		}
	}
	if v := after[`smqtt_sidecar_group_epoch{group="demo"}`]; v != 1 {
		t.Errorf(`smqtt_sidecar_group_epoch{group="demo"} = %v, want 1 (the static epoch)`, v)
	}
	if v := after[`smqtt_sidecar_group_sealing{group="demo"}`]; v != 1 {
		t.Errorf(`smqtt_sidecar_group_sealing{group="demo"} = %v, want 1`, v)
	}
	if v, ok := after["smqtt_sidecar_upstream_connected"]; !ok || v != 1 {
		t.Errorf("smqtt_sidecar_upstream_connected = %v (present %v), want 1", v, ok)
	}

	// A reload (SIGHUP: systemctl reload) protects plain/# from now on,
	// without dropping the apps' connections.
	writeConfig("sidecar-under-test", `"secure/#", "plain/#"`)
	if err := sc.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	sc.logged(t, "configuration reloaded", "msg")
	if err := pub.Publish("plain/after-reload", 1, false, []byte("protected since the reload")); err != nil {
		t.Fatal(err)
	}
	if m, ok := sub.Next(10 * time.Second); !ok || string(m.Payload) != "protected since the reload" {
		t.Fatalf("after the reload the subscriber got %q (received: %v)", m.Payload, ok)
	}
	if up.Spy.Contains([]byte("protected since the reload")) {
		t.Error("after a reload that protects plain/#, the upstream broker saw its payload in clear")
	}

	// A reload that would need a restart is refused, and the sidecar runs on.
	writeConfig("another-client-id", `"secure/#", "plain/#"`)
	if err := sc.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if why := sc.logged(t, "reload refused", "error"); !strings.Contains(why, "sidecar.upstream") {
		t.Errorf("the refused reload's error %q does not name sidecar.upstream", why)
	}
	waitStatus(t, healthz, func(code int) bool { return code == http.StatusOK }, "/healthz to answer 200 after a refused reload")

	// The upstream broker goes away: the sidecar is no longer healthy.
	if err := up.Close(); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, healthz, func(code int) bool { return code != http.StatusOK }, "/healthz to stop answering 200")

	if err := sc.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sc.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the sidecar did not exit within 10 s of SIGTERM")
	}
	if sc.err != nil {
		var exit *exec.ExitError
		if errors.As(sc.err, &exit) {
			t.Fatalf("the sidecar exited with status %d after SIGTERM, want 0", exit.ExitCode())
		}
		t.Fatal(sc.err)
	}
	sc.logged(t, "shutting down", "signal")
}

// waitStatus polls url every 20 ms for up to 10 s until ok(status code).
func waitStatus(t *testing.T, url string, ok func(int) bool, what string) {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(10 * time.Second)
	last := "no answer"
	for time.Now().Before(deadline) {
		resp, err := client.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if ok(resp.StatusCode) {
				return
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(body)))
		} else {
			last = err.Error()
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s (last: %s)", what, last)
}

// scrape reads a Prometheus text exposition into series -> value, the
// series written as the exposition writes it (name{labels}).
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("unreadable metrics line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("unreadable metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
