package gkd

// The logical key hierarchy (LKH) of the lkh scheme: RFC 2627, section 5.4,
// and Wong, Gouda and Lam, "Secure group communications using key graphs"
// (1998).
//
// The key server keeps, per group, an [LKHTree]: a balanced tree of degree d
// whose leaves are the members. Every node has a 32-byte key and a version;
// each member holds the keys of its leaf and of every ancestor, and the
// root's key is the group key. When members join or leave, every key on
// their paths changes once, and the key server multicasts an [LKHRekey]: each
// changed key wrapped under the keys of its children, so each remaining
// member unwraps its new path bottom-up, while a leaver holds no key that
// unwraps anything new (forward secrecy). A joiner gets its path directly
// ([LKHPath], sealed to it with HPKE) and never sees the keys it replaces
// (backward secrecy). One leave costs at most d·h wrapped keys, where the
// height h is ⌈log_d n⌉ for a tree that has held at most n members, instead
// of the n - 1 unicast keys of the update scheme.
//
// Nodes are named by level (0 for the leaves, the height for the root) and
// index within the level ([LKHNodeID]); node (l, i) is the parent of nodes
// (l-1, d·i) to (l-1, d·i + d - 1). A joiner takes the lowest free leaf. When
// all d^h leaves are taken, the tree grows by a level: a new root whose first
// child is the old root, so that no existing member's node changes name. The
// tree never shrinks.
//
// A key's version is the tree's rekey counter at the rekey that set it, so
// versions only grow, for every node, and the group key's version is the
// counter of the latest rekey.
//
// A wrapped key ([LKHWrap]) is AES-256-GCM under the child's key, with a
// random 12-byte nonce carried with it and associated data
//
//	"smqtt/v1 lkh wrap" ‖ u8 level ‖ u32 index ‖ u32 version    (the wrapped node, its new version)
//	                    ‖ u8 level ‖ u32 index ‖ u32 version    (the wrapping node, its version)
//
// The 18 bytes after the label are also the entry's first bytes on the wire,
// followed by the nonce and the 48-byte ciphertext (key and tag): 78 bytes in
// all ([LKHWrapSize]). A chunk ([LKHRekey.Chunks]) is
//
//	u8 format (1) ‖ u32 counter ‖ u16 index ‖ u16 count ‖ wrapped keys
//
// with index counting from 0. Each chunk carries, for every member it serves,
// the whole chain of wrapped keys from that member's first changed ancestor
// up to the root, so each can be applied on its own, in any order.

import (
	"container/heap"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
)

// LKH limits and sizes.
const (
	MinLKHDegree = 2   // the smallest tree degree
	MaxLKHDegree = 256 // the largest tree degree

	LKHWrapSize        = 18 + 12 + GroupKeySize + 16 // one wrapped key in a chunk: 78 bytes
	LKHChunkHeaderSize = 1 + 4 + 2 + 2               // format, counter, index, count

	lkhFormat     = 1
	lkhWrapLabel  = "smqtt/v1 lkh wrap"
	lkhMaxHeight  = 32 // d ≥ 2 and leaf indices below 2^32
	lkhMaxNameLen = 255
)

// LKH errors.
var (
	ErrLKHNotMember = errors.New("gkd: lkh: not a member")
	ErrLKHMember    = errors.New("gkd: lkh: already a member")
	ErrLKHExhausted = errors.New("gkd: lkh: tree exhausted")
	ErrLKHChunkSize = errors.New("gkd: lkh: chunk size too small")
	ErrUnwrap       = errors.New("gkd: lkh: wrapped key fails authentication")
)

// LKHNodeID names a node of a key tree: its level (0 for a leaf) and its
// index among the nodes of that level.
type LKHNodeID struct {
	Level uint8
	Index uint32
}

// String returns "level/index".
func (id LKHNodeID) String() string { return fmt.Sprintf("%d/%d", id.Level, id.Index) }

// Parent returns the node's parent in a tree of the given degree.
func (id LKHNodeID) Parent(degree int) LKHNodeID {
	return LKHNodeID{Level: id.Level + 1, Index: id.Index / uint32(degree)}
}

// LKHKey is a node key and its version: what a member holds for each node of
// its path.
type LKHKey struct {
	Version uint32
	Key     [GroupKeySize]byte
}

// LKHPath is what a member holds: its leaf and the keys of the leaf and of
// each ancestor, from the leaf (Keys[0], the member's individual key) to the
// root (the last, the group key). The key server hands it to a joiner and to
// a member that asks for a resync, sealed to it with HPKE; it is secret.
type LKHPath struct {
	Degree int
	Leaf   uint32   // the leaf's index
	Keys   []LKHKey // Keys[l] belongs to the ancestor at level l
}

