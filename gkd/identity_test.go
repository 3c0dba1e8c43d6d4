package gkd

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var suites = []Suite{SuiteHybrid, SuiteX25519}

func mustGenerate(t testing.TB, suite Suite) *Identity {
	t.Helper()
	id, err := GenerateIdentity(suite)
	if err != nil {
		t.Fatalf("GenerateIdentity(%s): %v", suite, err)
	}
	return id
}

// fixedIdentity derives an identity from fixed seeds, for known answers.
func fixedIdentity(t testing.TB, suite Suite) *Identity {
	t.Helper()
	seeds := make([]byte, 64)
	for i := range seeds {
		seeds[i] = byte(i)
	}
	id, err := newIdentity(suite, seeds[:32], seeds[32:])
	if err != nil {
		t.Fatalf("newIdentity(%s): %v", suite, err)
	}
	return id
}

func writeTestFile(t *testing.T, name, content string, mode fs.FileMode) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // the umask may have narrowed it
		t.Fatal(err)
	}
	return path
}

func wantErr(t *testing.T, err, target error, substrings ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", target)
	}
	if !errors.Is(err, target) {
		t.Fatalf("error %q does not wrap %q", err, target)
	}
	for _, s := range substrings {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
}

func TestIdentityMarshalParseRoundTrip(t *testing.T) {
	for _, suite := range suites {
		t.Run(string(suite), func(t *testing.T) {
			id := mustGenerate(t, suite)
			text, err := id.MarshalText()
			if err != nil {
				t.Fatal(err)
			}
			got, err := ParseIdentity(text)
			if err != nil {
				t.Fatalf("ParseIdentity(MarshalText()): %v\n%s", err, text)
			}
			if !got.Public().Equal(id.Public()) {
				t.Errorf("public key changed: %s, want %s", got.Public(), id.Public())
			}
			if got.Public().Suite() != suite {
				t.Errorf("suite = %s, want %s", got.Public().Suite(), suite)
			}
			again, _ := got.MarshalText()
			if !bytes.Equal(again, text) {
				t.Errorf("MarshalText not stable:\n%s\nwant\n%s", again, text)
			}
			msg := []byte("join demo")
			if !id.Public().Verify(msg, got.Sign(msg)) {
				t.Error("parsed identity's signature does not verify under the original public key")
			}
			if !strings.Contains(string(text), "# public key: "+id.Public().String()+"\n") {
				t.Errorf("identity file lacks the public key comment:\n%s", text)
			}
		})
	}
}

func TestGenerateIdentityGivesDistinctKeys(t *testing.T) {
	for _, suite := range suites {
		a, b := mustGenerate(t, suite), mustGenerate(t, suite)
		if a.Public().Equal(b.Public()) {
			t.Errorf("%s: two generated identities share a public key", suite)
		}
	}
}

func TestGenerateIdentityRejectsUnknownSuite(t *testing.T) {
	for _, name := range []Suite{"", "HYBRID", "p256"} {
		_, err := GenerateIdentity(name)
		wantErr(t, err, ErrUnknownSuite, fmt.Sprintf("%q", name))
	}
}

