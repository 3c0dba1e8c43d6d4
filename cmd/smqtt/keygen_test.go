package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestKeygenPrintsThePublicKeyAndKeepsTheSecretPrivate(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "sidecar-a.key")

	r := smqtt(t, dir, "keygen", "-o", key)
	if r.code != 0 {
		t.Fatalf("keygen exited %d: %s", r.code, r.stderr)
	}
	if n := strings.Count(r.stdout, "\n"); n != 1 || !strings.HasSuffix(r.stdout, "\n") {
		t.Fatalf("stdout has %d lines, want exactly one: %q", n, r.stdout)
	}
	if pub := read(t, key+".pub"); pub != r.stdout {
		t.Errorf("stdout and %s differ:\n%q\n%q", filepath.Base(key)+".pub", r.stdout, pub)
	}
	if p := smqtt(t, dir, "pubkey", key); p.code != 0 || p.stdout != r.stdout {
		t.Errorf("smqtt pubkey: exit %d, stdout %q, want keygen's %q", p.code, p.stdout, r.stdout)
	}
	if m := mode(t, key); m != 0o600 {
		t.Errorf("identity file mode %04o, want 0600", m)
	}
	if strings.Contains(r.stdout+r.stderr, strings.TrimSpace(read(t, key))) {
		t.Error("the private identity appeared on stdout or stderr")
	}

	t.Run("a second keygen without --force fails and changes nothing", func(t *testing.T) {
		before, beforePub := read(t, key), read(t, key+".pub")
		again := smqtt(t, dir, "keygen", "-o", key)
		if again.code == 0 {
			t.Fatal("keygen over an existing identity succeeded without --force")
		}
		if again.stdout != "" {
			t.Errorf("a refused keygen printed %q", again.stdout)
		}
		if got := lines(again.stderr); len(got) != 1 || !strings.Contains(got[0], "--force") {
			t.Errorf("stderr %q: want one line that names --force", again.stderr)
		}
		if read(t, key) != before || read(t, key+".pub") != beforePub {
			t.Error("a refused keygen changed the identity files")
		}
	})

	t.Run("--force replaces the identity", func(t *testing.T) {
		before := read(t, key)
		forced := smqtt(t, dir, "keygen", "--force", "-o", key)
		if forced.code != 0 {
			t.Fatalf("keygen --force exited %d: %s", forced.code, forced.stderr)
		}
		if read(t, key) == before {
			t.Error("keygen --force left the old identity")
		}
		if forced.stdout == r.stdout || read(t, key+".pub") != forced.stdout {
			t.Error("after --force, stdout is not the new public key of FILE.pub")
		}
		if m := mode(t, key); m != 0o600 {
			t.Errorf("identity file mode %04o after --force, want 0600", m)
		}
	})
}

func TestKeygenGroupWritesAPrivateKeyAndPrintsNothing(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "demo.key")
	r := smqtt(t, dir, "keygen", "--group", "-o", key)
	if r.code != 0 {
		t.Fatalf("keygen --group exited %d: %s", r.code, r.stderr)
	}
	if r.stdout != "" {
		t.Errorf("keygen --group printed %q on stdout, want nothing", r.stdout)
	}
	if m := mode(t, key); m != 0o600 {
		t.Errorf("group key mode %04o, want 0600", m)
	}
	written := read(t, key)
	secret := strings.TrimSpace(written)
	_, b64, _ := strings.Cut(secret, ":")
	if len(b64) < 40 || strings.Contains(r.stderr, b64) {
		t.Errorf("group key %q is short, or appeared on stderr", secret)
	}
	again := smqtt(t, dir, "keygen", "--group", "-o", key)
	if again.code == 0 || read(t, key) != written {
		t.Error("keygen --group replaced an existing key without --force")
	}
}
