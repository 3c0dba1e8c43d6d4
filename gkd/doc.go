// Package gkd holds the key-distribution wire formats and identities shared by
// the key server and the key client of smqtt. Native Go applications that talk
// to a key server directly can import it too. docs/PROTOCOL.md (section 2) is
// the normative specification of the messages; this package implements it.
//
// # Messages
//
// A key-distribution message is a 47-byte header (version, [MsgType], flags,
// sender id, recipient id, the sender's time, a random nonce, the body
// length), a body, and the sender's Ed25519 signature over both. The bodies of
// [TypeJoinResponse] and [TypeRekey] carry group keys and are sealed to their
// recipient with HPKE, bound to the message's type, sender, recipient and
// nonce. Every body type is a Go struct ([JoinRequest], [JoinResponse],
// [Refusal], [Rekey], [Leave], [Heartbeat], [Policy], [Register],
// [Challenge], [ChallengeResponse], [RekeyAck]) with MarshalBinary and a Parse
// function.
//
// Sending:
//
//	raw, err := gkd.PlainMessage(member, serverID, gkd.TypeJoinRequest, gkd.JoinRequest{...})
//	raw, err := gkd.SealedMessage(server, memberKey, gkd.TypeRekey, gkd.Rekey{...})
//
// ([Build] and [Seal] give control of the header, for instance to remember the
// nonce of a JoinRequest.) Receiving, in this order:
//
//	m, err := gkd.Parse(raw)               // structure only
//	err = m.Verify(senderKey)              // before anything else
//	// freshness: ReplayCache.Check for requests; nonce echo or counters for the rest
//	pt, err := id.OpenBody(m)              // sealed types only; refuses unverified messages
//	body, err := gkd.ParseBody(m.Type, pt) // or m.Body for plain types
//
// Topics ([RequestTopic], [MemberTopic], [GroupTopic], [PolicyTopic]) and
// group ids ([GroupID]) are opaque hashes, so that the broker sees no names.
// A [ReplayCache] gives the key server its anti-replay memory for requests:
// each (sender, nonce) once within a time window, persistable with
// MarshalBinary.
//
// # Identities
//
// Every sidecar and the key server own an [Identity]: an Ed25519 signing key,
// which authenticates the key-distribution messages they send, and an HPKE
// (RFC 9180) key-agreement key, to which the other side encrypts. Two KEM
// suites exist:
//
//   - [SuiteHybrid] ("hybrid", the default): ML-KEM-768 + X25519, a.k.a.
//     X-Wing, so that recorded key-distribution traffic stays confidential
//     against a future quantum adversary.
//   - [SuiteX25519] ("x25519"): DHKEM(X25519, HKDF-SHA256), with far smaller
//     keys and ciphertexts, for constrained deployments.
//
// With either KEM the HPKE ciphersuite uses HKDF-SHA256 and AES-256-GCM
// ([SealTo], [Identity.Open]). A sealed message is [Suite.SealOverhead] bytes
// longer than its plaintext: 1136 for hybrid (a 1120-byte encapsulation and
// the 16-byte tag), 48 for x25519. Keys are generated from crypto/rand only.
//
// # Public keys
//
// A [PublicKey] is written as one printable line, which operators copy into
// configuration files:
//
//	smqtt-pq1-<base64url(ed25519 public key || X-Wing public key || checksum)>   (hybrid)
//	smqtt-x1-<base64url(ed25519 public key || X25519 public key || checksum)>    (x25519)
//
// base64url is RFC 4648 §5 without padding, and only its canonical encoding is
// accepted. The Ed25519 key is 32 bytes; the X-Wing key is the 1184-byte
// ML-KEM-768 encapsulation key followed by the 32-byte X25519 key; the X25519
// key is 32 bytes. The checksum is the first 4 bytes of
// SHA-256(prefix || key bytes), where the key bytes are everything before it,
// so a mistyped or truncated key fails to parse instead of silently naming
// another member. A hybrid line is 1680 characters long, an x25519 line 100.
//
// [PublicKey.ID] is a short opaque name for a key: the hex encoding of the
// first 8 bytes of SHA-256("smqtt/v1 id" || key bytes), checksum excluded.
// Key-distribution topics use it so that member names never appear on the
// wire.
//
// # Identity files
//
// [Identity.MarshalText] and [WriteIdentity] produce a small text file:
//
//	# smqtt identity: secret, keep this file mode 0600
//	# suite: x25519
//	# public key: smqtt-x1-...
//	smqtt-identity-v1:x25519:<base64url(ed25519 seed || KEM seed)>
//
// Blank lines and lines starting with "#" are comments; the public key there
// is for the reader only and is never trusted. Exactly one key line must be
// present: the version tag, the suite name, and 64 bytes of secret, the
// 32-byte Ed25519 seed (RFC 8032) followed by the 32-byte KEM private key
// (the X-Wing seed for hybrid, the X25519 scalar for x25519). The public key
// is always derived from these seeds. [WriteIdentity] also writes the public
// key line to FILE.pub.
//
// # Group key files
//
// A static group key (used without a key server) is a random 256-bit key in a
// one-line file:
//
//	smqtt-group-key-v1:<base64url(32 bytes)>
//
// # File permissions
//
// [LoadIdentity] and [LoadGroupKey] refuse a secret file whose mode grants any
// access to group or others (mode & 0o077 != 0) and say how to fix it
// (chmod 600). Writers create secret files with mode 0600 and never replace an
// existing file unless asked to (force, the --force flag of smqtt keygen).
//
// # Errors
//
// Malformed input yields an error that wraps [ErrInvalidPublicKey],
// [ErrInvalidIdentity], [ErrInvalidGroupKey] or [ErrUnknownSuite]; a secret file
// with loose permissions, [ErrInsecurePermissions]; refusing to overwrite,
// [fs.ErrExist]; a ciphertext that does not open, [ErrDecrypt]. Messages and
// bodies that break the format wrap [ErrMalformed], another protocol version
// [ErrVersion], a bad or missing signature [ErrSignature]; the replay cache
// answers [ErrStale], [ErrReplay] or [ErrBusy]. Parsers never panic, whatever
// their input.
package gkd
