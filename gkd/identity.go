package gkd

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"runtime"
	"strings"
)

// Suite names the KEM of an identity's key-agreement key.
type Suite string

const (
	// SuiteHybrid is ML-KEM-768 + X25519 (X-Wing), the default.
	SuiteHybrid Suite = "hybrid"
	// SuiteX25519 is DHKEM(X25519, HKDF-SHA256).
	SuiteX25519 Suite = "x25519"

	// DefaultSuite is the suite used when a configuration names none.
	DefaultSuite = SuiteHybrid
)

// Formats and sizes of keys and key files. See the package documentation.
const (
	publicPrefixHybrid = "smqtt-pq1-"
	publicPrefixX25519 = "smqtt-x1-"
	identityTag        = "smqtt-identity-v1"
	identityTagPrefix  = "smqtt-identity-v"
	groupKeyPrefix     = "smqtt-group-key-v1:"
	idLabel            = "smqtt/v1 id"

	seedSize         = 32 // Ed25519 seed, X-Wing seed, X25519 scalar
	checksumSize     = 4
	hybridKEMPubSize = 1184 + 32 // ML-KEM-768 encapsulation key || X25519
	x25519KEMPubSize = 32
	hybridEncSize    = 1088 + 32 // ML-KEM-768 ciphertext || X25519 share
	x25519EncSize    = 32
	aeadTagSize      = 16 // AES-256-GCM
	maxKeyFileSize   = 64 << 10
)

// GroupKeySize is the size of a static group key: 256 bits.
const GroupKeySize = 32

// Errors wrapped by the functions of this package; check them with errors.Is.
var (
	ErrUnknownSuite        = errors.New("gkd: unknown KEM suite")
	ErrInvalidPublicKey    = errors.New("gkd: invalid public key")
	ErrInvalidIdentity     = errors.New("gkd: invalid identity")
	ErrInvalidGroupKey     = errors.New("gkd: invalid group key")
	ErrInsecurePermissions = errors.New("gkd: secret file is accessible to group or others")
	ErrDecrypt             = errors.New("gkd: hpke: cannot open ciphertext")
)

// b64 is the only text encoding of key material: base64url, no padding,
// canonical encodings only.
var b64 = base64.RawURLEncoding.Strict()

// ParseSuite returns the suite named s ("hybrid" or "x25519").
func ParseSuite(s string) (Suite, error) {
	switch Suite(s) {
	case SuiteHybrid, SuiteX25519:
		return Suite(s), nil
	}
	return "", fmt.Errorf("%w %q (want %q or %q)", ErrUnknownSuite, s, SuiteHybrid, SuiteX25519)
}

// kem returns the HPKE KEM of a known suite.
func (s Suite) kem() hpke.KEM {
	if s == SuiteX25519 {
		return hpke.DHKEM(ecdh.X25519())
	}
	return hpke.MLKEM768X25519()
}

func (s Suite) publicPrefix() string {
	if s == SuiteX25519 {
		return publicPrefixX25519
	}
	return publicPrefixHybrid
}

func (s Suite) kemPublicSize() int {
	if s == SuiteX25519 {
		return x25519KEMPubSize
	}
	return hybridKEMPubSize
}

// SealOverhead is how many bytes [SealTo] adds to a plaintext for a recipient
// of this suite: the KEM encapsulation plus the AES-256-GCM tag. It is 0 for an
// unknown suite.
func (s Suite) SealOverhead() int {
	switch s {
	case SuiteHybrid:
		return hybridEncSize + aeadTagSize
	case SuiteX25519:
		return x25519EncSize + aeadTagSize
	}
	return 0
}

// HPKE ciphersuite components shared by every suite.
func hpkeKDF() hpke.KDF   { return hpke.HKDFSHA256() }
func hpkeAEAD() hpke.AEAD { return hpke.AES256GCM() }

// An Identity is a member's or the key server's private key pair: an Ed25519
// signing key and an HPKE key-agreement key.
type Identity struct {
	suite   Suite
	sign    ed25519.PrivateKey
	kemSeed []byte
	kem     hpke.PrivateKey
	public  *PublicKey
}

