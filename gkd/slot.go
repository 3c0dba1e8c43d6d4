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
	"math/bits"
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
