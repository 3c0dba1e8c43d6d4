package keyserver

// The etcd store: the key server's state in an etcd cluster that several
// key servers share, one of them leading (ha.go). Layout under the prefix:
//
//	group/<name>           the group's head: its record (without members and
//	                       tree) and the keys of the blobs holding the rest
//	gblob/<name>/<random>  one blob: a shard of the members (by a hash of
//	                       the name, memberShards of them) or a page of the
//	                       key tree's encoding
//	meta/<key>             a server-wide value (anti-replay cache, policy
//	                       version, connection ids), inline or as pages
//	mblob/<key>/<random>   a page of a large meta value
//	election/…             the leader election (concurrency.Election)
//
// Every value is sealed with AES-256-GCM under a key derived from the key
// server's identity (all instances share it) with the value's etcd key as
// associated data: etcd's operators, snapshots and backups see sizes and
// key names (group names, member names never: they sit inside blobs), no
// key material, and cannot move a value to another key.
//
// A commit is one etcd transaction guarded by the leader's election key
// (If CreateRevision(our key) = our revision): a key server that lost its
// leadership commits nothing. Blobs are written under fresh random keys and
// never changed, so a commit too large for one transaction (etcd's limits:
// --max-txn-ops, 128 by default, and --max-request-bytes, 1.5 MiB) first
// writes its new blobs in guarded transactions of their own, then switches
// the head in one: a reader sees the old head or the new one, never a mix.
// Blobs no head names (replaced, or written by a commit that failed) are
// deleted by later commits.

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/smqtt/smqtt/gkd"
)

// EtcdOptions point a key server at an etcd cluster.
type EtcdOptions struct {
	Endpoints   []string
	Prefix      string        // default "/smqtt/"; several key servers share one
	DialTimeout time.Duration // default 5s
	TLS         *tls.Config   // nil: plain connections
	// LeaseTTL is the leader's lease: a leader that stops renewing it (killed,
	// paused, cut off) is replaced this long after its last renewal.
	// Default 3s, at least 2s (etcd's minimum).
	LeaseTTL time.Duration
	// Timeout bounds one store operation (default 5s): a commit that takes
	// longer fails, and the leader steps down.
	Timeout time.Duration
}

// Defaults of EtcdOptions.
const (
	DefaultEtcdPrefix      = "/smqtt/"
	DefaultEtcdDialTimeout = 5 * time.Second
	DefaultEtcdLeaseTTL    = 3 * time.Second
	DefaultEtcdTimeout     = 5 * time.Second
)

func (o *EtcdOptions) setDefaults() {
	if o.Prefix == "" {
		o.Prefix = DefaultEtcdPrefix
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = DefaultEtcdDialTimeout
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = DefaultEtcdLeaseTTL
	}
	o.LeaseTTL = max(o.LeaseTTL, 2*time.Second)
	if o.Timeout <= 0 {
		o.Timeout = DefaultEtcdTimeout
	}
}

// What one etcd transaction may hold, below etcd's defaults (128 operations,
// 1.5 MiB requests) with room for the guard and framing.
const (
	etcdMaxOps    = 100
	etcdMaxBytes  = 1 << 20
	etcdInlineMax = 256 << 10 // larger meta values go in pages
	memberShards  = 256       // a group's members are stored in this many blobs
)

// errNotLeader is a commit refused by the leadership guard.
var errNotLeader = errors.New("keyserver: no longer the leader: the store refused the commit")

type etcdStore struct {
	cli     *clientv3.Client
	prefix  string
	aead    cipher.AEAD
	guard   []clientv3.Cmp // empty: commits are unconditional (tests of the store alone)
	timeout time.Duration

	heads     map[string]*etcdHead // the last committed head of each group
	savedTree map[string][]byte    // the tree that head's pages hold
	metaPages map[string][]string  // the pages of each paged meta value
	garbage   []string             // blob keys no head names: deleted by the next commit
	// broken is the first failed commit: the store's view may then differ
	// from etcd's (a timed-out commit may have been applied), so it commits
	// nothing more; the server steps down and a new term reloads.
	broken error
}

// etcdHead is a group's head: its record and where the rest is.
type etcdHead struct {
	Record json.RawMessage `json:"record"`
	Shards map[int]string  `json:"shards,omitempty"` // member shard -> blob key
	Pages  []string        `json:"pages,omitempty"`  // tree pages in order
}

