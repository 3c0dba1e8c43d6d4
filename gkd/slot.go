package gkd

// The slot hash trees of the slotted scheme: Veltri et al., "A novel
// batch-based group key management protocol applied to the Internet of
// Things", Ad Hoc Networks 11(8), 2013.
//
// Time is divided into slots. The key server draws a random 32-byte root per
// tree; a tree of depth D covers 2^D slots, slot i being its leaf i, and
// every node's children follow from it by a one-way function:
//
//	left  = SHA-256("smqtt/v1 slot L" ‖ parent)
//	right = SHA-256("smqtt/v1 slot R" ‖ parent)
//
// (the labels are the 15 ASCII bytes of those strings). A member allowed to
// read slots a to b gets the few subtree roots that cover exactly that range
// ([SlotTree.Cover]): it derives every leaf in the range ([DeriveLeaf]) and,
// the hash being one-way, no other. A leaf is never a key by itself: the slot
// key also depends on the group's current K2, which the key server refreshes
// to revoke members ([SlotKey]).

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"time"
)

// Slot tree limits and labels.
const (
	MaxSlotDepth = 63 // the deepest slot tree: 2^63 slots

	SlotNodeSize = 1 + 8 + 32 // one node in AppendSlotNodes' encoding

	slotLeftLabel  = "smqtt/v1 slot L"
	slotRightLabel = "smqtt/v1 slot R"
	slotKeyInfo    = "smqtt/v1 slot key"
	maxGroupLen    = 255
)

// ErrSlotRange says that slots lie outside a slot tree, or that a range is
// empty.
var ErrSlotRange = errors.New("gkd: slot out of range")

// SlotNode is a node of a slot hash tree, as handed to a member: the root of
// a subtree covering slots First() to Last(). Height counts levels above the
// leaves (0 for a leaf, the tree's depth for its root) and Index the node's
// place among the nodes of that height, so a node is meaningful without
// knowing the tree's depth. Value is secret.
type SlotNode struct {
	Height uint8
	Index  uint64
	Value  [32]byte
}

// First returns the first slot under the node.
func (n SlotNode) First() uint64 { return n.Index << n.Height }

// Last returns the last slot under the node.
func (n SlotNode) Last() uint64 { return n.First() + (1<<n.Height - 1) }

// valid reports whether the node fits a tree of at most MaxSlotDepth levels.
func (n SlotNode) valid() bool {
	return n.Height <= MaxSlotDepth && bits.Len64(n.Index)+int(n.Height) <= MaxSlotDepth
}

// SlotTree is the key server's hash tree for one run of 2^depth slots of a
// slotted group. It holds the root secret.
type SlotTree struct {
	depth int
	root  [32]byte
}

// NewSlotTree returns the tree of the given depth (1 to [MaxSlotDepth]; it
// panics on another) grown from root, which must be 32 random bytes, fresh
// for each tree.
func NewSlotTree(depth int, root [32]byte) *SlotTree {
	if depth < 1 || depth > MaxSlotDepth {
		panic(fmt.Sprintf("gkd: NewSlotTree(%d): depth must be 1 to %d", depth, MaxSlotDepth))
	}
	return &SlotTree{depth: depth, root: root}
}

// Depth returns the tree's depth.
func (t *SlotTree) Depth() int { return t.depth }

// Slots returns the number of slots the tree covers, 2^depth.
func (t *SlotTree) Slots() uint64 { return 1 << t.depth }

// Leaf returns slot i's leaf. Slots outside the tree are an error wrapping
// [ErrSlotRange].
func (t *SlotTree) Leaf(i uint64) ([32]byte, error) {
	if i >= t.Slots() {
		return [32]byte{}, fmt.Errorf("%w: slot %d in a tree of %d slots", ErrSlotRange, i, t.Slots())
	}
	return descend(t.root, i, t.depth), nil
}

// Cover returns the fewest nodes that cover exactly slots a to b (both
// included), in slot order: at most 2·depth nodes, found with at most
// 4·depth hashes. An empty range (a > b) or one outside the tree is an error
// wrapping [ErrSlotRange].
func (t *SlotTree) Cover(a, b uint64) ([]SlotNode, error) {
	if a > b || b >= t.Slots() {
		return nil, fmt.Errorf("%w: slots %d to %d in a tree of %d slots", ErrSlotRange, a, b, t.Slots())
	}
	var nodes []SlotNode
	var walk func(n SlotNode)
	walk = func(n SlotNode) {
		first, last := n.First(), n.Last()
		switch {
		case last < a || first > b:
			return
		case a <= first && last <= b:
			nodes = append(nodes, n)
			return
		}
		left, right := children(n.Value)
		walk(SlotNode{Height: n.Height - 1, Index: 2 * n.Index, Value: left})
		walk(SlotNode{Height: n.Height - 1, Index: 2*n.Index + 1, Value: right})
	}
	walk(SlotNode{Height: uint8(t.depth), Value: t.root})
	return nodes, nil
}

