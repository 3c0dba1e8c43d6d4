package envelope

// Sender proofs (docs/PROTOCOL.md 1.10): in a sender_auth group a sender
// seals what is waiting in its queue as one batch, builds a Merkle tree
// (RFC 6962 shape) over the batch's envelopes, signs its root once with its
// Ed25519 key, and appends to each envelope the signature and the envelope's
// audit path. A receiver recomputes the root from the one envelope it got,
// verifies the signature once per batch it sees (a cache remembers verified
// roots), and so learns that the sender the header names sealed this very
// envelope, on this topic, in this group.

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
)

// Proof constants.
const (
	// SignatureLen is the length of the Ed25519 signature in a proof.
	SignatureLen = ed25519.SignatureSize
	// ProofFixedLen is what every proof adds besides its audit path:
	// signature ‖ u16 index ‖ u16 size.
	ProofFixedLen = SignatureLen + 2 + 2
	// HashLen is the length of a leaf, node or root hash (SHA-256).
	HashLen = sha256.Size
	// MaxBatch is the largest batch one proof may cover (u16 size).
	MaxBatch = math.MaxUint16

	// LeafDomain and BatchDomain separate the leaf hash and the signed
	// message from every other use of SHA-256 and of the signing key (the
	// key distribution messages sign "smqtt/v1 gkd" ‖ 00 ‖ …).
	LeafDomain  = "smqtt/v1 leaf"
	BatchDomain = "smqtt/v1 batch"
)

// ErrProof: an envelope of a sender_auth group has no proof, a proof that
// does not verify, or a sender that the group's roster does not list.
// [Reason] maps it to "sender_auth".
var ErrProof = errors.New("envelope: sender proof failed")

// ProofLen returns the length of the proof of the index-th envelope of a
// batch of size envelopes, and 0 if index or size is out of range.
func ProofLen(index, size int) int {
	if size < 1 || size > MaxBatch || index < 0 || index >= size {
		return 0
	}
	return pathLen(index, size)*HashLen + ProofFixedLen
}

// MaxProofLen returns the longest proof in a batch of size envelopes.
func MaxProofLen(size int) int {
	if size < 1 || size > MaxBatch {
		return 0
	}
	// The leftmost leaf sits deepest in an RFC 6962 tree.
	return ProofLen(0, size)
}

// pathLen is the length, in hashes, of the audit path of leaf m in a tree
// of n leaves.
func pathLen(m, n int) int {
	l := 0
	for n > 1 {
		k := splitPoint(n)
		if m < k {
			n = k
		} else {
			m, n = m-k, n-k
		}
		l++
	}
	return l
}

// splitPoint is RFC 6962's k: the largest power of two smaller than n (n > 1).
func splitPoint(n int) int {
	k := 1
	for k<<1 < n {
		k <<= 1
	}
	return k
}

// A Proof is the proof part of an envelope with FlagProof.
type Proof struct {
	Path      [][HashLen]byte // sibling hashes, from the leaf up
	Signature [SignatureLen]byte
	Index     uint16 // the envelope's position in its batch
	Size      uint16 // the number of envelopes in the batch, at least 1
}

// SplitProof separates an envelope with FlagProof into the envelope proper
// (header ‖ ciphertext ‖ tag, what the AEAD covers) and its proof. It checks
// the proof's structure only; [ProofChecker.Check] verifies it. An envelope
// without FlagProof is returned whole with a zero Proof and ok false.
func SplitProof(msg []byte) (env []byte, p Proof, ok bool, err error) {
	h, err := ParseHeader(msg)
	if err != nil {
		return nil, Proof{}, false, err
	}
	if !h.Flags.Proof() {
		return msg, Proof{}, false, nil
	}
	env, p, err = splitProof(msg)
	return env, p, err == nil, err
}

// splitProof parses the trailer of msg, which has FlagProof.
func splitProof(msg []byte) ([]byte, Proof, error) {
	start, index, size, err := parseTrailer(msg)
	if err != nil {
		return nil, Proof{}, err
	}
	end := len(msg)
	p := Proof{Index: index, Size: size}
	copy(p.Signature[:], msg[end-4-SignatureLen:end-4])
	if n := (end - 4 - SignatureLen - start) / HashLen; n > 0 {
		p.Path = make([][HashLen]byte, n)
		for i := range p.Path {
			copy(p.Path[i][:], msg[start+i*HashLen:])
		}
	}
	return msg[:start], p, nil
}

