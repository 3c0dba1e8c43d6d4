package keyserver

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/smqtt/smqtt/gkd"
	"github.com/smqtt/smqtt/internal/etcdtest"
)

func etcdClient(t *testing.T, endpoints []string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// The etcd store keeps what the bbolt one keeps (a group's record, its
// members, its key tree in pages, meta values small and large), writes only
// what changed, leaves no blob behind that no head names, and stores every
// value sealed: the raw values hold no byte string of a key.
func TestEtcdStoreRoundTripAndSealed(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cli := etcdClient(t, c.Endpoints())
	id, err := gkd.GenerateIdentity(gkd.SuiteX25519)
	if err != nil {
		t.Fatal(err)
	}
	open := func() *etcdStore {
		st, err := newEtcdStore(cli, id, "/t/", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	since := time.UnixMilli(1_700_000_000_000).UTC()
	key := randomKey()
	tree := bytes.Repeat(randomKey(), (20*treePage+100)/32) // 20 pages: more than one transaction's bytes
	seed := randomKey()
	rec := &groupRecord{Scheme: "lkh", Epoch: 3, Key: key, NextSender: 300, Tree: tree, Joined: map[string]*joinedMember{},
		SlotRoots: map[uint32][]byte{7: seed}, Leaving: []string{"m1"}, Revoked: []string{"m2"}}
	for i := range 300 { // more members than shards
		rec.put(string(rune('a'+i%26))+string(rune('a'+i/26)), &joinedMember{Sender: uint64(i), Since: since})
	}
	st := open()
	if err := st.saveGroup("g", rec); err != nil {
		t.Fatal(err)
	}
	if len(rec.dirty) != 0 {
		t.Fatalf("%d members still marked after a commit", len(rec.dirty))
	}
	again, err := open().loadGroup("g")
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Joined) != 300 || !bytes.Equal(again.Tree, tree) || again.Epoch != 3 || !bytes.Equal(again.Key, key) ||
		!bytes.Equal(again.SlotRoots[7], seed) || again.Leaving[0] != "m1" || again.Revoked[0] != "m2" {
		t.Fatalf("loaded %d members, tree equal %t, epoch %d, key equal %t", len(again.Joined), bytes.Equal(again.Tree, tree), again.Epoch, bytes.Equal(again.Key, key))
	}

	// change a little: one member out, one in, a shorter tree with one byte changed
	again.drop("aa")
	again.put("zz", &joinedMember{Sender: 301, Since: since})
	again.Tree = append(append([]byte{}, tree[:treePage+5]...), 9)
	again.Epoch = 4
	st2 := open()
	if _, err := st2.loadGroup("g"); err != nil {
		t.Fatal(err)
	}
	if err := st2.saveGroup("g", again); err != nil {
		t.Fatal(err)
	}
	third, err := open().loadGroup("g")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := third.Joined["aa"]; ok || third.Joined["zz"] == nil || len(third.Joined) != 300 || !bytes.Equal(third.Tree, again.Tree) || third.Epoch != 4 {
		t.Fatalf("after a change: %d members, tree equal %t, epoch %d", len(third.Joined), bytes.Equal(third.Tree, again.Tree), third.Epoch)
	}

	// meta values, small and paged
	big := bytes.Repeat([]byte("r"), 3*etcdInlineMax)
	if err := st2.putMeta([]byte("small"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	if err := st2.putMeta([]byte("big"), big); err != nil {
		t.Fatal(err)
	}
	if err := st2.putMeta([]byte("big"), big[:10]); err != nil { // its pages go
		t.Fatal(err)
	}
	if v, err := open().getMeta([]byte("big")); err != nil || !bytes.Equal(v, big[:10]) {
		t.Fatalf("meta big: %d bytes, %v", len(v), err)
	}
	if err := st2.putMeta([]byte("big"), big); err != nil {
		t.Fatal(err)
	}
	if v, err := open().getMeta([]byte("big")); err != nil || !bytes.Equal(v, big) {
		t.Fatalf("meta big: %d bytes, %v", len(v), err)
	}

	// every blob stored is named by a head; nothing in etcd holds a key
	ctx := context.Background()
	all, err := cli.Get(ctx, "/t/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	blobs := 0
	pages := len(st2.heads["g"].Pages) + len(st2.heads["g"].Shards)
	for _, kv := range all.Kvs {
		if bytes.HasPrefix(kv.Key, []byte("/t/gblob/")) {
			blobs++
		}
		for _, secret := range [][]byte{key, seed, tree[:32], []byte(`"zz"`), []byte("rrrrrrrr")} {
			if bytes.Contains(kv.Value, secret) || bytes.Contains(kv.Key, secret) {
				t.Fatalf("%s holds a secret in clear", kv.Key)
			}
		}
	}
	if blobs != pages {
		t.Fatalf("%d group blobs in etcd, the head names %d", blobs, pages)
	}
	// a value moved to another key does not open
	hv, _ := cli.Get(ctx, "/t/group/g")
	if _, err := st2.openValue("/t/group/h", hv.Kvs[0].Value); err == nil {
		t.Fatal("a head opened under another key")
	}
	// another identity opens nothing
	other, _ := gkd.GenerateIdentity(gkd.SuiteX25519)
	ost, _ := newEtcdStore(cli, other, "/t/", 5*time.Second)
	if _, err := ost.loadGroup("g"); err == nil {
		t.Fatal("another identity loaded the group")
	}
}

// A commit holds only while the guard does: once another key server leads
// (the guard's key changed), the store commits nothing, and stays refusing.
func TestEtcdStoreGuard(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cli := etcdClient(t, c.Endpoints())
	id, _ := gkd.GenerateIdentity(gkd.SuiteX25519)
	ctx := context.Background()
	put, err := cli.Put(ctx, "/t/election/me", "x")
	if err != nil {
		t.Fatal(err)
	}
	guard := clientv3.Compare(clientv3.CreateRevision("/t/election/me"), "=", put.Header.Revision)
	st, _ := newEtcdStore(cli, id, "/t/", 5*time.Second, guard)
	rec := &groupRecord{Scheme: "update", Epoch: 1, Key: randomKey(), Joined: map[string]*joinedMember{}}
	if err := st.saveGroup("g", rec); err != nil {
		t.Fatal(err)
	}
	cli.Delete(ctx, "/t/election/me")
	cli.Put(ctx, "/t/election/me", "someone else")
	rec.Epoch, rec.Key = 2, randomKey()
	if err := st.saveGroup("g", rec); !errors.Is(err, errNotLeader) {
		t.Fatalf("commit after losing the guard: %v", err)
	}
	if err := st.putMeta([]byte("k"), []byte("v")); err == nil {
		t.Fatal("a store that failed a commit committed again")
	}
	got, err := newEtcdStore(cli, id, "/t/", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r, _ := got.loadGroup("g"); r == nil || r.Epoch != 1 {
		t.Fatalf("stored group after a refused commit: %+v", r)
	}
}