func TestParseSuite(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Suite
		ok   bool
	}{
		{"hybrid", SuiteHybrid, true},
		{"x25519", SuiteX25519, true},
		{"", "", false},
		{"X25519", "", false},
		{"mlkem768", "", false},
	} {
		got, err := ParseSuite(tc.in)
		if tc.ok && (err != nil || got != tc.want) {
			t.Errorf("ParseSuite(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
		if !tc.ok && !errors.Is(err, ErrUnknownSuite) {
			t.Errorf("ParseSuite(%q) error = %v, want ErrUnknownSuite", tc.in, err)
		}
	}
	if DefaultSuite != SuiteHybrid {
		t.Errorf("DefaultSuite = %s, want hybrid", DefaultSuite)
	}
}

func TestPublicKeyLineIsOnePrintableLineThatRoundTrips(t *testing.T) {
	for _, tc := range []struct {
		suite  Suite
		prefix string
		length int
	}{
		{SuiteHybrid, "smqtt-pq1-", 1680},
		{SuiteX25519, "smqtt-x1-", 100},
	} {
		t.Run(string(tc.suite), func(t *testing.T) {
			line := mustGenerate(t, tc.suite).Public().String()
			if !strings.HasPrefix(line, tc.prefix) {
				t.Errorf("line %q does not start with %q", abbrev(line), tc.prefix)
			}
			if len(line) != tc.length {
				t.Errorf("line is %d characters, want %d", len(line), tc.length)
			}
			for i, c := range line {
				if c <= ' ' || c > '~' {
					t.Fatalf("character %d of the line is %q, not printable ASCII", i, c)
				}
			}
			pk, err := ParsePublicKey(line)
			if err != nil {
				t.Fatal(err)
			}
			if pk.String() != line {
				t.Errorf("String() after parse differs from the input")
			}
			if pk.Suite() != tc.suite {
				t.Errorf("Suite() = %s, want %s", pk.Suite(), tc.suite)
			}
		})
	}
}

// replaceAt returns s with the character at i replaced by another base64url
// character.
func replaceAt(s string, i int) string {
	c := byte('A')
	if s[i] == 'A' {
		c = 'B'
	}
	return s[:i] + string(c) + s[i+1:]
}

func TestParsePublicKeyRejectsEveryOneCharacterChange(t *testing.T) {
	for _, suite := range suites {
		t.Run(string(suite), func(t *testing.T) {
			line := mustGenerate(t, suite).Public().String()
			for i := range len(line) {
				changed := replaceAt(line, i)
				if _, err := ParsePublicKey(changed); !errors.Is(err, ErrInvalidPublicKey) {
					t.Fatalf("character %d changed: error = %v, want ErrInvalidPublicKey", i, err)
				}
			}
		})
	}
}

func TestParsePublicKeyRejectsMalformedLines(t *testing.T) {
	hybrid := mustGenerate(t, SuiteHybrid).Public().String()
	x := mustGenerate(t, SuiteX25519).Public().String()
	hybridBody := strings.TrimPrefix(hybrid, "smqtt-pq1-")
	xBody := strings.TrimPrefix(x, "smqtt-x1-")
	for _, tc := range []struct {
		name, line, hint string
	}{
		{"empty", "", "unknown prefix"},
		{"unknown prefix", "age1" + xBody, "unknown prefix"},
		{"upper-case prefix", "SMQTT-X1-" + xBody, "unknown prefix"},
		{"prefix only", "smqtt-x1-", "bytes"},
		{"hybrid body with x25519 prefix", "smqtt-x1-" + hybridBody, "truncated or mistyped"},
		{"x25519 body with hybrid prefix", "smqtt-pq1-" + xBody, "truncated or mistyped"},
		{"hybrid truncated by one", hybrid[:len(hybrid)-1], "truncated or mistyped"},
		{"hybrid truncated by four", hybrid[:len(hybrid)-4], "truncated or mistyped"},
		{"hybrid cut in half", hybrid[:len(hybrid)/2], "truncated or mistyped"},
		{"x25519 truncated by four", x[:len(x)-4], "truncated or mistyped"},
		{"x25519 extended", x + "AAAA", "truncated or mistyped"},
		{"trailing newline", x + "\n", "line break"},
		{"wrapped line", x[:50] + "\r\n" + x[50:], "line break"},
		{"leading space", " " + x, "unknown prefix"},
		{"padding", x + "=", "base64url"},
		{"standard base64 alphabet", "smqtt-x1-" + strings.NewReplacer("-", "+", "_", "/").Replace(xBody) + "+/", "base64url"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParsePublicKey(tc.line)
			wantErr(t, err, ErrInvalidPublicKey, tc.hint)
		})
	}
}