// GenerateIdentity returns a new random identity of the given suite.
func GenerateIdentity(suite Suite) (*Identity, error) {
	if _, err := ParseSuite(string(suite)); err != nil {
		return nil, err
	}
	secret := make([]byte, 2*seedSize)
	if _, err := rand.Read(secret); err != nil {
		return nil, fmt.Errorf("gkd: generate identity: %w", err)
	}
	id, err := newIdentity(suite, secret[:seedSize], secret[seedSize:])
	if err != nil {
		return nil, fmt.Errorf("gkd: generate identity: %w", err)
	}
	return id, nil
}

// newIdentity derives an identity from its two seeds, which it copies.
func newIdentity(suite Suite, signSeed, kemSeed []byte) (*Identity, error) {
	if len(signSeed) != seedSize || len(kemSeed) != seedSize {
		return nil, fmt.Errorf("seeds must be %d bytes each", seedSize)
	}
	kemPriv, err := suite.kem().NewPrivateKey(kemSeed)
	if err != nil {
		return nil, fmt.Errorf("%s KEM private key: %w", suite, err)
	}
	sign := ed25519.NewKeyFromSeed(signSeed)
	pub, err := newPublicKey(suite, sign.Public().(ed25519.PublicKey), kemPriv.PublicKey())
	if err != nil {
		return nil, err
	}
	return &Identity{
		suite:   suite,
		sign:    sign,
		kemSeed: bytes.Clone(kemSeed),
		kem:     kemPriv,
		public:  pub,
	}, nil
}

// Public returns the identity's public key.
func (id *Identity) Public() *PublicKey { return id.public }

// Sign returns the Ed25519 signature of msg.
func (id *Identity) Sign(msg []byte) []byte { return ed25519.Sign(id.sign, msg) }

// HPKEPrivateKey returns the identity's HPKE key-agreement private key.
func (id *Identity) HPKEPrivateKey() hpke.PrivateKey { return id.kem }

// Open decrypts a ciphertext made by [SealTo] for this identity's public key
// with the same info. Any failure wraps [ErrDecrypt].
func (id *Identity) Open(info, ciphertext []byte) ([]byte, error) {
	pt, err := hpke.Open(id.kem, hpkeKDF(), hpkeAEAD(), info, ciphertext)
	if err != nil {
		return nil, fmt.Errorf("%w (%s, %d bytes): %w", ErrDecrypt, id.suite, len(ciphertext), err)
	}
	return pt, nil
}

// SealTo encrypts plaintext to pk with single-shot HPKE (the KEM of pk's suite,
// HKDF-SHA256, AES-256-GCM), binding info. The result is the KEM encapsulation
// followed by the AEAD ciphertext, pk.Suite().SealOverhead() bytes longer than
// plaintext.
func SealTo(pk *PublicKey, info, plaintext []byte) ([]byte, error) {
	if pk == nil {
		return nil, errors.New("gkd: hpke seal: nil public key")
	}
	ct, err := hpke.Seal(pk.kem, hpkeKDF(), hpkeAEAD(), info, plaintext)
	if err != nil {
		return nil, fmt.Errorf("gkd: hpke seal to %s: %w", pk.ID(), err)
	}
	return ct, nil
}

// MarshalText returns the identity file described in the package
// documentation. The result is secret.
func (id *Identity) MarshalText() ([]byte, error) {
	secret := make([]byte, 0, 2*seedSize)
	secret = append(secret, id.sign.Seed()...)
	secret = append(secret, id.kemSeed...)
	var b bytes.Buffer
	b.WriteString("# smqtt identity: secret, keep this file mode 0600\n")
	fmt.Fprintf(&b, "# suite: %s\n", id.suite)
	fmt.Fprintf(&b, "# public key: %s\n", id.public)
	fmt.Fprintf(&b, "%s:%s:%s\n", identityTag, id.suite, b64.EncodeToString(secret))
	return b.Bytes(), nil
}

// ParseIdentity parses an identity file (see the package documentation).
func ParseIdentity(data []byte) (*Identity, error) {
	return parseIdentity(data, "")
}