// Node returns the id of the path's node at level l.
func (p LKHPath) Node(l int) LKHNodeID {
	return LKHNodeID{Level: uint8(l), Index: ancestorIndex(p.Leaf, p.Degree, l)}
}

// LKHWrap is one wrapped key of a rekey: the new key of Node (at Version),
// encrypted under the key of its child Under (at UnderVersion).
type LKHWrap struct {
	Node         LKHNodeID
	Version      uint32
	Under        LKHNodeID
	UnderVersion uint32
	Nonce        [12]byte
	Sealed       [GroupKeySize + 16]byte // AES-256-GCM ciphertext and tag
}

// LKHRekey is the outcome of one batch of joins and leaves: the wrapped keys
// that the key server multicasts to the group ([LKHRekey.Chunks]) and the
// paths it hands to each joiner individually.
type LKHRekey struct {
	Counter uint32      // the tree's rekey counter: the version of every new key
	Changed []LKHNodeID // the interior nodes on the paths of the joins and leaves, bottom-up: each got one new key, or was cleared if no member is left below it
	Wraps   []LKHWrap   // bottom-up
	Joined  []LKHPath   // one per joiner, in the order given; secret
}

// LKHTree is the key server's key tree for one group of the lkh scheme. It is
// not safe for concurrent use.
type LKHTree struct {
	degree  int
	rand    io.Reader
	counter uint32
	levels  [][]lkhNode       // levels[0] the leaves, levels[len-1] the root alone
	leafOf  map[string]uint32 // member -> leaf index
	names   []string          // leaf index -> member, "" if free
	free    freeLeaves        // free leaf indices below len(levels[0])
}

type lkhNode struct {
	key     [GroupKeySize]byte
	version uint32
	members uint32 // members in the subtree
}

// NewLKHTree returns an empty key tree of the given degree (from
// [MinLKHDegree] to [MaxLKHDegree]; it panics on another) drawing its keys
// from rand (crypto/rand if nil).
func NewLKHTree(degree int, rand io.Reader) *LKHTree {
	if degree < MinLKHDegree || degree > MaxLKHDegree {
		panic(fmt.Sprintf("gkd: NewLKHTree(%d): degree must be %d to %d", degree, MinLKHDegree, MaxLKHDegree))
	}
	t := &LKHTree{rand: rand}
	t.reset(degree)
	return t
}

func (t *LKHTree) reset(degree int) {
	t.degree = degree
	t.counter = 0
	t.levels = [][]lkhNode{nil, {{}}}
	t.leafOf = map[string]uint32{}
	t.names = nil
	t.free = nil
}

// Degree returns the tree's degree.
func (t *LKHTree) Degree() int { return t.degree }

// Height returns the root's level, at least 1.
func (t *LKHTree) Height() int { return len(t.levels) - 1 }

// Members returns the number of members.
func (t *LKHTree) Members() int { return len(t.leafOf) }

// Counter returns the number of rekeys so far.
func (t *LKHTree) Counter() uint32 { return t.counter }

// GroupKey returns the root's key and version. The key is all zero while
// the tree has no members.
func (t *LKHTree) GroupKey() (version uint32, key [GroupKeySize]byte) {
	r := t.root()
	return r.version, r.key
}

// Path returns a member's current path, for a resync.
func (t *LKHTree) Path(member string) (LKHPath, error) {
	i, ok := t.leafOf[member]
	if !ok {
		return LKHPath{}, fmt.Errorf("%w: %q", ErrLKHNotMember, member)
	}
	return t.path(i), nil
}

// Join adds one member: Rekey([]string{member}, nil). It returns the new
// member's path and the rekey for the others.
func (t *LKHTree) Join(member string) (LKHPath, *LKHRekey, error) {
	r, err := t.Rekey([]string{member}, nil)
	if err != nil {
		return LKHPath{}, nil, err
	}
	return r.Joined[0], r, nil
}

// Leave removes one member: Rekey(nil, []string{member}).
func (t *LKHTree) Leave(member string) (*LKHRekey, error) {
	return t.Rekey(nil, []string{member})
}