func TestParsePublicKeyErrorIsShort(t *testing.T) {
	line := mustGenerate(t, SuiteHybrid).Public().String()
	_, err := ParsePublicKey(replaceAt(line, 500))
	wantErr(t, err, ErrInvalidPublicKey, "checksum mismatch", line[:20])
	if len(err.Error()) > 200 {
		t.Errorf("error quotes the whole key (%d characters): %v", len(err.Error()), err)
	}
}

func TestSignVerify(t *testing.T) {
	for _, suite := range suites {
		t.Run(string(suite), func(t *testing.T) {
			id, other := mustGenerate(t, suite), mustGenerate(t, suite)
			msg := []byte("rekey group demo epoch 7")
			sig := id.Sign(msg)
			if !id.Public().Verify(msg, sig) {
				t.Fatal("valid signature does not verify")
			}
			if other.Public().Verify(msg, sig) {
				t.Error("signature verifies under another member's key")
			}
			if id.Public().Verify([]byte("rekey group demo epoch 8"), sig) {
				t.Error("signature verifies for another message")
			}
			bad := bytes.Clone(sig)
			bad[10] ^= 1
			if id.Public().Verify(msg, bad) {
				t.Error("altered signature verifies")
			}
			if id.Public().Verify(msg, sig[:len(sig)-1]) {
				t.Error("truncated signature verifies")
			}
		})
	}
}

func TestSealToOpen(t *testing.T) {
	for _, suite := range suites {
		t.Run(string(suite), func(t *testing.T) {
			id, other := mustGenerate(t, suite), mustGenerate(t, suite)
			info := []byte("smqtt/v1 join-response")
			plaintext := []byte("group key material")
			ct, err := SealTo(id.Public(), info, plaintext)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := len(ct)-len(plaintext), suite.SealOverhead(); got != want {
				t.Errorf("overhead = %d bytes, SealOverhead() = %d", got, want)
			}
			got, err := id.Open(info, ct)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			if !bytes.Equal(got, plaintext) {
				t.Errorf("Open = %q, want %q", got, plaintext)
			}

			if _, err := other.Open(info, ct); !errors.Is(err, ErrDecrypt) {
				t.Errorf("another identity opened the ciphertext (err = %v)", err)
			}
			if _, err := id.Open([]byte("smqtt/v1 rekey"), ct); !errors.Is(err, ErrDecrypt) {
				t.Errorf("opened with another info (err = %v)", err)
			}
			for _, i := range []int{0, len(ct) / 2, len(ct) - 1} {
				bad := bytes.Clone(ct)
				bad[i] ^= 0x80
				if _, err := id.Open(info, bad); !errors.Is(err, ErrDecrypt) {
					t.Errorf("opened with byte %d altered (err = %v)", i, err)
				}
			}
			for _, n := range []int{0, suite.SealOverhead() - 1, len(ct) - 1} {
				if _, err := id.Open(info, ct[:n]); !errors.Is(err, ErrDecrypt) {
					t.Errorf("opened a ciphertext truncated to %d bytes (err = %v)", n, err)
				}
			}
		})
	}
}