// parseTrailer finds where the proof of msg (which has FlagProof) starts,
// and reads its index and size, without allocating.
func parseTrailer(msg []byte) (start int, index, size uint16, err error) {
	if len(msg) < Overhead+ProofFixedLen {
		return 0, 0, 0, fmt.Errorf("%w: %d bytes, too short for an envelope with a proof", ErrMalformed, len(msg))
	}
	end := len(msg)
	size = binary.BigEndian.Uint16(msg[end-2:])
	index = binary.BigEndian.Uint16(msg[end-4:])
	if size == 0 || index >= size {
		return 0, 0, 0, fmt.Errorf("%w: proof of envelope %d in a batch of %d", ErrMalformed, index, size)
	}
	proofLen := pathLen(int(index), int(size))*HashLen + ProofFixedLen
	if len(msg) < Overhead+proofLen {
		return 0, 0, 0, fmt.Errorf("%w: %d bytes, too short for a %d-byte proof", ErrMalformed, len(msg), proofLen)
	}
	return end - proofLen, index, size, nil
}

// AppendTo appends the proof's encoding: path ‖ signature ‖ u16 index ‖
// u16 size.
func (p *Proof) AppendTo(dst []byte) []byte {
	for i := range p.Path {
		dst = append(dst, p.Path[i][:]...)
	}
	dst = append(dst, p.Signature[:]...)
	dst = binary.BigEndian.AppendUint16(dst, p.Index)
	return binary.BigEndian.AppendUint16(dst, p.Size)
}

// LeafHash returns the Merkle leaf of the envelope env (header ‖ ciphertext
// ‖ tag, without a proof) sealed for group on topic:
//
//	SHA-256(00 ‖ "smqtt/v1 leaf" ‖ u8 len(group) ‖ group ‖ u16 len(topic) ‖ topic ‖ env)
//
// The whole envelope is hashed, not only its tag: an AES-GCM tag does not
// commit to the ciphertext for whoever holds the key, and every member
// holds it.
func LeafHash(group, topic string, env []byte) [HashLen]byte {
	h := sha256.New()
	var pre [1 + len(LeafDomain) + 1]byte
	b := append(pre[:0], 0)
	b = append(b, LeafDomain...)
	b = append(b, byte(len(group)))
	h.Write(b)
	h.Write([]byte(group))
	var tl [2]byte
	binary.BigEndian.PutUint16(tl[:], uint16(len(topic)))
	h.Write(tl[:])
	h.Write([]byte(topic))
	h.Write(env)
	var out [HashLen]byte
	h.Sum(out[:0])
	return out
}

// nodeHash is SHA-256(01 ‖ left ‖ right).
func nodeHash(l, r *[HashLen]byte) [HashLen]byte {
	var b [1 + 2*HashLen]byte
	b[0] = 1
	copy(b[1:], l[:])
	copy(b[1+HashLen:], r[:])
	return sha256.Sum256(b[:])
}

// SignedMessage returns what a sender signs for a batch:
//
//	"smqtt/v1 batch" ‖ 00 ‖ u8 len(group) ‖ group ‖ u64 sender ‖ u16 size ‖ root
func SignedMessage(group string, sender uint64, size uint16, root *[HashLen]byte) []byte {
	b := make([]byte, 0, len(BatchDomain)+1+1+len(group)+8+2+HashLen)
	b = append(b, BatchDomain...)
	b = append(b, 0, byte(len(group)))
	b = append(b, group...)
	b = binary.BigEndian.AppendUint64(b, sender)
	b = binary.BigEndian.AppendUint16(b, size)
	return append(b, root[:]...)
}

// RootFromPath recomputes a batch's root from one envelope's leaf hash and
// its proof. The proof's path must have the length its index and size
// call for.
func RootFromPath(leaf [HashLen]byte, p *Proof) ([HashLen]byte, error) {
	path := make([]byte, 0, len(p.Path)*HashLen)
	for i := range p.Path {
		path = append(path, p.Path[i][:]...)
	}
	return rootFrom(leaf, path, p.Index, p.Size)
}

