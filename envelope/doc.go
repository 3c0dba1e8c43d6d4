// Package envelope implements the smqtt data-plane envelope: the sealed form in
// which a payload published on a protected topic crosses the untrusted broker.
//
// # Model
//
// Every member of a group holds the same group key for each key epoch. Nobody
// seals under the group key directly: a sender derives its own subkey
//
//	K_s = HKDF-SHA256(K_epoch, salt = "", info = "smqtt/v1 data" ‖ group ‖ epoch ‖ sender)
//
// and seals with AES-256-GCM under K_s, using its sequence number as the nonce.
// Because each (group, epoch, sender) has its own key, two senders that share
// a group key can never collide on a nonce, and a sender only has to keep its
// own counter unique. Sender ids are fresh for every process start (assigned
// by the key server, or random in static-key mode), and a [Sealer] counts
// from 1 and refuses to wrap, so a (key, nonce) pair is never used twice.
//
// An envelope is
//
//	header (22 bytes) ‖ ciphertext ‖ GCM tag (16 bytes)
//
// with the header
//
//	version u8 | flags u8 | epoch u32 | sender u64 | seq u64   (big-endian)
//
// The associated data binds the header, the group name and the MQTT topic, so
// the broker can neither alter a message, nor move it to another topic or
// group, nor splice the header of one message onto another. docs/PROTOCOL.md
// is the normative specification, with test vectors that this package's tests
// load from testdata/vectors.json.
//
// # Use
//
// A publisher creates one [Sealer] per (group, epoch) and calls [Sealer.Seal]
// for every message; the Sealer owns the sequence counter. A receiver creates
// one [Opener] over its key ring (any [KeyLookup]) and calls [Opener.Open];
// the Opener caches the derived per-sender ciphers. Opening proves that a
// member of the group sealed the message for this topic; it does not detect
// replays. Receivers keep a [ReplayWindow] per (group, epoch, sender) and
// consult it only after Open succeeded, so forged messages cannot move it.
//
// Retained messages carry [FlagRetain] inside the authenticated header; they
// bypass the sliding window and are ordered per topic by (epoch, sender, seq)
// instead. [FlagReseal] marks a retained value sealed again under a new epoch:
// receivers store it but do not deliver it again. An empty plaintext with
// FlagRetain is a sealed tombstone (the retained value was cleared).
//
// Errors from Open are checkable with errors.Is against [ErrMalformed],
// [ErrVersion], [ErrNoKey] and [ErrAuth]; [Reason] turns them into metric
// labels.
//
// # Compatibility
//
// The wire format is versioned by the first header byte. Version 1 is fixed:
// any change to the header, the key derivation, the nonce or the associated
// data gets a new version number, and a receiver rejects versions it does not
// know with ErrVersion.
package envelope