func TestSealToIsRandomized(t *testing.T) {
	id := mustGenerate(t, SuiteX25519)
	a, err := SealTo(id.Public(), nil, []byte("same"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := SealTo(id.Public(), nil, []byte("same"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a, b) {
		t.Error("two seals of the same plaintext are equal")
	}
}

func TestSealToAcceptsTheHPKEKeysItExposes(t *testing.T) {
	for _, suite := range suites {
		id := mustGenerate(t, suite)
		if !bytes.Equal(id.HPKEPrivateKey().PublicKey().Bytes(), id.Public().HPKEPublicKey().Bytes()) {
			t.Errorf("%s: HPKEPrivateKey and HPKEPublicKey do not match", suite)
		}
		if got, want := id.Public().HPKEPublicKey().KEM().ID(), suite.kem().ID(); got != want {
			t.Errorf("%s: KEM id %#04x, want %#04x", suite, got, want)
		}
	}
}

func TestLoadIdentityRefusesLoosePermissions(t *testing.T) {
	text, _ := mustGenerate(t, SuiteX25519).MarshalText()
	for _, mode := range []fs.FileMode{0o644, 0o640, 0o604, 0o660, 0o601, 0o666} {
		t.Run(fmt.Sprintf("%04o", mode), func(t *testing.T) {
			path := writeTestFile(t, "member.key", string(text), mode)
			_, err := LoadIdentity(path)
			wantErr(t, err, ErrInsecurePermissions, path, fmt.Sprintf("%04o", mode), "chmod 600 "+path)
		})
	}
	for _, mode := range []fs.FileMode{0o600, 0o400} {
		path := writeTestFile(t, "member.key", string(text), mode)
		if _, err := LoadIdentity(path); err != nil {
			t.Errorf("mode %04o: %v", mode, err)
		}
	}
}

func TestLoadIdentityRejectsMalformedFiles(t *testing.T) {
	good, _ := fixedIdentity(t, SuiteX25519).MarshalText()
	keyLine := strings.TrimSpace(string(good[bytes.LastIndexByte(good[:len(good)-1], '\n')+1:]))
	secret := strings.TrimPrefix(keyLine, "smqtt-identity-v1:x25519:")
	for _, tc := range []struct {
		name, content, hint string
	}{
		{"empty", "", "no key line"},
		{"comments only", "# smqtt identity\n\n", "no key line"},
		{"two key lines", keyLine + "\n" + keyLine + "\n", "line 2: a second key line"},
		{"public key instead", fixedIdentity(t, SuiteX25519).Public().String() + "\n", "not an identity key line"},
		{"future version", "smqtt-identity-v2:x25519:" + secret, `unsupported version "smqtt-identity-v2"`},
		{"no suite", "smqtt-identity-v1:" + secret, "want smqtt-identity-v1:SUITE:SECRET"},
		{"unknown suite", "smqtt-identity-v1:p256:" + secret, `unknown KEM suite "p256"`},
		{"bad base64", "smqtt-identity-v1:x25519:" + secret[:10] + "*" + secret[11:], "not base64url"},
		{"short secret", "smqtt-identity-v1:x25519:" + secret[:40], "secret is 30 bytes, want 64"},
		{"long secret", "smqtt-identity-v1:x25519:" + secret + "AAAA", "secret is 67 bytes, want 64"},
		{"binary garbage", "\x00\xff\xfe smqtt", "not an identity key line"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeTestFile(t, "member.key", tc.content, 0o600)
			_, err := LoadIdentity(path)
			wantErr(t, err, ErrInvalidIdentity, path, tc.hint)
		})
	}
}

func TestParseIdentityAcceptsCommentsAndCRLF(t *testing.T) {
	id := fixedIdentity(t, SuiteHybrid)
	text, _ := id.MarshalText()
	crlf := "\r\n# edited on another system\r\n\r\n" + strings.ReplaceAll(string(text), "\n", "\r\n")
	got, err := ParseIdentity([]byte(crlf))
	if err != nil {
		t.Fatal(err)
	}
	if !got.Public().Equal(id.Public()) {
		t.Error("public key changed")
	}
}

func TestLoadIdentityReportsMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent.key")
	_, err := LoadIdentity(path)
	wantErr(t, err, fs.ErrNotExist, path)
}

func TestLoadIdentityRefusesDirectory(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := LoadIdentity(dir)
	if err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("LoadIdentity(dir) error = %v, want not a regular file", err)
	}
}