// parseIdentity parses an identity file; src names it in errors when not empty.
func parseIdentity(data []byte, src string) (*Identity, error) {
	fail := func(format string, args ...any) error {
		where := ""
		if src != "" {
			where = " in " + src
		}
		return fmt.Errorf("%w%s: %w", ErrInvalidIdentity, where, fmt.Errorf(format, args...))
	}
	var keyLine string
	keyLineNo := 0
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if keyLineNo != 0 {
			return nil, fail("line %d: a second key line (the first is line %d)", i+1, keyLineNo)
		}
		keyLine, keyLineNo = line, i+1
	}
	if keyLineNo == 0 {
		return nil, fail("no key line (want %s:SUITE:SECRET)", identityTag)
	}
	tag, rest, _ := strings.Cut(keyLine, ":")
	if tag != identityTag {
		if strings.HasPrefix(tag, identityTagPrefix) {
			return nil, fail("line %d: unsupported version %q (want %s)", keyLineNo, abbrev(tag), identityTag)
		}
		return nil, fail("line %d: not an identity key line (want %s:SUITE:SECRET)", keyLineNo, identityTag)
	}
	suiteName, secretText, ok := strings.Cut(rest, ":")
	if !ok {
		return nil, fail("line %d: want %s:SUITE:SECRET", keyLineNo, identityTag)
	}
	suite, err := ParseSuite(suiteName)
	if err != nil {
		return nil, fail("line %d: %w", keyLineNo, err)
	}
	secret, err := b64.DecodeString(secretText)
	if err != nil {
		return nil, fail("line %d: secret is not base64url: %w", keyLineNo, err)
	}
	if len(secret) != 2*seedSize {
		return nil, fail("line %d: secret is %d bytes, want %d", keyLineNo, len(secret), 2*seedSize)
	}
	id, err := newIdentity(suite, secret[:seedSize], secret[seedSize:])
	if err != nil {
		return nil, fail("line %d: %w", keyLineNo, err)
	}
	return id, nil
}

// LoadIdentity reads an identity file. It refuses a file that group or others
// may access.
func LoadIdentity(path string) (*Identity, error) {
	data, err := readKeyFile(path, true)
	if err != nil {
		return nil, fmt.Errorf("gkd: load identity: %w", err)
	}
	return parseIdentity(data, path)
}

// WriteIdentity writes id to path (mode 0600) and its public key line to
// path+".pub" (mode 0644). Unless force is set it replaces neither file, and
// the error wraps [fs.ErrExist].
func WriteIdentity(path string, id *Identity, force bool) error {
	if id == nil {
		return errors.New("gkd: write identity: nil identity")
	}
	text, err := id.MarshalText()
	if err != nil {
		return fmt.Errorf("gkd: write identity %s: %w", path, err)
	}
	pubPath := path + ".pub"
	if !force {
		// Check the public file first so that a refusal leaves nothing behind.
		if _, err := os.Lstat(pubPath); err == nil {
			return fmt.Errorf("gkd: write identity: %w", existsError(pubPath))
		}
	}
	created, err := writeFile(path, text, 0o600, force)
	if err != nil {
		return fmt.Errorf("gkd: write identity: %w", err)
	}
	if _, err := writeFile(pubPath, []byte(id.public.String()+"\n"), 0o644, force); err != nil {
		if created {
			os.Remove(path)
		}
		return fmt.Errorf("gkd: write identity: %w", err)
	}
	return nil
}

// A PublicKey is the public half of an [Identity]: an Ed25519 verification
// key and an HPKE encapsulation key.
type PublicKey struct {
	suite Suite
	sign  ed25519.PublicKey
	kem   hpke.PublicKey
	raw   []byte // sign || kem bytes
	text  string // the encoded line
}

func newPublicKey(suite Suite, sign ed25519.PublicKey, kem hpke.PublicKey) (*PublicKey, error) {
	kemBytes := kem.Bytes()
	if len(sign) != ed25519.PublicKeySize || len(kemBytes) != suite.kemPublicSize() {
		return nil, fmt.Errorf("%s public key sizes %d+%d, want %d+%d",
			suite, len(sign), len(kemBytes), ed25519.PublicKeySize, suite.kemPublicSize())
	}
	raw := make([]byte, 0, len(sign)+len(kemBytes)+checksumSize)
	raw = append(raw, sign...)
	raw = append(raw, kemBytes...)
	prefix := suite.publicPrefix()
	text := prefix + b64.EncodeToString(append(raw, publicChecksum(prefix, raw)...))
	return &PublicKey{
		suite: suite,
		sign:  bytes.Clone(raw[:ed25519.PublicKeySize]),
		kem:   kem,
		raw:   raw,
		text:  text,
	}, nil
}