// rootFrom is RootFromPath over the encoded path (hashes concatenated).
func rootFrom(leaf [HashLen]byte, path []byte, index, size uint16) ([HashLen]byte, error) {
	if size == 0 || index >= size {
		return [HashLen]byte{}, fmt.Errorf("%w: proof of envelope %d in a batch of %d", ErrMalformed, index, size)
	}
	m, n := int(index), int(size)
	// Record, from the root down, whether the leaf is in the left subtree.
	var left [16]bool
	depth := 0
	for n > 1 {
		k := splitPoint(n)
		if m < k {
			left[depth], n = true, k
		} else {
			left[depth], m, n = false, m-k, n-k
		}
		depth++
	}
	if depth*HashLen != len(path) {
		return [HashLen]byte{}, fmt.Errorf("%w: audit path of %d bytes, want %d hashes", ErrMalformed, len(path), depth)
	}
	h := leaf
	for i := range depth {
		sib := (*[HashLen]byte)(path[i*HashLen:])
		if left[depth-1-i] {
			h = nodeHash(&h, sib)
		} else {
			h = nodeHash(sib, &h)
		}
	}
	return h, nil
}

// A ProofSigner signs batch roots: an Ed25519 private key's owner (a
// gkd.Identity is one). Sign returns the 64-byte signature of msg.
type ProofSigner interface {
	Sign(msg []byte) []byte
}

// A BatchItem is one envelope of a batch and the topic it was sealed for.
type BatchItem struct {
	Topic string
	Env   []byte
}

// ProveBatch proves a batch: items are envelopes that one sender sealed
// with FlagProof for group, in the order they will be sent (the order does
// not matter to receivers). It signs the batch's root once with signer and
// appends each envelope's proof to its Env (reallocating it when its
// capacity is short). A batch of one costs one signature and no hashing
// beyond its leaf.
func ProveBatch(group string, signer ProofSigner, items []BatchItem) error {
	n := len(items)
	if n < 1 || n > MaxBatch {
		return fmt.Errorf("prove batch for group %q: %w: %d envelopes, want 1 to %d", group, ErrMalformed, n, MaxBatch)
	}
	if err := checkGroup(group); err != nil {
		return fmt.Errorf("prove batch: %w", err)
	}
	var sender uint64
	leaves := make([][HashLen]byte, n)
	for i := range items {
		h, err := ParseHeader(items[i].Env)
		if err != nil {
			return fmt.Errorf("prove batch for group %q, envelope %d: %w", group, i, err)
		}
		if !h.Flags.Proof() {
			return fmt.Errorf("prove batch for group %q, envelope %d: %w: sealed without FlagProof", group, i, ErrMalformed)
		}
		if i == 0 {
			sender = h.Sender
		} else if h.Sender != sender {
			return fmt.Errorf("prove batch for group %q: %w: envelopes of senders %d and %d in one batch", group, ErrMalformed, sender, h.Sender)
		}
		if err := checkTopic(items[i].Topic); err != nil {
			return fmt.Errorf("prove batch for group %q, envelope %d: %w", group, i, err)
		}
		leaves[i] = LeafHash(group, items[i].Topic, items[i].Env)
	}
	t := newMerkle(leaves)
	root := t.root()
	var sig [SignatureLen]byte
	if s := signer.Sign(SignedMessage(group, sender, uint16(n), &root)); len(s) != SignatureLen {
		return fmt.Errorf("prove batch for group %q: signer returned %d bytes, want %d", group, len(s), SignatureLen)
	} else {
		copy(sig[:], s)
	}
	for i := range items {
		e := slices.Grow(items[i].Env, ProofLen(i, n))
		e = t.appendPath(e, i)
		e = append(e, sig[:]...)
		e = binary.BigEndian.AppendUint16(e, uint16(i))
		items[i].Env = binary.BigEndian.AppendUint16(e, uint16(n))
	}
	return nil
}

// merkle is an RFC 6962 tree over leaves, its node hashes kept by level:
// level 0 the leaves; a level's odd last node is carried up unchanged,
// which gives the same hashes as RFC 6962's largest-power-of-two split.
type merkle struct {
	levels [][][HashLen]byte
}

func newMerkle(leaves [][HashLen]byte) *merkle {
	t := &merkle{levels: [][][HashLen]byte{leaves}}
	for cur := leaves; len(cur) > 1; {
		next := make([][HashLen]byte, (len(cur)+1)/2)
		for i := 0; i+1 < len(cur); i += 2 {
			next[i/2] = nodeHash(&cur[i], &cur[i+1])
		}
		if len(cur)%2 == 1 {
			next[len(next)-1] = cur[len(cur)-1]
		}
		t.levels = append(t.levels, next)
		cur = next
	}
	return t
}

func (t *merkle) root() [HashLen]byte { return t.levels[len(t.levels)-1][0] }

