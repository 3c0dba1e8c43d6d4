package keyserver

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// A commit writes the members and tree pages that changed; what a restart
// loads is what was committed, including from a store written by an older
// version with members and tree inline in the group's record.
func TestStoreCommitsChangesAndReadsOlderRecords(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ks.db")
	since := time.UnixMilli(1_700_000_000_000).UTC()
	tree := bytes.Repeat([]byte{7}, 3*treePage+100)
	old := groupRecord{Scheme: "lkh", Epoch: 3, Key: make([]byte, 32), NextSender: 3, Tree: tree,
		Joined: map[string]*joinedMember{"a": {Sender: 1, Since: since}, "b": {Sender: 2, Since: since}}}
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := json.Marshal(&old)
	if err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketGroups)
		if err != nil {
			return err
		}
		return b.Put([]byte("g"), v)
	}); err != nil {
		t.Fatal(err)
	}
	db.Close()

	reopen := func() (*boltStore, *groupRecord) {
		t.Helper()
		st, err := openStore(path)
		if err != nil {
			t.Fatal(err)
		}
		rec, err := st.loadGroup("g")
		if err != nil {
			t.Fatal(err)
		}
		return st, rec
	}
	st, rec := reopen()
	if len(rec.Joined) != 2 || !bytes.Equal(rec.Tree, tree) || rec.Epoch != 3 {
		t.Fatalf("older record loaded as %d members, tree equal %t, epoch %d", len(rec.Joined), bytes.Equal(rec.Tree, tree), rec.Epoch)
	}
	rec.drop("a")
	rec.put("c", &joinedMember{Sender: 3, Since: since})
	rec.Tree = append(append([]byte{}, tree[:treePage+5]...), 9) // shorter, one byte changed
	rec.Epoch = 4
	if err := st.saveGroup("g", rec); err != nil {
		t.Fatal(err)
	}
	if len(rec.dirty) != 0 {
		t.Fatalf("%d members still marked after a commit", len(rec.dirty))
	}
	// pages past the shorter tree are gone
	pages := 0
	st.db.View(func(tx *bolt.Tx) error { pages = tx.Bucket(bucketTree).Bucket([]byte("g")).Stats().KeyN; return nil })
	if pages != 2 {
		t.Fatalf("%d tree pages stored, want 2 for %d bytes", pages, len(rec.Tree))
	}
	st.close()

	st, again := reopen()
	defer st.close()
	if _, ok := again.Joined["a"]; ok || again.Joined["c"] == nil || again.Joined["b"].Sender != 2 || len(again.Joined) != 2 {
		t.Fatalf("members after restart: %v", again.Joined)
	}
	if !bytes.Equal(again.Tree, rec.Tree) || again.Epoch != 4 {
		t.Fatalf("tree equal %t, epoch %d after restart", bytes.Equal(again.Tree, rec.Tree), again.Epoch)
	}
}