// Rekey applies a batch of membership changes at once: first the leaves,
// whose leaves become free, then the joins, each taking the lowest free
// leaf. Every interior node on the path of a join or a leave gets one new
// key, whatever the number of paths through it; a node left without members
// is cleared instead. Every new key is wrapped under the key of each child
// with members other than this batch's joiners (the child's new key if it
// changed too). The joiners get their paths in the result. With no change at
// all, only the root changes: a refresh of the group key.
//
// Rekey reads 32 bytes from the tree's random source and expands them with
// AES-256-CTR into the batch's keys and nonces; that single read happens
// before any change, so that an error leaves the tree as it was. Errors wrap
// [ErrLKHNotMember], [ErrLKHMember] or [ErrLKHExhausted]; a name listed
// twice, or empty or longer than 255 bytes, is an error too.
func (t *LKHTree) Rekey(joins, leaves []string) (*LKHRekey, error) {
	if err := t.checkBatch(joins, leaves); err != nil {
		return nil, err
	}
	var seed [32]byte
	if _, err := io.ReadFull(t.random(), seed[:]); err != nil {
		return nil, fmt.Errorf("gkd: lkh: reading randomness: %w", err)
	}
	ks := newKeyStream(&seed)
	clear(seed[:])

	t.counter++
	r := &LKHRekey{Counter: t.counter}
	// 1. Free the leavers' leaves and place the joiners.
	left, joined := t.moveMembers(joins, leaves, ks)
	// 2. Gather the union of their paths, at the final height.
	var joinersBelow map[LKHNodeID]uint32
	r.Changed, joinersBelow = t.pathsOf(left, joined)
	// 3. Give each changed node a new key, or clear it if it has no members.
	for _, id := range r.Changed {
		if n := t.node(id); n.members == 0 {
			clear(n.key[:])
		} else {
			ks.fill(n.key[:])
			n.version = r.Counter
		}
	}
	// 4. Wrap each new key under its children's keys, new or old.
	r.Wraps = t.wrapNewKeys(r.Changed, joinersBelow, ks)
	// 5. Hand the joiners their paths.
	for _, i := range joined {
		r.Joined = append(r.Joined, t.path(i))
	}
	return r, nil
}

// moveMembers frees the leavers' leaves and places the joiners, each with a
// fresh leaf key, and returns the leaves that were left and taken.
func (t *LKHTree) moveMembers(joins, leaves []string, ks *keyStream) (left, joined []uint32) {
	for _, m := range leaves {
		i := t.leafOf[m]
		delete(t.leafOf, m)
		t.names[i] = ""
		clear(t.levels[0][i].key[:])
		t.count(i, -1)
		heap.Push(&t.free, i)
		left = append(left, i)
	}
	for _, m := range joins {
		i := t.takeLeaf()
		t.leafOf[m] = i
		t.names[i] = m
		leaf := &t.levels[0][i]
		ks.fill(leaf.key[:])
		leaf.version = t.counter
		t.count(i, +1)
		joined = append(joined, i)
	}
	return left, joined
}

// pathsOf returns the interior nodes on the paths of the given leaves, and
// the root in any case, bottom-up, and how many of the joined leaves lie
// below each node: a child whose members all just joined needs no wrap.
func (t *LKHTree) pathsOf(left, joined []uint32) ([]LKHNodeID, map[LKHNodeID]uint32) {
	changed := map[LKHNodeID]bool{t.rootID(): true}
	joinersBelow := map[LKHNodeID]uint32{}
	for _, i := range left {
		for l := 1; l < len(t.levels); l++ {
			changed[t.nodeAt(i, l)] = true
		}
	}
	for _, i := range joined {
		joinersBelow[LKHNodeID{Level: 0, Index: i}]++
		for l := 1; l < len(t.levels); l++ {
			id := t.nodeAt(i, l)
			changed[id] = true
			joinersBelow[id]++
		}
	}
	ids := make([]LKHNodeID, 0, len(changed))
	for id := range changed {
		ids = append(ids, id)
	}
	slices.SortFunc(ids, compareNodes)
	return ids, joinersBelow
}

// wrapNewKeys wraps the new key of each changed node that has members under
// the key of each of its children that has members other than joiners.
func (t *LKHTree) wrapNewKeys(changed []LKHNodeID, joinersBelow map[LKHNodeID]uint32, ks *keyStream) []LKHWrap {
	var wraps []LKHWrap
	for _, id := range changed {
		n := t.node(id)
		if n.members == 0 {
			continue
		}
		below := t.levels[id.Level-1]
		first := uint64(id.Index) * uint64(t.degree)
		last := min(first+uint64(t.degree), uint64(len(below)))
		for c := first; c < last; c++ {
			child := LKHNodeID{Level: id.Level - 1, Index: uint32(c)}
			cn := &below[c]
			if cn.members == joinersBelow[child] {
				continue // empty, or only joiners, who have their paths
			}
			w := LKHWrap{Node: id, Version: n.version, Under: child, UnderVersion: cn.version}
			ks.fill(w.Nonce[:])
			newKeyWrapAEAD(&cn.key).Seal(w.Sealed[:0], w.Nonce[:], n.key[:], w.ad())
			wraps = append(wraps, w)
		}
	}
	return wraps
}