func fileMode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestWriteIdentityWritesKeyAndPublicFile(t *testing.T) {
	for _, suite := range suites {
		t.Run(string(suite), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "member.key")
			id := mustGenerate(t, suite)
			if err := WriteIdentity(path, id, false); err != nil {
				t.Fatal(err)
			}
			if m := fileMode(t, path); m != 0o600 {
				t.Errorf("identity file mode %04o, want 0600", m)
			}
			if m := fileMode(t, path+".pub"); m != 0o644 {
				t.Errorf("public key file mode %04o, want 0644", m)
			}
			pubText, err := os.ReadFile(path + ".pub")
			if err != nil {
				t.Fatal(err)
			}
			if string(pubText) != id.Public().String()+"\n" {
				t.Errorf("public key file is %q, want the public key line and a newline", abbrev(string(pubText)))
			}
			loaded, err := LoadIdentity(path)
			if err != nil {
				t.Fatal(err)
			}
			if !loaded.Public().Equal(id.Public()) {
				t.Error("LoadIdentity returned another key")
			}
			pk, err := LoadPublicKey(path + ".pub")
			if err != nil {
				t.Fatal(err)
			}
			if !pk.Equal(id.Public()) || pk.String() != id.Public().String() {
				t.Error("LoadPublicKey returned another key")
			}
		})
	}
}

func TestWriteIdentityRefusesToOverwriteWithoutForce(t *testing.T) {
	for _, existing := range []string{"member.key", "member.key.pub"} {
		t.Run(existing, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "member.key")
			occupied := filepath.Join(dir, existing)
			if err := os.WriteFile(occupied, []byte("keep me"), 0o600); err != nil {
				t.Fatal(err)
			}
			err := WriteIdentity(path, mustGenerate(t, SuiteX25519), false)
			wantErr(t, err, fs.ErrExist, occupied, "--force")
			if b, _ := os.ReadFile(occupied); string(b) != "keep me" {
				t.Errorf("%s was overwritten", existing)
			}
			entries, _ := os.ReadDir(dir)
			if len(entries) != 1 {
				t.Errorf("refusal left %d files behind, want only %s", len(entries), existing)
			}
		})
	}
}

func TestWriteIdentityOverwritesWithForce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "member.key")
	first, second := mustGenerate(t, SuiteX25519), mustGenerate(t, SuiteHybrid)
	if err := WriteIdentity(path, first, false); err != nil {
		t.Fatal(err)
	}
	// A loosened mode on the old file must not survive the overwrite.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteIdentity(path, second, true); err != nil {
		t.Fatal(err)
	}
	if m := fileMode(t, path); m != 0o600 {
		t.Errorf("identity file mode %04o after overwrite, want 0600", m)
	}
	loaded, err := LoadIdentity(path)
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Public().Equal(second.Public()) {
		t.Error("identity file still holds the old key")
	}
	pk, err := LoadPublicKey(path + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	if !pk.Equal(second.Public()) {
		t.Error("public key file still holds the old key")
	}
}

func TestLoadPublicKeyTrimsWhiteSpaceAndNamesTheFile(t *testing.T) {
	pk := mustGenerate(t, SuiteX25519).Public()
	path := writeTestFile(t, "ks.pub", "\n  "+pk.String()+" \r\n\n", 0o644)
	got, err := LoadPublicKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Equal(pk) {
		t.Error("loaded another key")
	}
	bad := writeTestFile(t, "bad.pub", replaceAt(pk.String(), 30)+"\n", 0o644)
	_, err = LoadPublicKey(bad)
	wantErr(t, err, ErrInvalidPublicKey, bad, "checksum mismatch")
}

func TestPublicKeyID(t *testing.T) {
	for _, suite := range suites {
		t.Run(string(suite), func(t *testing.T) {
			a, b := mustGenerate(t, suite).Public(), mustGenerate(t, suite).Public()
			id := a.ID()
			if len(id) != 16 {
				t.Errorf("ID %q has %d characters, want 16", id, len(id))
			}
			if _, err := hex.DecodeString(id); err != nil {
				t.Errorf("ID %q is not hex: %v", id, err)
			}
			if a.ID() != id {
				t.Error("ID changes between calls")
			}
			parsed, err := ParsePublicKey(a.String())
			if err != nil {
				t.Fatal(err)
			}
			if parsed.ID() != id {
				t.Errorf("ID after parse = %s, want %s", parsed.ID(), id)
			}
			if b.ID() == id {
				t.Error("two keys share an ID")
			}
		})
	}
}