// appendPath appends leaf i's audit path, from the leaf up: at each level
// the sibling, skipping levels where the node was carried up without one.
func (t *merkle) appendPath(dst []byte, i int) []byte {
	for _, lvl := range t.levels[:len(t.levels)-1] {
		if sib := i ^ 1; sib < len(lvl) {
			dst = append(dst, lvl[sib][:]...)
		}
		i >>= 1
	}
	return dst
}

// SenderKeys gives a ProofChecker the verification key of each sender of a
// sender_auth group (from the group's roster), or false when the sender is
// not a current member's. Implementations must be safe for concurrent use.
type SenderKeys interface {
	SenderKey(group string, sender uint64) (ed25519.PublicKey, bool)
}

// DefaultProofCacheSize is the number of verified batch roots a
// ProofChecker remembers when NewProofChecker is given a size below 1.
const DefaultProofCacheSize = 4096

// A ProofChecker verifies the proofs of envelopes. It remembers the batch
// roots it verified (up to a fixed number, oldest forgotten first), so a
// receiver pays one signature verification per batch it sees, however
// many of the batch's envelopes reach it. It is safe for concurrent use.
type ProofChecker struct {
	keys SenderKeys

	mu    sync.Mutex
	seen  map[verified]struct{}
	order []verified // ring buffer of seen's entries, oldest at next
	next  int
}

// verified names a batch signature that verified: it holds for exactly
// this root, size, sender, group and key.
type verified struct {
	root   [HashLen]byte
	key    [ed25519.PublicKeySize]byte
	sender uint64
	size   uint16
	group  string
}

// NewProofChecker returns a ProofChecker over keys that remembers up to
// cacheSize verified roots (DefaultProofCacheSize if cacheSize < 1).
func NewProofChecker(keys SenderKeys, cacheSize int) *ProofChecker {
	if cacheSize < 1 {
		cacheSize = DefaultProofCacheSize
	}
	return &ProofChecker{keys: keys, seen: make(map[verified]struct{}, cacheSize), order: make([]verified, 0, cacheSize)}
}

// Check verifies that the sender named in msg's header sealed msg, for
// group on topic, as one envelope of a batch it signed with the key its
// group's roster certifies. Errors wrap ErrProof, or ErrMalformed for an
// envelope that does not parse. Check does not open the envelope: call
// [Opener.Open] too (which checks the AEAD and ignores the proof).
func (c *ProofChecker) Check(group, topic string, msg []byte) error {
	h, err := ParseHeader(msg)
	if err != nil {
		return err
	}
	if !h.Flags.Proof() {
		return fmt.Errorf("%w: group %q sender %d seq %d on %q: no proof", ErrProof, group, h.Sender, h.Seq, topic)
	}
	if err := checkGroup(group); err != nil {
		return err
	}
	if err := checkTopic(topic); err != nil {
		return err
	}
	start, index, size, err := parseTrailer(msg)
	if err != nil {
		return err
	}
	sigAt := len(msg) - 4 - SignatureLen
	root, err := rootFrom(LeafHash(group, topic, msg[:start]), msg[start:sigAt], index, size)
	if err != nil {
		return err
	}
	pub, ok := c.keys.SenderKey(group, h.Sender)
	if !ok || len(pub) != ed25519.PublicKeySize {
		return fmt.Errorf("%w: group %q: sender %d is not in the roster", ErrProof, group, h.Sender)
	}
	v := verified{root: root, key: [ed25519.PublicKeySize]byte(pub), sender: h.Sender, size: size, group: group}
	c.mu.Lock()
	_, hit := c.seen[v]
	c.mu.Unlock()
	if hit {
		return nil
	}
	if !ed25519.Verify(pub, SignedMessage(group, h.Sender, size, &root), msg[sigAt:sigAt+SignatureLen]) {
		return fmt.Errorf("%w: group %q sender %d seq %d on %q: signature does not verify", ErrProof, group, h.Sender, h.Seq, topic)
	}
	c.remember(v)
	return nil
}

func (c *ProofChecker) remember(v verified) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.seen[v]; ok {
		return
	}
	if len(c.order) < cap(c.order) {
		c.order = append(c.order, v)
	} else {
		delete(c.seen, c.order[c.next])
		c.order[c.next] = v
		c.next = (c.next + 1) % len(c.order)
	}
	c.seen[v] = struct{}{}
}

// Len returns the number of verified roots the checker remembers.
func (c *ProofChecker) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}