func publicChecksum(prefix string, raw []byte) []byte {
	h := sha256.New()
	io.WriteString(h, prefix)
	h.Write(raw)
	return h.Sum(nil)[:checksumSize]
}

// ParsePublicKey parses a public key line (see the package documentation).
// Surrounding white space is not allowed; [LoadPublicKey] trims it.
func ParsePublicKey(s string) (*PublicKey, error) {
	return parsePublicKey(s, "")
}

// parsePublicKey parses a public key line; src names its file in errors when
// not empty.
func parsePublicKey(s, src string) (*PublicKey, error) {
	fail := func(format string, args ...any) error {
		where := fmt.Sprintf(" %q", abbrev(s))
		if src != "" {
			where = " in " + src
		}
		return fmt.Errorf("%w%s: %w", ErrInvalidPublicKey, where, fmt.Errorf(format, args...))
	}
	var suite Suite
	switch {
	case strings.HasPrefix(s, publicPrefixHybrid):
		suite = SuiteHybrid
	case strings.HasPrefix(s, publicPrefixX25519):
		suite = SuiteX25519
	default:
		return nil, fail("unknown prefix (want %s or %s)", publicPrefixHybrid, publicPrefixX25519)
	}
	if strings.ContainsAny(s, "\r\n") {
		// The base64 decoder would skip line breaks; a key is one line.
		return nil, fail("contains a line break; a public key is one line")
	}
	prefix := suite.publicPrefix()
	data, err := b64.DecodeString(s[len(prefix):])
	if err != nil {
		return nil, fail("not valid base64url after the prefix (truncated or mistyped?): %w", err)
	}
	want := ed25519.PublicKeySize + suite.kemPublicSize() + checksumSize
	if len(data) != want {
		return nil, fail("%d bytes, a %s key has %d (truncated or mistyped?)", len(data), suite, want)
	}
	raw, sum := data[:len(data)-checksumSize], data[len(data)-checksumSize:]
	if !bytes.Equal(sum, publicChecksum(prefix, raw)) {
		return nil, fail("checksum mismatch (corrupted or mistyped?)")
	}
	kem, err := suite.kem().NewPublicKey(raw[ed25519.PublicKeySize:])
	if err != nil {
		return nil, fail("%s KEM key: %w", suite, err)
	}
	pk, err := newPublicKey(suite, raw[:ed25519.PublicKeySize], kem)
	if err != nil {
		return nil, fail("%w", err)
	}
	if pk.text != s {
		// Guards the promise that String returns the parsed line exactly.
		return nil, fail("non-canonical encoding")
	}
	return pk, nil
}

// LoadPublicKey reads a public key file such as the FILE.pub that
// [WriteIdentity] writes, ignoring surrounding white space.
func LoadPublicKey(path string) (*PublicKey, error) {
	data, err := readKeyFile(path, false)
	if err != nil {
		return nil, fmt.Errorf("gkd: load public key: %w", err)
	}
	return parsePublicKey(strings.TrimSpace(string(data)), path)
}

// String returns the public key line, exactly as parsed or written.
func (pk *PublicKey) String() string { return pk.text }

// ID returns the key's short opaque id: 16 hex digits (see the package
// documentation). It is the same for every encoding of the same key.
func (pk *PublicKey) ID() string {
	id := pk.RawID()
	return hex.EncodeToString(id[:])
}

// RawID returns the 8 bytes behind [PublicKey.ID]: the first 8 bytes of
// SHA-256("smqtt/v1 id" || key bytes). Key-distribution headers carry it as
// the sender and recipient id.
func (pk *PublicKey) RawID() [8]byte {
	h := sha256.New()
	io.WriteString(h, idLabel)
	h.Write(pk.raw)
	var id [8]byte
	copy(id[:], h.Sum(nil))
	return id
}

// Suite returns the KEM suite of the key.
func (pk *PublicKey) Suite() Suite { return pk.suite }

// Verify reports whether sig is a valid Ed25519 signature of msg by pk.
func (pk *PublicKey) Verify(msg, sig []byte) bool { return ed25519.Verify(pk.sign, msg, sig) }

