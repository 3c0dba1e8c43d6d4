package keyserver

import (
	"encoding/json"
	"fmt"
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
	// Tree is an lkh group's key tree ([gkd.LKHTree.MarshalBinary]); secret
	// like Key.
	Tree []byte `json:"tree,omitempty"`
	// A slotted group's clock and trees (Key is its K2, Epoch K2's
	// generation): slot 0 starts at SlotOrigin (Unix ms); SlotRoots are the
	// secret roots of the trees grants still reach; RevokedUntil (Unix ms) is
	// how far the covers of revoked members reach.
	SlotOrigin   int64             `json:"slot_origin,omitempty"`
	SlotMS       int64             `json:"slot_ms,omitempty"`
	SlotDepth    int               `json:"slot_depth,omitempty"`
	SlotRoots    map[uint32][]byte `json:"slot_roots,omitempty"`
	RevokedUntil int64             `json:"revoked_until,omitempty"`
}

// joinedMember is a member currently holding the group key.
type joinedMember struct {
	Sender uint64    `json:"sender"`
	Since  time.Time `json:"since"`
	Until  time.Time `json:"until,omitzero"` // slotted: the end of its grant
}

// store is the key server's bbolt database. Every change that a reply
// depends on (a new epoch, a sender id, a member joining or leaving) is
// committed before the reply goes out.
type store struct{ db *bolt.DB }

func openStore(path string) (*store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("keyserver: open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketGroups, bucketMeta} {
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
	return &store{db: db}, nil
}

func (s *store) close() error { return s.db.Close() }

func (s *store) loadGroup(name string) (*groupRecord, error) {
	var rec *groupRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketGroups).Get([]byte(name))
		if v == nil {
			return nil
		}
		rec = new(groupRecord)
		return json.Unmarshal(v, rec)
	})
	if err != nil {
		return nil, fmt.Errorf("keyserver: load group %q: %w", name, err)
	}
	return rec, nil
}

func (s *store) saveGroup(name string, rec *groupRecord) error {
	v, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketGroups).Put([]byte(name), v)
	})
}

func (s *store) getMeta(key []byte) []byte {
	var out []byte
	s.db.View(func(tx *bolt.Tx) error {
		out = append([]byte(nil), tx.Bucket(bucketMeta).Get(key)...)
		return nil
	})
	return out
}

func (s *store) putMeta(key, value []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).Put(key, value)
	})
}