func TestPublicKeyLineMatchesDocumentedLayout(t *testing.T) {
	for _, tc := range []struct {
		suite   Suite
		prefix  string
		kemSize int
	}{
		{SuiteHybrid, "smqtt-pq1-", 1184 + 32},
		{SuiteX25519, "smqtt-x1-", 32},
	} {
		t.Run(string(tc.suite), func(t *testing.T) {
			id := mustGenerate(t, tc.suite)
			pk := id.Public()
			data, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(pk.String(), tc.prefix))
			if err != nil {
				t.Fatal(err)
			}
			if len(data) != 32+tc.kemSize+4 {
				t.Fatalf("decoded %d bytes, want 32+%d+4", len(data), tc.kemSize)
			}
			raw, sum := data[:len(data)-4], data[len(data)-4:]
			if !bytes.Equal(raw[:32], id.sign.Public().(ed25519.PublicKey)) {
				t.Error("first 32 bytes are not the Ed25519 public key")
			}
			if !bytes.Equal(raw[32:], pk.HPKEPublicKey().Bytes()) {
				t.Error("KEM part is not the HPKE public key")
			}
			wantSum := sha256.Sum256(append([]byte(tc.prefix), raw...))
			if !bytes.Equal(sum, wantSum[:4]) {
				t.Error("checksum is not SHA-256(prefix || key bytes)[:4]")
			}
			wantID := sha256.Sum256(append([]byte("smqtt/v1 id"), raw...))
			if pk.ID() != hex.EncodeToString(wantID[:8]) {
				t.Error(`ID is not hex(SHA-256("smqtt/v1 id" || key bytes)[:8])`)
			}
		})
	}
}

// The known answers pin the formats: a change here breaks every deployed key.
func TestIdentityKnownAnswers(t *testing.T) {
	for _, tc := range []struct {
		suite   Suite
		id      string
		line    string // checked when not empty
		keyLine string
	}{
		{
			suite:   SuiteX25519,
			id:      "5ec13243abdc9a4d",
			line:    "smqtt-x1-A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg1gHLWNliA0a7qMprfkSE4OFHtIaKOO3XpZdDSzRZiVLlLf4o",
			keyLine: "smqtt-identity-v1:x25519:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0-Pw",
		},
		{
			suite:   SuiteHybrid,
			id:      "528704f9e18f7eed",
			keyLine: "smqtt-identity-v1:hybrid:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0-Pw",
		},
	} {
		t.Run(string(tc.suite), func(t *testing.T) {
			id := fixedIdentity(t, tc.suite)
			if got := id.Public().ID(); got != tc.id {
				t.Errorf("ID() = %s, want %s", got, tc.id)
			}
			if got := id.Public().String(); tc.line != "" && got != tc.line {
				t.Errorf("String() = %s, want %s", got, tc.line)
			}
			text, _ := id.MarshalText()
			if !strings.HasSuffix(string(text), "\n"+tc.keyLine+"\n") {
				t.Errorf("identity file does not end with key line %s:\n%s", tc.keyLine, text)
			}
		})
	}
}

func TestSealOverhead(t *testing.T) {
	for _, tc := range []struct {
		suite Suite
		want  int
	}{
		{SuiteHybrid, 1136},
		{SuiteX25519, 48},
		{"p256", 0},
	} {
		if got := tc.suite.SealOverhead(); got != tc.want {
			t.Errorf("%q.SealOverhead() = %d, want %d", tc.suite, got, tc.want)
		}
	}
}

func TestPublicKeyEqual(t *testing.T) {
	a := mustGenerate(t, SuiteX25519).Public()
	b := mustGenerate(t, SuiteX25519).Public()
	var none *PublicKey
	if !a.Equal(a) || a.Equal(b) || a.Equal(nil) || !none.Equal(nil) || none.Equal(a) {
		t.Error("Equal disagrees with identity of keys")
	}
}