// DeriveLeaf returns slot i's leaf from the nodes a member holds, and false
// if no node covers slot i.
func DeriveLeaf(nodes []SlotNode, i uint64) ([32]byte, bool) {
	for _, n := range nodes {
		if n.valid() && i>>n.Height == n.Index {
			return descend(n.Value, i, int(n.Height)), true
		}
	}
	return [32]byte{}, false
}

// descend derives leaf i from the value of its ancestor height levels up,
// following bits height-1 to 0 of i.
func descend(v [32]byte, i uint64, height int) [32]byte {
	for h := height - 1; h >= 0; h-- {
		if i>>h&1 == 0 {
			v = child(slotLeftLabel, &v)
		} else {
			v = child(slotRightLabel, &v)
		}
	}
	return v
}

func children(v [32]byte) (left, right [32]byte) {
	return child(slotLeftLabel, &v), child(slotRightLabel, &v)
}

func child(label string, parent *[32]byte) [32]byte {
	var b [len(slotLeftLabel) + 32]byte
	copy(b[:], label)
	copy(b[len(label):], parent[:])
	return sha256.Sum256(b[:])
}

// SlotKey returns the key of slot i of tree tree in group, under the
// group's K2 of generation gen:
//
//	HKDF-SHA256(secret = leaf, salt = k2,
//	            info = "smqtt/v1 slot key" ‖ u8 len(group) ‖ group ‖ u32 tree ‖ u64 i ‖ u32 gen,
//	            length = 32)
//
// A leaf alone gives no key, and a member revoked by a K2 refresh cannot
// compute the keys of the new generation from the leaves it holds. It panics
// if group is not 1 to 255 bytes long, as group names are.
func SlotKey(k2 [32]byte, leaf [32]byte, group string, tree uint32, i uint64, gen uint32) [32]byte {
	if len(group) < 1 || len(group) > maxGroupLen {
		panic(fmt.Sprintf("gkd: SlotKey: group name is %d bytes, want 1 to %d", len(group), maxGroupLen))
	}
	var buf [len(slotKeyInfo) + 1 + maxGroupLen + 4 + 8 + 4]byte
	info := append(buf[:0], slotKeyInfo...)
	info = append(info, byte(len(group)))
	info = append(info, group...)
	info = binary.BigEndian.AppendUint32(info, tree)
	info = binary.BigEndian.AppendUint64(info, i)
	info = binary.BigEndian.AppendUint32(info, gen)
	k, err := hkdf.Key(sha256.New, leaf[:], k2[:], string(info), 32)
	if err != nil {
		panic("gkd: SlotKey: HKDF-SHA256 refused a 32-byte output: " + err.Error())
	}
	var out [32]byte
	copy(out[:], k)
	clear(k)
	return out
}

// AppendSlotNodes appends the encoding of a member's cover to b:
//
//	u8 count ‖ count × (u8 height ‖ u64 index ‖ 32-byte value)
//
// It returns an error wrapping [ErrSlotRange] for more than 255 nodes or a
// node outside a tree of [MaxSlotDepth] levels.
func AppendSlotNodes(b []byte, nodes []SlotNode) ([]byte, error) {
	if len(nodes) > 255 {
		return nil, fmt.Errorf("%w: %d slot nodes, more than 255", ErrSlotRange, len(nodes))
	}
	b = append(b, uint8(len(nodes)))
	for k, n := range nodes {
		if !n.valid() {
			return nil, fmt.Errorf("%w: slot node %d: height %d, index %d", ErrSlotRange, k, n.Height, n.Index)
		}
		b = append(b, n.Height)
		b = binary.BigEndian.AppendUint64(b, n.Index)
		b = append(b, n.Value[:]...)
	}
	return b, nil
}

