package keyserver

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bucketGroups = []byte("groups")
	bucketMeta   = []byte("meta")
	keyReplay    = []byte("replay")
	keyPolicy    = []byte("policy-version")
)

// groupRecord is what the store keeps of a group: enough to carry on after
// a restart with the same keys, members and counters.
type groupRecord struct {
	Scheme     string                   `json:"scheme"`
	Epoch      uint32                   `json:"epoch"`
	Key        []byte                   `json:"key"`
	Counter    uint64                   `json:"counter"`
	NextSender uint64                   `json:"next_sender"`
	Joined     map[string]*joinedMember `json:"joined"`
	// Leaving are members whose leave was accepted and whose rekey has not
	// happened yet: a restart in between still rekeys them out.
	Leaving []string `json:"leaving,omitempty"`
	// Revoking: the next rekey removes a revoked member (the old epoch then
	// stays open only for send_grace).
	Revoking bool `json:"revoking,omitempty"`
	// Revoked are members a configuration reload removed from the group: no
	// key server re-admits them, whatever its configuration file says, until
	// a reload adds them back (revoke.go).
	Revoked []string `json:"revoked,omitempty"`
	// Tree is an lkh group's key tree ([gkd.LKHTree.MarshalBinary]); secret
	// like Key. It is stored in pages of its own; TreeLen is its length.
	Tree    []byte `json:"tree,omitempty"`
	TreeLen int    `json:"tree_len,omitempty"`
	// A slotted group's clock and trees (Key is its K2, Epoch K2's
	// generation): slot 0 starts at SlotOrigin (Unix ms); SlotRoots are the
	// secret roots of the trees grants still reach; RevokedUntil (Unix ms) is
	// how far the covers of revoked members reach.
	SlotOrigin   int64             `json:"slot_origin,omitempty"`
	SlotMS       int64             `json:"slot_ms,omitempty"`
	SlotDepth    int               `json:"slot_depth,omitempty"`
	SlotRoots    map[uint32][]byte `json:"slot_roots,omitempty"`
	RevokedUntil int64             `json:"revoked_until,omitempty"`
	// A sender_auth group's roster (roster.go): its version, never reused,
	// and the sender ids of members that left, listed until their Until.
	RosterVersion uint64          `json:"roster_version,omitempty"`
	Retired       []retiredSender `json:"retired,omitempty"`

	// dirty names the members changed since the last commit: change
	// Joined only through put and drop.
	dirty map[string]bool
}

// put makes name a joined member with jm (a new value: never change a
// stored joinedMember in place).
func (rec *groupRecord) put(name string, jm *joinedMember) {
	rec.Joined[name] = jm
	rec.mark(name)
}

// enter makes m a joined member under a fresh sender id, recording the
// identity the id is handed to, and returns the id.
func (rec *groupRecord) enter(m *member, since, until time.Time) uint64 {
	key := m.pk.SigningKey()
	jm := &joinedMember{Sender: rec.NextSender, Since: since, Until: until, ID: slices.Clone(m.id[:]), SignKey: key[:]}
	rec.NextSender++
	rec.put(m.name, jm)
	return jm.Sender
}

// drop removes a joined member.
func (rec *groupRecord) drop(name string) {
	delete(rec.Joined, name)
	rec.mark(name)
}

func (rec *groupRecord) mark(name string) {
	if rec.dirty == nil {
		rec.dirty = map[string]bool{}
	}
	rec.dirty[name] = true
}

// joinedMember is a member currently holding the group key.
type joinedMember struct {
	Sender uint64    `json:"sender"`
	Since  time.Time `json:"since"`
	Until  time.Time `json:"until,omitzero"` // slotted: the end of its grant
	// the identity Sender was handed to (its id and Ed25519 key): what a
	// roster certifies for Sender, only while that identity is allowed
	ID      []byte `json:"id,omitempty"`
	SignKey []byte `json:"sign_key,omitempty"`
}

// stateStore is where the key server keeps its state: a bbolt file
// (boltStore, one key server) or etcd (etcdStore, several key servers of
// which one leads). Every change that a reply depends on (a new epoch, a
// sender id, a member joining or leaving) is committed before the reply
// goes out; a commit that fails leaves the caller's state uncommitted.
type stateStore interface {
	// loadGroup returns the group's committed record, nil if there is none.
	loadGroup(name string) (*groupRecord, error)
	// saveGroup commits the group's record and the members it marks dirty.
	saveGroup(name string, rec *groupRecord) error
	// getMeta returns a server-wide value (nil if unset); putMeta commits one.
	getMeta(key []byte) ([]byte, error)
	putMeta(key, value []byte) error
	close() error
}

// boltStore is the key server's bbolt database. Every change that a reply
// depends on (a new epoch, a sender id, a member joining or leaving) is
// committed before the reply goes out.
//
// A group is kept in three parts, so that a commit writes what changed and
// not the whole group (a 100,000-member lkh group is megabytes): its record
// (JSON, without members and tree) in bucket "groups"; each joined member
// under its name in bucket "joined" → group; the key tree's encoding in
// 64 KiB pages in bucket "tree" → group, only the pages that changed.
type boltStore struct {
	db *bolt.DB

	// the tree each group's last commit wrote, compared page by page
	// against the next
	savedTree map[string][]byte
}