func TestGroupKeyWriteLoad(t *testing.T) {
	k1, err := GenerateGroupKey()
	if err != nil {
		t.Fatal(err)
	}
	k2, _ := GenerateGroupKey()
	if k1 == k2 || k1 == [GroupKeySize]byte{} {
		t.Fatal("GenerateGroupKey is not random")
	}
	path := filepath.Join(t.TempDir(), "demo.group")
	if err := WriteGroupKey(path, k1, false); err != nil {
		t.Fatal(err)
	}
	if m := fileMode(t, path); m != 0o600 {
		t.Errorf("group key file mode %04o, want 0600", m)
	}
	text, _ := os.ReadFile(path)
	if !strings.HasPrefix(string(text), "smqtt-group-key-v1:") || strings.Count(string(text), "\n") != 1 ||
		len(text) != len("smqtt-group-key-v1:")+43+1 {
		t.Errorf("group key file is %q, want one line smqtt-group-key-v1:<43 characters>", text)
	}
	got, err := LoadGroupKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != k1 {
		t.Error("LoadGroupKey returned another key")
	}

	err = WriteGroupKey(path, k2, false)
	wantErr(t, err, fs.ErrExist, path, "--force")
	if got, _ := LoadGroupKey(path); got != k1 {
		t.Error("refused write changed the key")
	}
	if err := WriteGroupKey(path, k2, true); err != nil {
		t.Fatal(err)
	}
	if got, _ := LoadGroupKey(path); got != k2 {
		t.Error("forced write did not replace the key")
	}

	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	_, err = LoadGroupKey(path)
	wantErr(t, err, ErrInsecurePermissions, path, "0640", "chmod 600")
}

func TestLoadGroupKeyRejectsMalformedFiles(t *testing.T) {
	good := "smqtt-group-key-v1:" + b64.EncodeToString(make([]byte, 32))
	for _, tc := range []struct {
		name, content, hint string
	}{
		{"empty", "", "want one line"},
		{"wrong version", strings.Replace(good, "v1", "v2", 1), "want one line"},
		{"short", good[:len(good)-4], "bytes, want 32"},
		{"bad base64", good[:30] + "!" + good[31:], "not base64url"},
		{"two lines", good + "\n" + good + "\n", "not base64url"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeTestFile(t, "demo.group", tc.content, 0o600)
			_, err := LoadGroupKey(path)
			wantErr(t, err, ErrInvalidGroupKey, path, tc.hint)
		})
	}
}

func FuzzParsePublicKey(f *testing.F) {
	for _, suite := range suites {
		f.Add(fixedIdentity(f, suite).Public().String())
	}
	f.Add("smqtt-x1-")
	f.Add("smqtt-pq1-AAAA")
	f.Fuzz(func(t *testing.T, s string) {
		pk, err := ParsePublicKey(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidPublicKey) {
				t.Fatalf("error %v does not wrap ErrInvalidPublicKey", err)
			}
			return
		}
		if pk.String() != s {
			t.Fatalf("String() = %q, want the parsed input %q", pk.String(), s)
		}
		if len(pk.ID()) != 16 {
			t.Fatalf("ID() = %q", pk.ID())
		}
	})
}

func FuzzParseIdentity(f *testing.F) {
	for _, suite := range suites {
		text, _ := fixedIdentity(f, suite).MarshalText()
		f.Add(text)
	}
	f.Add([]byte("smqtt-identity-v1:x25519:"))
	f.Add([]byte("# comment\nsmqtt-identity-v1:hybrid:AAAA\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		id, err := ParseIdentity(data)
		if err != nil {
			if !errors.Is(err, ErrInvalidIdentity) {
				t.Fatalf("error %v does not wrap ErrInvalidIdentity", err)
			}
			return
		}
		text, err := id.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseIdentity(text)
		if err != nil {
			t.Fatalf("re-parsing MarshalText output: %v", err)
		}
		if !again.Public().Equal(id.Public()) {
			t.Fatal("public key changed through MarshalText")
		}
	})
}