// ParseSlotNodes decodes what AppendSlotNodes encoded. Errors wrap
// [ErrMalformed].
func ParseSlotNodes(b []byte) ([]SlotNode, error) {
	r := reader{what: "slot nodes", b: b}
	n := int(r.u8("count"))
	if r.err == nil && len(b)-r.off != n*SlotNodeSize {
		r.fail("%d nodes need %d bytes, %d left", n, n*SlotNodeSize, len(b)-r.off)
	}
	nodes := make([]SlotNode, 0, n)
	for k := 0; k < n && r.err == nil; k++ {
		var sn SlotNode
		sn.Height = r.u8("height")
		sn.Index = r.u64("index")
		r.array("value", sn.Value[:])
		if r.err == nil && !sn.valid() {
			r.fail("node %d: height %d, index %d outside a tree of %d levels", k, sn.Height, sn.Index, MaxSlotDepth)
		}
		nodes = append(nodes, sn)
	}
	if err := r.done(); err != nil {
		return nil, err
	}
	return nodes, nil
}

// SlotEpochBits is how many low bits of a SLOTTED envelope epoch carry the
// absolute slot; the K2 generation fills the high bits ([SlotEpoch]).
const SlotEpochBits = 24

// SlotEpoch packs a K2 generation and an absolute slot into the 32-bit
// epoch of an envelope: u8 (gen mod 256) ‖ u24 (slot mod 2^24). The epoch only
// names a key among the few a receiver holds (the slots within its skew
// window, under at most two generations), which never collide; the key
// itself is bound to the full slot and generation by [SlotKey].
func SlotEpoch(gen uint32, slot uint64) uint32 {
	return gen<<SlotEpochBits | uint32(slot&(1<<SlotEpochBits-1))
}

// SlotCover is a member's cover within one tree of a slotted group.
type SlotCover struct {
	Tree  uint32
	Nodes []SlotNode
}

// SlotGrant is what a member of a slotted group receives on joining, in the
// Ext of its JoinResponse (the response's Key is the group's K2 and its Epoch
// the K2 generation): the group's clock and the covers of the slots it may
// read. Absolute slot s starts at Origin + s·Slot and is leaf s mod 2^Depth of
// tree s / 2^Depth.
type SlotGrant struct {
	Origin      time.Time     // start of slot 0, whole milliseconds
	Slot        time.Duration // slot length, whole milliseconds, at least 1 ms
	Depth       uint8         // depth of every tree
	Skew        uint8         // slots accepted on either side of the current one
	First, Last uint64        // the absolute slots granted, both included
	Covers      []SlotCover   // in tree order; at most 255
}

// SlotAt returns the absolute slot that server time t falls in, and
// false before the origin.
func (g *SlotGrant) SlotAt(t time.Time) (uint64, bool) {
	d := t.Sub(g.Origin)
	if d < 0 || g.Slot <= 0 {
		return 0, false
	}
	return uint64(d / g.Slot), true
}

// SlotStart returns when absolute slot s starts, in server time.
func (g *SlotGrant) SlotStart(s uint64) time.Time {
	return g.Origin.Add(time.Duration(s) * g.Slot)
}

// Leaf returns absolute slot s's leaf from the grant's covers, and false if
// the grant does not cover s.
func (g *SlotGrant) Leaf(s uint64) ([32]byte, bool) {
	tree := s >> g.Depth
	for _, c := range g.Covers {
		if uint64(c.Tree) == tree {
			return DeriveLeaf(c.Nodes, s&(1<<g.Depth-1))
		}
	}
	return [32]byte{}, false
}

// Key returns the key of absolute slot s of group under K2 k2 of generation
// gen, and false if the grant does not cover s.
func (g *SlotGrant) Key(k2 [32]byte, group string, gen uint32, s uint64) ([32]byte, bool) {
	leaf, ok := g.Leaf(s)
	if !ok {
		return [32]byte{}, false
	}
	return SlotKey(k2, leaf, group, uint32(s>>g.Depth), s&(1<<g.Depth-1), gen), true
}

// SlotCovers returns the covers of absolute slots first to last across the
// trees of the given depth; root returns each tree's root. The range may
// span trees (a grant reaching past the end of the current tree carries the
// next tree's cover: that is how a new tree is announced).
func SlotCovers(depth int, first, last uint64, root func(tree uint32) ([32]byte, error)) ([]SlotCover, error) {
	if depth < 1 || depth > MaxSlotDepth || first > last || last>>depth > math.MaxUint32 {
		return nil, fmt.Errorf("%w: slots %d to %d at depth %d", ErrSlotRange, first, last, depth)
	}
	var covers []SlotCover
	mask := uint64(1)<<depth - 1
	for t := first >> depth; t <= last>>depth; t++ {
		r, err := root(uint32(t))
		if err != nil {
			return nil, err
		}
		a, b := uint64(0), mask
		if t == first>>depth {
			a = first & mask
		}
		if t == last>>depth {
			b = last & mask
		}
		nodes, err := NewSlotTree(depth, r).Cover(a, b)
		if err != nil {
			return nil, err
		}
		covers = append(covers, SlotCover{Tree: uint32(t), Nodes: nodes})
	}
	if len(covers) > 255 {
		return nil, fmt.Errorf("%w: slots %d to %d span %d trees, more than 255", ErrSlotRange, first, last, len(covers))
	}
	return covers, nil
}