// checkBatch validates a batch before anything changes.
func (t *LKHTree) checkBatch(joins, leaves []string) error {
	listed := make(map[string]bool, len(joins)+len(leaves))
	for _, m := range leaves {
		if listed[m] {
			return fmt.Errorf("gkd: lkh: %q listed twice", m)
		}
		listed[m] = true
		if _, ok := t.leafOf[m]; !ok {
			return fmt.Errorf("%w: cannot leave: %q", ErrLKHNotMember, m)
		}
	}
	for _, m := range joins {
		if listed[m] {
			return fmt.Errorf("gkd: lkh: %q listed twice", m)
		}
		listed[m] = true
		if len(m) == 0 || len(m) > lkhMaxNameLen {
			return fmt.Errorf("gkd: lkh: member name %q is %d bytes, want 1 to %d", m, len(m), lkhMaxNameLen)
		}
		if _, ok := t.leafOf[m]; ok {
			return fmt.Errorf("%w: cannot join: %q", ErrLKHMember, m)
		}
	}
	if t.counter == math.MaxUint32 {
		return fmt.Errorf("%w: rekey counter at %d", ErrLKHExhausted, t.counter)
	}
	// Joiners first fill the free leaves, then new ones.
	if extra := len(joins) - len(t.free) - len(leaves); extra > 0 && uint64(len(t.names))+uint64(extra) > math.MaxUint32 {
		return fmt.Errorf("%w: %d members, no room for %d more", ErrLKHExhausted, len(t.leafOf), len(joins))
	}
	return nil
}

func (t *LKHTree) random() io.Reader {
	if t.rand == nil {
		return rand.Reader
	}
	return t.rand
}

func (t *LKHTree) root() *lkhNode { return &t.levels[len(t.levels)-1][0] }

func (t *LKHTree) rootID() LKHNodeID { return LKHNodeID{Level: uint8(len(t.levels) - 1)} }

func (t *LKHTree) node(id LKHNodeID) *lkhNode { return &t.levels[id.Level][id.Index] }

// nodeAt returns the id of leaf i's ancestor at level l.
func (t *LKHTree) nodeAt(i uint32, l int) LKHNodeID {
	return LKHNodeID{Level: uint8(l), Index: ancestorIndex(i, t.degree, l)}
}

// count adds delta to the member count of leaf i and its ancestors.
func (t *LKHTree) count(i uint32, delta int) {
	for l := range t.levels {
		n := &t.levels[l][ancestorIndex(i, t.degree, l)]
		n.members = uint32(int64(n.members) + int64(delta))
	}
}

// takeLeaf returns the lowest free leaf, adding one (and growing the tree by
// a level when it is full) if none is free.
func (t *LKHTree) takeLeaf() uint32 {
	if len(t.free) > 0 {
		return heap.Pop(&t.free).(uint32)
	}
	i := uint32(len(t.names))
	if uint64(i) >= capacity(t.degree, t.Height()) {
		// The old root becomes the first child of a new one.
		t.levels = append(t.levels, []lkhNode{{members: t.root().members}})
	}
	t.names = append(t.names, "")
	for l := range t.levels {
		if a := ancestorIndex(i, t.degree, l); a == uint32(len(t.levels[l])) {
			t.levels[l] = append(t.levels[l], lkhNode{})
		}
	}
	return i
}

func (t *LKHTree) path(i uint32) LKHPath {
	p := LKHPath{Degree: t.degree, Leaf: i, Keys: make([]LKHKey, len(t.levels))}
	for l := range t.levels {
		n := &t.levels[l][ancestorIndex(i, t.degree, l)]
		p.Keys[l] = LKHKey{Version: n.version, Key: n.key}
	}
	return p
}

// ancestorIndex returns the index of leaf i's ancestor at level l.
func ancestorIndex(i uint32, degree, l int) uint32 {
	for range l {
		i /= uint32(degree)
		if i == 0 {
			break
		}
	}
	return i
}

// capacity returns degree^height, the number of leaves under a root at that
// height, saturated above the largest leaf count.
func capacity(degree, height int) uint64 {
	c := uint64(1)
	for range height {
		c *= uint64(degree)
		if c > math.MaxUint32 {
			return math.MaxUint32 + 1
		}
	}
	return c
}

func compareNodes(a, b LKHNodeID) int {
	if a.Level != b.Level {
		return int(a.Level) - int(b.Level)
	}
	switch {
	case a.Index < b.Index:
		return -1
	case a.Index > b.Index:
		return 1
	}
	return 0
}

// freeLeaves is a min-heap of free leaf indices.
type freeLeaves []uint32