// HPKEPublicKey returns the HPKE encapsulation key.
func (pk *PublicKey) HPKEPublicKey() hpke.PublicKey { return pk.kem }

// Equal reports whether pk and o are the same key. Two nil keys are equal.
func (pk *PublicKey) Equal(o *PublicKey) bool {
	if pk == nil || o == nil {
		return pk == o
	}
	return pk.suite == o.suite && bytes.Equal(pk.raw, o.raw)
}

// GenerateGroupKey returns a random 256-bit static group key.
func GenerateGroupKey() ([GroupKeySize]byte, error) {
	var key [GroupKeySize]byte
	if _, err := rand.Read(key[:]); err != nil {
		return key, fmt.Errorf("gkd: generate group key: %w", err)
	}
	return key, nil
}

// WriteGroupKey writes a group key file (mode 0600). Unless force is set it
// does not replace an existing file, and the error wraps [fs.ErrExist].
func WriteGroupKey(path string, key [GroupKeySize]byte, force bool) error {
	text := groupKeyPrefix + b64.EncodeToString(key[:]) + "\n"
	if _, err := writeFile(path, []byte(text), 0o600, force); err != nil {
		return fmt.Errorf("gkd: write group key: %w", err)
	}
	return nil
}

// LoadGroupKey reads a group key file. It refuses a file that group or others
// may access.
func LoadGroupKey(path string) ([GroupKeySize]byte, error) {
	var key [GroupKeySize]byte
	data, err := readKeyFile(path, true)
	if err != nil {
		return key, fmt.Errorf("gkd: load group key: %w", err)
	}
	line := strings.TrimSpace(string(data))
	text, ok := strings.CutPrefix(line, groupKeyPrefix)
	if !ok {
		return key, fmt.Errorf("%w in %s: want one line %s<base64url key>", ErrInvalidGroupKey, path, groupKeyPrefix)
	}
	raw, err := b64.DecodeString(text)
	if err != nil {
		return key, fmt.Errorf("%w in %s: not base64url: %w", ErrInvalidGroupKey, path, err)
	}
	if len(raw) != GroupKeySize {
		return key, fmt.Errorf("%w in %s: %d bytes, want %d", ErrInvalidGroupKey, path, len(raw), GroupKeySize)
	}
	copy(key[:], raw)
	return key, nil
}

// readKeyFile reads a small key file. If secret is set it refuses a file whose
// permissions let group or others access it.
func readKeyFile(path string, secret bool) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	// Windows has no Unix permission bits; its ACLs are not checked here.
	if secret && runtime.GOOS != "windows" && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %04o; fix with: chmod 600 %s",
			ErrInsecurePermissions, path, fi.Mode().Perm(), path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxKeyFileSize {
		return nil, fmt.Errorf("%s is larger than %d bytes, not a key file", path, maxKeyFileSize)
	}
	return data, nil
}

// writeFile writes data to path with mode perm, creating the file exclusively
// unless force is set. It reports whether it created a new file.
func writeFile(path string, data []byte, perm fs.FileMode, force bool) (created bool, err error) {
	flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if force {
		flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, perm)
	if errors.Is(err, fs.ErrExist) {
		return false, existsError(path)
	}
	if err != nil {
		return false, err
	}
	created = !force
	fail := func(err error) (bool, error) {
		f.Close()
		if created {
			os.Remove(path)
		}
		return false, err
	}
	// An existing file keeps its mode through O_TRUNC, and the umask may have
	// narrowed a new one: set the mode explicitly.
	if err := f.Chmod(perm); err != nil {
		return fail(err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		if created {
			os.Remove(path)
		}
		return false, err
	}
	return created, nil
}

func existsError(path string) error {
	return fmt.Errorf("%s already exists; use --force to overwrite it: %w", path, fs.ErrExist)
}

// abbrev shortens s for an error message.
func abbrev(s string) string {
	const n = 24
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// SigningKey returns the Ed25519 public key of the identity: what a Roster
// certifies for the member's sender ids in a sender_auth group.
func (pk *PublicKey) SigningKey() [ed25519.PublicKeySize]byte {
	return [ed25519.PublicKeySize]byte(pk.sign)
}