// MarshalBinary encodes the grant:
//
//	u64 origin (Unix ms) ‖ u32 slot (ms) ‖ u8 depth ‖ u8 skew ‖ u64 first ‖ u64 last ‖
//	u8 count ‖ count × (u32 tree ‖ slot nodes, see AppendSlotNodes)
func (g SlotGrant) MarshalBinary() ([]byte, error) {
	if err := g.check(); err != nil {
		return nil, err
	}
	b := binary.BigEndian.AppendUint64(nil, uint64(g.Origin.UnixMilli()))
	b = binary.BigEndian.AppendUint32(b, uint32(g.Slot/time.Millisecond))
	b = append(b, g.Depth, g.Skew)
	b = binary.BigEndian.AppendUint64(b, g.First)
	b = binary.BigEndian.AppendUint64(b, g.Last)
	b = append(b, uint8(len(g.Covers)))
	for _, c := range g.Covers {
		b = binary.BigEndian.AppendUint32(b, c.Tree)
		var err error
		if b, err = AppendSlotNodes(b, c.Nodes); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// check validates what both encoding and decoding require.
func (g *SlotGrant) check() error {
	switch {
	case g.Origin.UnixMilli() < 0 || g.Origin.Sub(time.UnixMilli(g.Origin.UnixMilli())) != 0:
		return fmt.Errorf("%w: slot grant origin %v is not a whole millisecond after 1970", ErrMalformed, g.Origin)
	case g.Slot < time.Millisecond || g.Slot%time.Millisecond != 0 || g.Slot/time.Millisecond > math.MaxUint32:
		return fmt.Errorf("%w: slot length %v is not 1 ms to 2^32 ms in whole milliseconds", ErrMalformed, g.Slot)
	case g.Depth < 1 || g.Depth > MaxSlotDepth:
		return fmt.Errorf("%w: slot depth %d (want 1 to %d)", ErrMalformed, g.Depth, MaxSlotDepth)
	case g.First > g.Last || g.Last>>g.Depth > math.MaxUint32:
		return fmt.Errorf("%w: slots %d to %d at depth %d", ErrMalformed, g.First, g.Last, g.Depth)
	case len(g.Covers) > 255:
		return fmt.Errorf("%w: %d slot covers, more than 255", ErrMalformed, len(g.Covers))
	}
	for _, c := range g.Covers {
		for _, n := range c.Nodes {
			if n.Height > g.Depth || !n.valid() || n.Last()>>g.Depth != 0 {
				return fmt.Errorf("%w: slot node %d/%d of tree %d lies outside a tree of depth %d", ErrMalformed, n.Height, n.Index, c.Tree, g.Depth)
			}
		}
	}
	return nil
}

// ParseSlotGrant decodes what SlotGrant.MarshalBinary encoded. Errors wrap
// [ErrMalformed].
func ParseSlotGrant(b []byte) (SlotGrant, error) {
	r := reader{what: "slot grant", b: b}
	var g SlotGrant
	g.Origin = r.time("origin")
	g.Slot = time.Duration(r.u32("slot")) * time.Millisecond
	g.Depth = r.u8("depth")
	g.Skew = r.u8("skew")
	g.First = r.u64("first")
	g.Last = r.u64("last")
	n := int(r.u8("covers"))
	for k := 0; k < n && r.err == nil; k++ {
		c := SlotCover{Tree: r.u32("tree")}
		count := int(r.u8("nodes"))
		raw := r.next("nodes", count*SlotNodeSize)
		if r.err != nil {
			break
		}
		nodes, err := ParseSlotNodes(append([]byte{uint8(count)}, raw...))
		if err != nil {
			r.fail("cover %d: %v", k, err)
			break
		}
		c.Nodes = nodes
		g.Covers = append(g.Covers, c)
	}
	if err := r.done(); err != nil {
		return SlotGrant{}, err
	}
	if err := g.check(); err != nil {
		return SlotGrant{}, err
	}
	return g, nil
}