// storeKey derives the key that seals the store's values from the key
// server's identity.
func storeKey(id *gkd.Identity) ([]byte, error) {
	secret, err := id.MarshalText()
	if err != nil {
		return nil, err
	}
	return hkdf.Key(sha256.New, secret, nil, "smqtt/v1 keyserver store", 32)
}

// newEtcdStore returns a store on cli under prefix whose commits hold only
// while guard does.
func newEtcdStore(cli *clientv3.Client, id *gkd.Identity, prefix string, timeout time.Duration, guard ...clientv3.Cmp) (*etcdStore, error) {
	k, err := storeKey(id)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &etcdStore{
		cli: cli, prefix: prefix, aead: aead, guard: guard, timeout: timeout,
		heads: map[string]*etcdHead{}, savedTree: map[string][]byte{}, metaPages: map[string][]string{},
	}, nil
}

// sealValue and openValue protect one value stored at key.
const sealVersion = 1

func (s *etcdStore) sealValue(key string, plain []byte) []byte {
	out := make([]byte, 1+s.aead.NonceSize(), 1+s.aead.NonceSize()+len(plain)+s.aead.Overhead())
	out[0] = sealVersion
	rand.Read(out[1:])
	return s.aead.Seal(out, out[1:], plain, s.ad(key))
}

func (s *etcdStore) openValue(key string, v []byte) ([]byte, error) {
	n := s.aead.NonceSize()
	if len(v) < 1+n || v[0] != sealVersion {
		return nil, fmt.Errorf("value at %s: not a sealed value of this version", key)
	}
	p, err := s.aead.Open(nil, v[1:1+n], v[1+n:], s.ad(key))
	if err != nil {
		return nil, fmt.Errorf("value at %s: does not open under this key server's identity: %w", key, err)
	}
	return p, nil
}

func (s *etcdStore) ad(key string) []byte { return append([]byte("smqtt/v1 store\x00"), key...) }

func (s *etcdStore) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), s.timeout)
}

func (s *etcdStore) close() error { return nil } // the client is the caller's

func (s *etcdStore) blobKey(kind, name string) string {
	var r [12]byte
	rand.Read(r[:])
	return s.prefix + kind + "/" + name + "/" + hex.EncodeToString(r[:])
}

func memberShard(name string) int {
	h := fnv.New32a()
	h.Write([]byte(name))
	return int(h.Sum32() % memberShards)
}

// txn commits ops in one guarded transaction.
func (s *etcdStore) txn(ops []clientv3.Op) error {
	ctx, cancel := s.ctx()
	defer cancel()
	resp, err := s.cli.Txn(ctx).If(s.guard...).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("keyserver: etcd commit: %w", err)
	}
	if !resp.Succeeded {
		return errNotLeader
	}
	return nil
}

// commit writes blobs, then heads with the deletions that fit, in one
// transaction when everything fits, else blobs first in as many as needed
// and the heads last (the commit point), then the remaining deletions.
func (s *etcdStore) commit(blobs, heads []clientv3.Op, size int, dels []string) error {
	if s.broken != nil {
		return fmt.Errorf("keyserver: the store is out of step with etcd after a failed commit: %w", s.broken)
	}
	err := s.commitOps(blobs, heads, size, dels)
	if err != nil {
		s.broken = err
	}
	return err
}

func (s *etcdStore) commitOps(blobs, heads []clientv3.Op, size int, dels []string) error {
	delOps := make([]clientv3.Op, len(dels))
	for i, k := range dels {
		delOps[i] = clientv3.OpDelete(k)
	}
	if len(blobs)+len(heads)+len(delOps) <= etcdMaxOps && size <= etcdMaxBytes {
		return s.txn(slices.Concat(blobs, heads, delOps))
	}
	var batch []clientv3.Op
	n := 0
	for _, op := range blobs {
		sz := len(op.ValueBytes())
		if len(batch) > 0 && (len(batch) >= etcdMaxOps || n+sz > etcdMaxBytes) {
			if err := s.txn(batch); err != nil {
				return err
			}
			batch, n = nil, 0
		}
		batch, n = append(batch, op), n+sz
	}
	if len(batch) > 0 {
		if err := s.txn(batch); err != nil {
			return err
		}
	}
	for len(heads) > 0 || len(delOps) > 0 {
		k := min(len(delOps), etcdMaxOps-len(heads))
		if err := s.txn(slices.Concat(heads, delOps[:k])); err != nil {
			return err
		}
		heads, delOps = nil, delOps[k:]
	}
	return nil
}