func (h freeLeaves) Len() int           { return len(h) }
func (h freeLeaves) Less(i, j int) bool { return h[i] < h[j] }
func (h freeLeaves) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *freeLeaves) Push(x any)        { *h = append(*h, x.(uint32)) }
func (h *freeLeaves) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// keyStream expands a 32-byte random seed into the keys and nonces of one
// rekey: the AES-256-CTR keystream under the seed, from a zero counter.
type keyStream struct{ ctr cipher.Stream }

func newKeyStream(seed *[32]byte) *keyStream {
	block, err := aes.NewCipher(seed[:])
	if err != nil {
		panic("gkd: lkh: AES refused a 32-byte key: " + err.Error())
	}
	return &keyStream{ctr: cipher.NewCTR(block, make([]byte, aes.BlockSize))}
}

func (s *keyStream) fill(p []byte) {
	clear(p)
	s.ctr.XORKeyStream(p, p)
}

func newKeyWrapAEAD(key *[GroupKeySize]byte) cipher.AEAD {
	block, err := aes.NewCipher(key[:])
	if err != nil {
		panic("gkd: lkh: AES refused a 32-byte key: " + err.Error())
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		panic("gkd: lkh: GCM: " + err.Error())
	}
	return gcm
}

// head returns the 18 bytes that name the wrapped and the wrapping key.
func (w *LKHWrap) head() [18]byte {
	var b [18]byte
	b[0] = w.Node.Level
	binary.BigEndian.PutUint32(b[1:], w.Node.Index)
	binary.BigEndian.PutUint32(b[5:], w.Version)
	b[9] = w.Under.Level
	binary.BigEndian.PutUint32(b[10:], w.Under.Index)
	binary.BigEndian.PutUint32(b[14:], w.UnderVersion)
	return b
}

func (w *LKHWrap) ad() []byte {
	h := w.head()
	return append([]byte(lkhWrapLabel), h[:]...)
}

func (w *LKHWrap) appendTo(b []byte) []byte {
	h := w.head()
	b = append(b, h[:]...)
	b = append(b, w.Nonce[:]...)
	return append(b, w.Sealed[:]...)
}

// parseWrap decodes one LKHWrapSize-byte entry.
func parseWrap(b []byte) LKHWrap {
	w := LKHWrap{
		Node:         LKHNodeID{Level: b[0], Index: binary.BigEndian.Uint32(b[1:])},
		Version:      binary.BigEndian.Uint32(b[5:]),
		Under:        LKHNodeID{Level: b[9], Index: binary.BigEndian.Uint32(b[10:])},
		UnderVersion: binary.BigEndian.Uint32(b[14:]),
	}
	copy(w.Nonce[:], b[18:30])
	copy(w.Sealed[:], b[30:LKHWrapSize])
	return w
}

// LKHChunkHeader is the header of one chunk of a rekey.
type LKHChunkHeader struct {
	Counter uint32 // the rekey's counter
	Index   uint16 // this chunk's place, from 0
	Count   uint16 // the number of chunks of the rekey
}

// ParseLKHChunkHeader decodes the header of a chunk and checks that the rest
// is a whole number of wrapped keys. Errors wrap [ErrMalformed].
func ParseLKHChunkHeader(chunk []byte) (LKHChunkHeader, error) {
	if len(chunk) < LKHChunkHeaderSize {
		return LKHChunkHeader{}, fmt.Errorf("%w: lkh chunk: %d bytes, shorter than the %d-byte header", ErrMalformed, len(chunk), LKHChunkHeaderSize)
	}
	if chunk[0] != lkhFormat {
		return LKHChunkHeader{}, fmt.Errorf("%w: lkh chunk: format %d, want %d", ErrMalformed, chunk[0], lkhFormat)
	}
	h := LKHChunkHeader{
		Counter: binary.BigEndian.Uint32(chunk[1:]),
		Index:   binary.BigEndian.Uint16(chunk[5:]),
		Count:   binary.BigEndian.Uint16(chunk[7:]),
	}
	if h.Index >= h.Count {
		return LKHChunkHeader{}, fmt.Errorf("%w: lkh chunk: index %d of %d", ErrMalformed, h.Index, h.Count)
	}
	if n := len(chunk) - LKHChunkHeaderSize; n%LKHWrapSize != 0 {
		return LKHChunkHeader{}, fmt.Errorf("%w: lkh chunk: %d bytes of wrapped keys, not a multiple of %d", ErrMalformed, n, LKHWrapSize)
	}
	return h, nil
}

