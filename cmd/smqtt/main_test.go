package main

// These tests run the smqtt binary as an operator would: built once, run as
// a subprocess, judged by its exit code, its stdout and stderr, the files it
// writes and, for the sidecar, its network behaviour.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// smqttBin is the binary under test, built by TestMain with main.version
// set to testVersion.
var smqttBin string

const testVersion = "v0.0.0-test.1"

func TestMain(m *testing.M) {
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "smqtt-cmd-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	goBin, err := exec.LookPath("go")
	if err != nil {
		fmt.Fprintln(os.Stderr, "cannot build smqtt: no go command on PATH")
		return 1
	}
	smqttBin = filepath.Join(dir, "smqtt")
	build := exec.Command(goBin, "build", "-buildvcs=false", "-ldflags", "-X main.version="+testVersion, "-o", smqttBin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// result is what one run of the binary did.
type result struct {
	stdout, stderr string
	code           int
}

// smqtt runs the binary in dir with args and waits up to 30 s for it.
func smqtt(t *testing.T, dir string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, smqttBin, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		r.code = exit.ExitCode()
	default:
		t.Fatalf("smqtt %s: %v", strings.Join(args, " "), err)
	}
	if ctx.Err() != nil {
		t.Fatalf("smqtt %s: still running after 30 s", strings.Join(args, " "))
	}
	return r
}

func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) != "" {
			out = append(out, l)
		}
	}
	return out
}

func TestDemoPassesAndShowsWhatTheBrokerSaw(t *testing.T) {
	for _, scheme := range []string{"update", "static", "slotted", "lkh"} {
		t.Run(scheme, func(t *testing.T) {
			t.Parallel()
			r := smqtt(t, t.TempDir(), "demo", "--scheme", scheme)
			if r.code != 0 {
				t.Fatalf("smqtt demo --scheme %s exited %d\nstdout:\n%s\nstderr:\n%s", scheme, r.code, r.stdout, r.stderr)
			}
			out := lines(r.stdout)
			if len(out) == 0 || !strings.HasPrefix(out[len(out)-1], "VERDICT: PASS") {
				t.Fatalf("last line of stdout is not VERDICT: PASS:\n%s", r.stdout)
			}
			if !strings.Contains(r.stdout, "ciphertext") || !strings.Contains(r.stdout, "Membership changes") {
				t.Errorf("stdout does not show what the broker saw and the membership changes:\n%s", r.stdout)
			}
		})
	}
}

// `smqtt demo --sender-auth`: a member forging another's messages in four
// ways gets none delivered, each dropped under sender_auth; as itself it
// is heard until revoked, and not after.
func TestDemoSenderAuthRefusesTheForger(t *testing.T) {
	for _, scheme := range []string{"update", "slotted"} {
		t.Run(scheme, func(t *testing.T) {
			t.Parallel()
			r := smqtt(t, t.TempDir(), "demo", "--sender-auth", "--scheme", scheme)
			if r.code != 0 {
				t.Fatalf("smqtt demo --sender-auth exited %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
			}
			out := lines(r.stdout)
			if !strings.HasPrefix(out[len(out)-1], "VERDICT: PASS") {
				t.Fatalf("last line of stdout is not VERDICT: PASS:\n%s", r.stdout)
			}
			for _, want := range []string{
				"sender_auth: members sign what they seal",
				"its sidecar dropped all 4 (reason sender_auth)",
				"received what sidecar-rogue sent as itself",
				"received nothing from the revoked member; its sidecar dropped it (1, sender_auth)",
			} {
				if !strings.Contains(r.stdout, want) {
					t.Errorf("stdout lacks %q:\n%s", want, r.stdout)
				}
			}
		})
	}
}

func TestVersionPrintsTheStampedVersion(t *testing.T) {
	r := smqtt(t, t.TempDir(), "version")
	if r.code != 0 || r.stdout != "smqtt "+testVersion+"\n" {
		t.Fatalf("smqtt version: exit %d, stdout %q, want %q", r.code, r.stdout, "smqtt "+testVersion+"\n")
	}
}

// `smqtt bench rekey --cost` prints one BENCH line per scheme and size,
// with the shapes of the schemes: a slotted join sends one message, an lkh
// leave one broadcast, an update leave one message per remaining member.
func TestBenchRekeyCostPrintsEachScheme(t *testing.T) {
	r := smqtt(t, t.TempDir(), "bench", "rekey", "--cost", "--members", "20", "--batch", "4", "--suite", "x25519", "--json")
	if r.code != 0 {
		t.Fatalf("exit %d\nstderr:\n%s", r.code, r.stderr)
	}
	got := map[string]map[string]any{}
	for _, l := range lines(r.stdout) {
		var v map[string]any
		if err := json.Unmarshal([]byte(strings.TrimPrefix(l, "BENCH ")), &v); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		got[v["name"].(string)] = v
	}
	want := map[string][2]float64{ // name -> join msgs, leave msgs
		"cost-update-20": {21, 20}, "cost-lkh-20": {2, 1}, "cost-slotted-20": {1, 20},
	}
	for name, w := range want {
		v, ok := got[name]
		if !ok || v["join_msgs"] != w[0] || v["leave_msgs"] != w[1] {
			t.Errorf("%s: %v, want join_msgs %v and leave_msgs %v", name, v, w[0], w[1])
		}
	}
	if _, ok := got["cost-lkh-batch4-20"]; !ok || len(got) != 4 {
		t.Errorf("lines %v, want the four schemes including cost-lkh-batch4-20", got)
	}
}