func (s *etcdStore) loadGroup(name string) (*groupRecord, error) {
	rec, err := s.load(name)
	if err != nil {
		return nil, fmt.Errorf("keyserver: load group %q: %w", name, err)
	}
	return rec, nil
}

func (s *etcdStore) load(name string) (*groupRecord, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	hk := s.prefix + "group/" + name
	resp, err := s.cli.Get(ctx, hk)
	if err != nil {
		return nil, err
	}
	delete(s.heads, name)
	delete(s.savedTree, name)
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	plain, err := s.openValue(hk, resp.Kvs[0].Value)
	if err != nil {
		return nil, err
	}
	head := new(etcdHead)
	if err := json.Unmarshal(plain, head); err != nil {
		return nil, err
	}
	rec := new(groupRecord)
	if err := json.Unmarshal(head.Record, rec); err != nil {
		return nil, err
	}
	blobs, err := s.cli.Get(ctx, s.prefix+"gblob/"+name+"/", clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision))
	if err != nil {
		return nil, err
	}
	named := map[string]bool{}
	for _, k := range head.Shards {
		named[k] = true
	}
	for _, k := range head.Pages {
		named[k] = true
	}
	found := map[string][]byte{}
	for _, kv := range blobs.Kvs {
		k := string(kv.Key)
		if !named[k] {
			s.garbage = append(s.garbage, k)
			continue
		}
		if found[k], err = s.openValue(k, kv.Value); err != nil {
			return nil, err
		}
	}
	rec.Joined = map[string]*joinedMember{}
	for sh, k := range head.Shards {
		v, ok := found[k]
		if !ok {
			return nil, fmt.Errorf("member shard %d: blob missing", sh)
		}
		var part map[string]*joinedMember
		if err := json.Unmarshal(v, &part); err != nil {
			return nil, fmt.Errorf("member shard %d: %w", sh, err)
		}
		maps.Copy(rec.Joined, part)
	}
	if rec.TreeLen > 0 {
		tree := make([]byte, 0, rec.TreeLen)
		for i, k := range head.Pages {
			v, ok := found[k]
			if !ok {
				return nil, fmt.Errorf("key tree page %d: blob missing", i)
			}
			tree = append(tree, v...)
		}
		if len(tree) != rec.TreeLen {
			return nil, fmt.Errorf("key tree: %d bytes stored, the record says %d", len(tree), rec.TreeLen)
		}
		rec.Tree = tree
		s.savedTree[name] = slices.Clone(tree)
	}
	s.heads[name] = head
	return rec, nil
}