// Chunks serialises the rekey's wrapped keys into chunks of at most maxBytes
// each, at least one chunk even if there is nothing to wrap. A member needs
// one chain of wrapped keys: from its lowest changed ancestor, wrapped under
// a key it already holds, up to the root, each wrapped under the previous.
// Chunks never splits a chain, so every chunk is applicable on its own; the
// upper links of chains are repeated in each chunk that needs them. A
// maxBytes too small for the longest chain (LKHChunkHeaderSize + height ×
// LKHWrapSize bytes) is an error wrapping [ErrLKHChunkSize].
func (r *LKHRekey) Chunks(maxBytes int) ([][]byte, error) {
	if maxBytes < LKHChunkHeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, less than the %d-byte header", ErrLKHChunkSize, maxBytes, LKHChunkHeaderSize)
	}
	// Each node wraps at most one key, its parent's: index the wraps by it.
	byUnder := make(map[LKHNodeID]int, len(r.Wraps))
	for i := range r.Wraps {
		byUnder[r.Wraps[i].Under] = i
	}
	// A chain starts at a wrap under a key that did not change (a member's
	// leaf, or an interior node off the changed paths) and climbs through
	// wraps under new keys.
	chain := func(start int) []int {
		c := []int{start}
		for j, ok := byUnder[r.Wraps[start].Node]; ok; j, ok = byUnder[r.Wraps[j].Node] {
			c = append(c, j)
		}
		return c
	}
	perChunk := (maxBytes - LKHChunkHeaderSize) / LKHWrapSize
	var groups [][]int
	var cur []int
	in := map[int]bool{}
	for i := range r.Wraps {
		if r.Wraps[i].UnderVersion == r.Counter {
			continue // a link, not a start
		}
		c := chain(i)
		if len(c) > perChunk {
			return nil, fmt.Errorf("%w: %d bytes hold %d wrapped keys, a chain needs %d (%d bytes)",
				ErrLKHChunkSize, maxBytes, max(perChunk, 0), len(c), LKHChunkHeaderSize+len(c)*LKHWrapSize)
		}
		var need []int
		for _, j := range c {
			if !in[j] {
				need = append(need, j)
			}
		}
		if len(cur)+len(need) > perChunk {
			groups = append(groups, cur)
			cur, need = nil, c
			clear(in)
		}
		for _, j := range need {
			in[j] = true
		}
		cur = append(cur, need...)
	}
	if len(cur) > 0 || len(groups) == 0 {
		groups = append(groups, cur)
	}
	if len(groups) > math.MaxUint16 {
		return nil, fmt.Errorf("%w: %d chunks of %d bytes, more than %d", ErrLKHChunkSize, len(groups), maxBytes, math.MaxUint16)
	}
	chunks := make([][]byte, len(groups))
	for k, g := range groups {
		slices.Sort(g) // bottom-up, as the wraps are
		b := make([]byte, 0, LKHChunkHeaderSize+len(g)*LKHWrapSize)
		b = append(b, lkhFormat)
		b = binary.BigEndian.AppendUint32(b, r.Counter)
		b = binary.BigEndian.AppendUint16(b, uint16(k))
		b = binary.BigEndian.AppendUint16(b, uint16(len(groups)))
		for _, j := range g {
			b = r.Wraps[j].appendTo(b)
		}
		chunks[k] = b
	}
	return chunks, nil
}

// LKHMember is a member's side of the lkh scheme: the keys of its path,
// updated by the chunks of each rekey. It is not safe for concurrent use.
type LKHMember struct {
	degree int
	leaf   uint32
	keys   []LKHKey // by level; the last is the group key
}

// NewLKHMember starts from a path that the key server handed out on a join
// or a resync. It keeps a copy.
func NewLKHMember(p LKHPath) (*LKHMember, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	return &LKHMember{degree: p.Degree, leaf: p.Leaf, keys: slices.Clone(p.Keys)}, nil
}

// Path returns a copy of the member's current path, to persist it.
func (m *LKHMember) Path() LKHPath {
	return LKHPath{Degree: m.degree, Leaf: m.leaf, Keys: slices.Clone(m.keys)}
}

// GroupKey returns the root's key and version.
func (m *LKHMember) GroupKey() (version uint32, key [GroupKeySize]byte) {
	k := m.keys[len(m.keys)-1]
	return k.Version, k.Key
}