var (
	bucketJoined = []byte("joined")
	bucketTree   = []byte("tree")
)

// treePage is the size of one stored page of a key tree's encoding.
const treePage = 64 << 10

func openStore(path string) (*boltStore, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("keyserver: open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketGroups, bucketMeta, bucketJoined, bucketTree} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("keyserver: init store %s: %w", path, err)
	}
	return &boltStore{db: db, savedTree: map[string][]byte{}}, nil
}

func (s *boltStore) close() error { return s.db.Close() }

func (s *boltStore) loadGroup(name string) (*groupRecord, error) {
	var rec *groupRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketGroups).Get([]byte(name))
		if v == nil {
			return nil
		}
		rec = new(groupRecord)
		if err := json.Unmarshal(v, rec); err != nil {
			return err
		}
		if rec.Joined == nil {
			rec.Joined = map[string]*joinedMember{}
		}
		for n := range rec.Joined {
			rec.mark(n) // an older store's inline members: to be written apart
		}
		// Members and tree pages (a record of an older store holds them
		// inline; they are written apart at its next commit).
		if jb := tx.Bucket(bucketJoined).Bucket([]byte(name)); jb != nil {
			if err := jb.ForEach(func(k, v []byte) error {
				jm := new(joinedMember)
				if err := json.Unmarshal(v, jm); err != nil {
					return fmt.Errorf("member %q: %w", k, err)
				}
				rec.Joined[string(k)] = jm
				return nil
			}); err != nil {
				return err
			}
		}
		if tb := tx.Bucket(bucketTree).Bucket([]byte(name)); tb != nil && rec.TreeLen > 0 {
			tree := make([]byte, 0, rec.TreeLen)
			c := tb.Cursor()
			for k, v := c.First(); k != nil; k, v = c.Next() {
				tree = append(tree, v...)
			}
			if len(tree) != rec.TreeLen {
				return fmt.Errorf("key tree: %d bytes stored, the record says %d", len(tree), rec.TreeLen)
			}
			rec.Tree = tree
			s.savedTree[name] = append([]byte(nil), tree...)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("keyserver: load group %q: %w", name, err)
	}
	return rec, nil
}

// saveGroup commits a group: its record, the members that joined, changed
// or left since the last commit, and the tree pages that changed.
func (s *boltStore) saveGroup(name string, rec *groupRecord) error {
	head := *rec
	head.Joined, head.Tree, head.TreeLen = nil, nil, len(rec.Tree)
	v, err := json.Marshal(&head)
	if err != nil {
		return err
	}
	oldTree := s.savedTree[name]
	err = s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketGroups).Put([]byte(name), v); err != nil {
			return err
		}
		jb, err := tx.Bucket(bucketJoined).CreateBucketIfNotExists([]byte(name))
		if err != nil {
			return err
		}
		// in key order: bbolt appends sorted keys far faster than scattered ones
		for _, n := range slices.Sorted(maps.Keys(rec.dirty)) {
			jm, ok := rec.Joined[n]
			if !ok {
				if err := jb.Delete([]byte(n)); err != nil {
					return err
				}
				continue
			}
			b, err := json.Marshal(jm)
			if err != nil {
				return err
			}
			if err := jb.Put([]byte(n), b); err != nil {
				return err
			}
		}
		tb, err := tx.Bucket(bucketTree).CreateBucketIfNotExists([]byte(name))
		if err != nil {
			return err
		}
		return putPages(tb, oldTree, rec.Tree)
	})
	if err != nil {
		return err
	}
	clear(rec.dirty)
	s.savedTree[name] = append(oldTree[:0], rec.Tree...)
	return nil
}

// putPages writes the pages of tree that differ from old, and deletes the
// pages old had beyond tree's end.
func putPages(b *bolt.Bucket, old, tree []byte) error {
	page := func(t []byte, i int) []byte {
		if i*treePage >= len(t) {
			return nil
		}
		return t[i*treePage : min(len(t), (i+1)*treePage)]
	}
	for i := 0; i*treePage < max(len(old), len(tree)); i++ {
		key := binary.BigEndian.AppendUint32(nil, uint32(i))
		p := page(tree, i)
		switch {
		case p == nil:
			if err := b.Delete(key); err != nil {
				return err
			}
		case !bytes.Equal(p, page(old, i)):
			if err := b.Put(key, p); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *boltStore) getMeta(key []byte) ([]byte, error) {
	var out []byte
	s.db.View(func(tx *bolt.Tx) error {
		out = append([]byte(nil), tx.Bucket(bucketMeta).Get(key)...)
		return nil
	})
	return out, nil
}

func (s *boltStore) putMeta(key, value []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).Put(key, value)
	})
}