// saveGroup commits a group: its record, the member shards that hold a
// member changed since the last commit, and the tree pages that changed.
func (s *etcdStore) saveGroup(name string, rec *groupRecord) error {
	head := *rec
	head.Joined, head.Tree, head.TreeLen = nil, nil, len(rec.Tree)
	recJSON, err := json.Marshal(&head)
	if err != nil {
		return err
	}
	old := s.heads[name]
	if old == nil {
		old = &etcdHead{}
	}
	nh := &etcdHead{Record: recJSON, Shards: maps.Clone(old.Shards)}
	if nh.Shards == nil {
		nh.Shards = map[int]string{}
	}
	var blobs []clientv3.Op
	var dels []string
	size := 0
	put := func(key string, plain []byte) {
		v := s.sealValue(key, plain)
		blobs = append(blobs, clientv3.OpPut(key, string(v)))
		size += len(key) + len(v)
	}
	dirty := map[int]bool{}
	for n := range rec.dirty {
		dirty[memberShard(n)] = true
	}
	if len(dirty) > 0 {
		parts := map[int]map[string]*joinedMember{}
		for n, jm := range rec.Joined {
			if sh := memberShard(n); dirty[sh] {
				if parts[sh] == nil {
					parts[sh] = map[string]*joinedMember{}
				}
				parts[sh][n] = jm
			}
		}
		for _, sh := range slices.Sorted(maps.Keys(dirty)) {
			if k, ok := nh.Shards[sh]; ok {
				dels = append(dels, k)
				delete(nh.Shards, sh)
			}
			if len(parts[sh]) == 0 {
				continue
			}
			b, err := json.Marshal(parts[sh])
			if err != nil {
				return err
			}
			k := s.blobKey("gblob", name)
			put(k, b)
			nh.Shards[sh] = k
		}
	}
	oldTree := s.savedTree[name]
	page := func(t []byte, i int) []byte {
		if i*treePage >= len(t) {
			return nil
		}
		return t[i*treePage : min(len(t), (i+1)*treePage)]
	}
	for i := 0; i < len(old.Pages) || i*treePage < len(rec.Tree); i++ {
		p := page(rec.Tree, i)
		if i < len(old.Pages) {
			if p != nil && bytes.Equal(p, page(oldTree, i)) {
				nh.Pages = append(nh.Pages, old.Pages[i])
				continue
			}
			dels = append(dels, old.Pages[i])
		}
		if p != nil {
			k := s.blobKey("gblob", name)
			put(k, p)
			nh.Pages = append(nh.Pages, k)
		}
	}
	hb, err := json.Marshal(nh)
	if err != nil {
		return err
	}
	hk := s.prefix + "group/" + name
	hv := s.sealValue(hk, hb)
	dels = append(dels, s.garbage...)
	if err := s.commit(blobs, []clientv3.Op{clientv3.OpPut(hk, string(hv))}, size+len(hk)+len(hv), dels); err != nil {
		return err
	}
	s.garbage = nil
	s.heads[name] = nh
	clear(rec.dirty)
	s.savedTree[name] = append(oldTree[:0], rec.Tree...)
	return nil
}

// A meta value is stored inline (a 0 byte, then the value) or in pages (a
// 1 byte, then the JSON list of its pages' keys).
func (s *etcdStore) getMeta(key []byte) ([]byte, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	mk := s.prefix + "meta/" + string(key)
	resp, err := s.cli.Get(ctx, mk)
	if err != nil {
		return nil, fmt.Errorf("keyserver: etcd read %s: %w", key, err)
	}
	delete(s.metaPages, string(key))
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	v, err := s.openValue(mk, resp.Kvs[0].Value)
	if err != nil || len(v) == 0 {
		return nil, err
	}
	if v[0] == 0 {
		return v[1:], nil
	}
	var pages []string
	if err := json.Unmarshal(v[1:], &pages); err != nil {
		return nil, err
	}
	blobs, err := s.cli.Get(ctx, s.prefix+"mblob/"+string(key)+"/", clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision))
	if err != nil {
		return nil, err
	}
	found := map[string][]byte{}
	named := map[string]bool{}
	for _, k := range pages {
		named[k] = true
	}
	for _, kv := range blobs.Kvs {
		if !named[string(kv.Key)] {
			s.garbage = append(s.garbage, string(kv.Key))
			continue
		}
		if found[string(kv.Key)], err = s.openValue(string(kv.Key), kv.Value); err != nil {
			return nil, err
		}
	}
	var out []byte
	for i, k := range pages {
		p, ok := found[k]
		if !ok {
			return nil, fmt.Errorf("keyserver: meta %s: page %d missing", key, i)
		}
		out = append(out, p...)
	}
	s.metaPages[string(key)] = pages
	return out, nil
}

func (s *etcdStore) putMeta(key, value []byte) error {
	mk := s.prefix + "meta/" + string(key)
	dels := slices.Concat(s.metaPages[string(key)], s.garbage)
	var blobs []clientv3.Op
	var pages []string
	size := 0
	plain := append([]byte{0}, value...)
	if len(value) > etcdInlineMax {
		for off := 0; off < len(value); off += treePage {
			k := s.blobKey("mblob", string(key))
			v := s.sealValue(k, value[off:min(len(value), off+treePage)])
			blobs = append(blobs, clientv3.OpPut(k, string(v)))
			size += len(k) + len(v)
			pages = append(pages, k)
		}
		b, _ := json.Marshal(pages)
		plain = append([]byte{1}, b...)
	}
	mv := s.sealValue(mk, plain)
	if err := s.commit(blobs, []clientv3.Op{clientv3.OpPut(mk, string(mv))}, size+len(mk)+len(mv), dels); err != nil {
		return err
	}
	s.garbage = nil
	s.metaPages[string(key)] = pages
	return nil
}