// Apply unwraps every new key of the member's path that a chunk holds, in
// any order, and returns how many it installed. It ignores wrapped keys under
// keys it does not hold and keys no newer than its own. A wrapped key under
// one of its keys that does not open (or that names a node which is not the
// wrapping node's parent) is skipped and counted; Apply still installs the
// others and then returns an error wrapping [ErrUnwrap] with the count. A
// chunk that breaks the format is an error wrapping [ErrMalformed] and
// changes nothing.
func (m *LKHMember) Apply(chunk []byte) (applied int, err error) {
	h, err := ParseLKHChunkHeader(chunk)
	if err != nil {
		return 0, err
	}
	body := chunk[LKHChunkHeaderSize:]
	n := len(body) / LKHWrapSize
	done := make([]bool, n)
	failed := 0
	for progress := true; progress; {
		progress = false
		for k := range n {
			if done[k] {
				continue
			}
			w := parseWrap(body[k*LKHWrapSize:])
			l := int(w.Under.Level)
			if l >= len(m.keys) || w.Under.Index != ancestorIndex(m.leaf, m.degree, l) || w.UnderVersion != m.keys[l].Version {
				continue // not under a key we hold, maybe under one we are about to learn
			}
			done[k] = true
			if w.Node != w.Under.Parent(m.degree) {
				failed++
				continue
			}
			if l+1 < len(m.keys) && w.Version <= m.keys[l+1].Version {
				continue // stale
			}
			var key LKHKey
			gcm := newKeyWrapAEAD(&m.keys[l].Key)
			if _, err := gcm.Open(key.Key[:0], w.Nonce[:], w.Sealed[:], w.ad()); err != nil {
				failed++
				continue
			}
			key.Version = w.Version
			if l+1 == len(m.keys) {
				m.keys = append(m.keys, key) // the tree grew a level
			} else {
				clear(m.keys[l+1].Key[:])
				m.keys[l+1] = key
			}
			applied++
			progress = true
		}
	}
	if failed > 0 {
		return applied, fmt.Errorf("%w: %d wrapped keys in chunk %d/%d of rekey %d", ErrUnwrap, failed, h.Index+1, h.Count, h.Counter)
	}
	return applied, nil
}

// MarshalBinary encodes a path:
//
//	u16 degree ‖ u32 leaf ‖ u8 count ‖ count × (u32 version ‖ 32-byte key)
func (p LKHPath) MarshalBinary() ([]byte, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, 7+len(p.Keys)*(4+GroupKeySize))
	b = binary.BigEndian.AppendUint16(b, uint16(p.Degree))
	b = binary.BigEndian.AppendUint32(b, p.Leaf)
	b = append(b, uint8(len(p.Keys)))
	for _, k := range p.Keys {
		b = binary.BigEndian.AppendUint32(b, k.Version)
		b = append(b, k.Key[:]...)
	}
	return b, nil
}

// ParseLKHPath decodes a path. Errors wrap [ErrMalformed].
func ParseLKHPath(b []byte) (LKHPath, error) {
	r := reader{what: "lkh path", b: b}
	p := LKHPath{Degree: int(r.u16("degree")), Leaf: r.u32("leaf")}
	n := int(r.u8("count"))
	if r.err == nil && len(r.b)-r.off != n*(4+GroupKeySize) {
		r.fail("%d keys need %d bytes, %d left", n, n*(4+GroupKeySize), len(r.b)-r.off)
	}
	for i := 0; i < n && r.err == nil; i++ {
		var k LKHKey
		k.Version = r.u32("version")
		r.array("key", k.Key[:])
		p.Keys = append(p.Keys, k)
	}
	if err := r.done(); err != nil {
		return LKHPath{}, err
	}
	if err := p.check(); err != nil {
		return LKHPath{}, err
	}
	return p, nil
}

// check verifies that the path fits a tree: a valid degree, a leaf and a
// root, and a leaf that lies under that root.
func (p LKHPath) check() error {
	switch {
	case p.Degree < MinLKHDegree || p.Degree > MaxLKHDegree:
		return fmt.Errorf("%w: lkh path: degree %d, want %d to %d", ErrMalformed, p.Degree, MinLKHDegree, MaxLKHDegree)
	case len(p.Keys) < 2 || len(p.Keys) > lkhMaxHeight+1:
		return fmt.Errorf("%w: lkh path: %d keys, want 2 to %d", ErrMalformed, len(p.Keys), lkhMaxHeight+1)
	case uint64(p.Leaf) >= capacity(p.Degree, len(p.Keys)-1):
		return fmt.Errorf("%w: lkh path: leaf %d outside a tree of degree %d and height %d", ErrMalformed, p.Leaf, p.Degree, len(p.Keys)-1)
	}
	return nil
}

// MarshalBinary encodes the tree, keys included, so that the key server can
// persist it:
//
//	u8 format (1) ‖ u16 degree ‖ u32 counter ‖ u8 height ‖ u32 leaves
//	‖ for each level from the leaves to the root, each node: u32 version ‖ 32-byte key
//	‖ u32 members ‖ members × (u32 leaf ‖ u8 len(name) ‖ name)
//
// Level l holds ⌈leaves / degree^l⌉ nodes, and the root level one. Members
// are in leaf order. The encoding is secret.
func (t *LKHTree) MarshalBinary() ([]byte, error) {
	size := 1 + 2 + 4 + 1 + 4 + 4
	for _, lvl := range t.levels {
		size += len(lvl) * (4 + GroupKeySize)
	}
	for _, name := range t.names {
		if name != "" {
			size += 4 + 1 + len(name)
		}
	}
	b := make([]byte, 0, size)
	b = append(b, lkhFormat)
	b = binary.BigEndian.AppendUint16(b, uint16(t.degree))
	b = binary.BigEndian.AppendUint32(b, t.counter)
	b = append(b, uint8(t.Height()))
	b = binary.BigEndian.AppendUint32(b, uint32(len(t.names)))
	for _, lvl := range t.levels {
		for _, n := range lvl {
			b = binary.BigEndian.AppendUint32(b, n.version)
			b = append(b, n.key[:]...)
		}
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(t.leafOf)))
	for i, name := range t.names {
		if name != "" {
			b = binary.BigEndian.AppendUint32(b, uint32(i))
			b = append(b, uint8(len(name)))
			b = append(b, name...)
		}
	}
	return b, nil
}

// UnmarshalBinary replaces the tree with one that MarshalBinary encoded. It
// keeps the tree's random source (crypto/rand for a zero LKHTree). Errors
// wrap [ErrMalformed] and leave the tree unchanged.
func (t *LKHTree) UnmarshalBinary(b []byte) error {
	r := reader{what: "lkh tree", b: b}
	if f := r.u8("format"); r.err == nil && f != lkhFormat {
		r.fail("format %d, want %d", f, lkhFormat)
	}
	degree := int(r.u16("degree"))
	counter := r.u32("counter")
	height := int(r.u8("height"))
	leaves := r.u32("leaves")
	if r.err != nil {
		return r.err
	}
	switch {
	case degree < MinLKHDegree || degree > MaxLKHDegree:
		r.fail("degree %d, want %d to %d", degree, MinLKHDegree, MaxLKHDegree)
	case height < 1 || height > lkhMaxHeight:
		r.fail("height %d, want 1 to %d", height, lkhMaxHeight)
	case uint64(leaves) > capacity(degree, height) || (height > 1 && uint64(leaves) <= capacity(degree, height-1)):
		r.fail("%d leaves do not make a tree of degree %d and height %d", leaves, degree, height)
	}
	if r.err != nil {
		return r.err
	}
	nodes := uint64(0)
	sizes := make([]int, height+1)
	for l := range sizes {
		span := capacity(degree, l)
		sizes[l] = int((uint64(leaves) + span - 1) / span)
		if l == height {
			sizes[l] = 1
		}
		nodes += uint64(sizes[l])
	}
	if left := uint64(len(r.b) - r.off); nodes*(4+GroupKeySize) > left {
		r.fail("truncated: %d nodes need %d bytes, %d left", nodes, nodes*(4+GroupKeySize), left)
		return r.err
	}
	levels := make([][]lkhNode, height+1)
	for l, size := range sizes {
		levels[l] = make([]lkhNode, size)
		for i := range levels[l] {
			levels[l][i].version = r.u32("version")
			r.array("key", levels[l][i].key[:])
		}
	}
	count := r.u32("members")
	if r.err == nil && count > leaves {
		r.fail("%d members for %d leaves", count, leaves)
	}
	if r.err != nil {
		return r.err // before sizing anything by count
	}
	leafOf := make(map[string]uint32, count)
	names := make([]string, leaves)
	next := uint32(0) // the lowest leaf the next member may take
	for k := uint32(0); k < count && r.err == nil; k++ {
		i := r.u32("leaf")
		name := string(r.next("name", int(r.u8("name length"))))
		switch {
		case r.err != nil:
		case i >= leaves:
			r.fail("member %d: leaf %d outside %d leaves", k, i, leaves)
		case i < next:
			r.fail("member %d: leaf %d out of order", k, i)
		case name == "":
			r.fail("member %d: empty name", k)
		default:
			if _, dup := leafOf[name]; dup {
				r.fail("member %d: %q listed twice", k, name)
			}
			leafOf[name] = i
			names[i] = name
			next = i + 1
		}
	}
	if err := r.done(); err != nil {
		return err
	}
	t.reset(degree)
	t.counter = counter
	t.levels = levels
	t.leafOf = leafOf
	t.names = names
	for i, name := range names {
		if name == "" {
			t.free = append(t.free, uint32(i)) // ascending: already a heap
		} else {
			t.count(uint32(i), +1)
		}
	}
	return nil
}
