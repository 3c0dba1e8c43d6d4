package config

import (
	"fmt"
	"time"
)

// Keyserver is the "keyserver:" section: the central, trusted service that
// admits members to groups and hands out group keys over MQTT.
type Keyserver struct {
	// Identity is the key server's private key file (from smqtt keygen).
	Identity string `yaml:"identity"`
	// Upstream is the broker the key server talks to its members through.
	Upstream Upstream `yaml:"upstream"`
	// TopicPrefix starts every key-distribution topic (default "smqtt/v1").
	TopicPrefix string `yaml:"topic_prefix"`
	// Store is the key server's bbolt database file (default
	// "data/keyserver.db"); empty when the state is in etcd (Etcd).
	Store string `yaml:"-"`
	// Etcd is set when keyserver.store is {etcd: {...}}: the state is in an
	// etcd cluster that several key servers share, one of them leading.
	Etcd *EtcdStore `yaml:"-"`
	// StoreSpec is keyserver.store as written: a path, or {etcd: {...}}.
	StoreSpec StoreSpec `yaml:"store"`
	// Members are the identities the key server knows, by name.
	Members []Member `yaml:"members"`
	// KEM is the key encapsulation used to encrypt key-distribution messages
	// to members (default hybrid).
	KEM KEM `yaml:"kem"`
	// Heartbeat is how often the key server signs a heartbeat per group
	// (default 10s). Sidecars stop sealing after their max_staleness
	// without one, so keep it well below that.
	Heartbeat time.Duration `yaml:"heartbeat"`
	// LeaveDelay is how long a member whose Will announced its leave stays
	// suspended, and is challenged, before it is removed (default 30s; 0
	// removes it at once).
	LeaveDelay time.Duration `yaml:"leave_delay"`
	// Groups are the groups, their topics and who may join them.
	Groups []Group `yaml:"groups"`
	// MetricsListen is the host:port serving /metrics and /healthz; empty
	// turns them off.
	MetricsListen string `yaml:"metrics_listen"`
}

// Member is an identity the key server knows: a name for the configuration
// and its public key.
type Member struct {
	Name            string `yaml:"name"`
	PublicKeySource `yaml:",inline"`
}

// KEM names the key encapsulation of key-distribution messages.
type KEM string

const (
	KEMHybrid KEM = "hybrid" // ML-KEM-768 + X25519: safe against a future quantum adversary
	KEMX25519 KEM = "x25519" // X25519 only: smaller messages
)

// Scheme names a group-key management scheme.
type Scheme string

const (
	SchemeStatic  Scheme = "static"  // one key for the group's life: no forward or backward secrecy
	SchemeUpdate  Scheme = "update"  // a new key, sent to each member, on every (batched) change
	SchemeSlotted Scheme = "slotted" // time-slot keys from a hash tree; members get the slots they may read
	SchemeLKH     Scheme = "lkh"     // logical key hierarchy: rekeys cost O(degree·log n)
)

// Group is one group of the key server: the topics its key protects, the
// members that may join it, and how its key changes.
type Group struct {
	Name string `yaml:"name"`
	// Topics are the filters of the group's topics; the key server signs
	// them to members as the authoritative topic policy.
	Topics []string `yaml:"topics"`
	// Scheme is the group-key scheme (default update).
	Scheme Scheme `yaml:"scheme"`
	// Members names, from keyserver.members, who may join.
	Members []string `yaml:"members"`
	// RekeyBatch gathers membership changes this long, then rekeys once
	// (default 1s; 0 rekeys on every change). update, lkh, slotted.
	RekeyBatch time.Duration `yaml:"rekey_batch"`
	// RekeyLead is the delay between sending a rekey and switching senders
	// to it: activate_at = now + rekey_lead (default 2s).
	RekeyLead time.Duration `yaml:"rekey_lead"`
	// SendGrace is how long after a switch senders may still seal under the
	// old key (default 30s).
	SendGrace time.Duration `yaml:"send_grace"`
	// ReceiveRetention is how long an old key can still open messages
	// (default 24h; at least send_grace and the upstream session expiry).
	ReceiveRetention time.Duration `yaml:"receive_retention"`
	// Slot is the length of one time slot (slotted; default 10s).
	Slot time.Duration `yaml:"slot"`
	// SlotDepth is the depth of the slot hash tree: one tree covers
	// 2^slot_depth slots (slotted; default 16, at most 32).
	SlotDepth int `yaml:"slot_depth"`
	// MemberInterval is how far ahead a member's slot keys reach before it
	// must renew (slotted; default 1h).
	MemberInterval time.Duration `yaml:"member_interval"`
	// SkewSlots is how many slots either side of now a receiver accepts,
	// for clock skew (slotted; default 1).
	SkewSlots int `yaml:"skew_slots"`
	// Degree is the number of children per node of the key tree (lkh;
	// default 4, at least 2).
	Degree int `yaml:"degree"`
	// MaxMessageSize bounds one key-distribution message; larger rekeys are
	// split (default 256KiB, between 1KiB and the MQTT limit 256MiB-1).
	MaxMessageSize ByteSize `yaml:"max_message_size"`
	// SenderAuth makes members sign what they publish, so members cannot
	// impersonate one another (default false).
	SenderAuth bool `yaml:"sender_auth"`
}

// Key server defaults.
const (
	DefaultKeyserverClientID = "smqtt-keyserver"
	DefaultStore             = "data/keyserver.db"
	DefaultHeartbeat         = 10 * time.Second
	DefaultLeaveDelay        = 30 * time.Second
	DefaultRekeyBatch        = time.Second
	DefaultRekeyLead         = 2 * time.Second
	DefaultSendGrace         = 30 * time.Second
	DefaultReceiveRetention  = 24 * time.Hour
	DefaultSlot              = 10 * time.Second
	DefaultSlotDepth         = 16
	DefaultMemberInterval    = time.Hour
	DefaultSkewSlots         = 1
	DefaultDegree            = 4
	DefaultMaxMessageSize    = 256 << 10

	maxSlotDepth      = 32
	minMaxMessageSize = 1 << 10
	maxMQTTPacket     = 268435455 // MQTT's largest packet (remaining length)
)

func (k *Keyserver) setDefaults(isSet func(string) bool) {
	k.Upstream.setDefaults("keyserver.upstream", isSet, DefaultKeyserverClientID)
	if !isSet("keyserver.topic_prefix") {
		k.TopicPrefix = DefaultTopicPrefix
	}
	if !isSet("keyserver.store") {
		k.StoreSpec.Path = DefaultStore
	}
	k.Store, k.Etcd = k.StoreSpec.Path, k.StoreSpec.Etcd
	if k.Etcd != nil {
		if !isSet("keyserver.store.etcd.prefix") {
			k.Etcd.Prefix = DefaultEtcdPrefix
		}
		if !isSet("keyserver.store.etcd.dial_timeout") {
			k.Etcd.DialTimeout = DefaultEtcdDialTimeout
		}
		if !isSet("keyserver.store.etcd.lease_ttl") {
			k.Etcd.LeaseTTL = DefaultEtcdLeaseTTL
		}
		if !isSet("keyserver.store.etcd.timeout") {
			k.Etcd.Timeout = DefaultEtcdTimeout
		}
	}
	if !isSet("keyserver.kem") {
		k.KEM = KEMHybrid
	}
	if !isSet("keyserver.heartbeat") {
		k.Heartbeat = DefaultHeartbeat
	}
	if !isSet("keyserver.leave_delay") {
		k.LeaveDelay = DefaultLeaveDelay
	}
	for i := range k.Groups {
		k.Groups[i].setDefaults(fmt.Sprintf("keyserver.groups[%d]", i), isSet)
	}
}

func (g *Group) setDefaults(p string, isSet func(string) bool) {
	set := func(key string) bool { return isSet(p + "." + key) }
	if !set("scheme") {
		g.Scheme = SchemeUpdate
	}
	if !set("rekey_batch") {
		g.RekeyBatch = DefaultRekeyBatch
	}
	if !set("rekey_lead") {
		g.RekeyLead = DefaultRekeyLead
	}
	if !set("send_grace") {
		g.SendGrace = DefaultSendGrace
	}
	if !set("receive_retention") {
		g.ReceiveRetention = DefaultReceiveRetention
	}
	if !set("slot") {
		g.Slot = DefaultSlot
	}
	if !set("slot_depth") {
		g.SlotDepth = DefaultSlotDepth
	}
	if !set("member_interval") {
		g.MemberInterval = DefaultMemberInterval
	}
	if !set("skew_slots") {
		g.SkewSlots = DefaultSkewSlots
	}
	if !set("degree") {
		g.Degree = DefaultDegree
	}
	if !set("max_message_size") {
		g.MaxMessageSize = DefaultMaxMessageSize
	}
}

func (k *Keyserver) resolvePaths(baseDir string) {
	k.Identity = resolve(baseDir, k.Identity)
	k.Upstream.resolvePaths(baseDir)
	k.Store = resolve(baseDir, k.Store)
	if k.Etcd != nil {
		k.Etcd.TLS.CAFile = resolve(baseDir, k.Etcd.TLS.CAFile)
		k.Etcd.TLS.CertFile = resolve(baseDir, k.Etcd.TLS.CertFile)
		k.Etcd.TLS.KeyFile = resolve(baseDir, k.Etcd.TLS.KeyFile)
	}
	for i := range k.Members {
		k.Members[i].PublicKeyFile = resolve(baseDir, k.Members[i].PublicKeyFile)
	}
}

func (k *Keyserver) validate(v *validator) {
	if k.Identity == "" {
		v.errorf("keyserver.identity", "required (create one with smqtt keygen -o FILE)")
	} else {
		checkFile(v, "keyserver.identity", k.Identity)
	}
	k.Upstream.validate(v, "keyserver.upstream")
	if err := validTopicPrefix(k.TopicPrefix); err != nil {
		v.wrap("keyserver.topic_prefix", err)
	}
	if k.Etcd != nil {
		k.Etcd.validate(v, "keyserver.store.etcd")
	} else if k.Store == "" {
		v.errorf("keyserver.store", "empty; want the database file or {etcd: {endpoints: [...]}}")
	}

	members := map[string]int{} // name -> index
	keys := map[string]int{}    // public key -> index
	for i, m := range k.Members {
		key := fmt.Sprintf("keyserver.members[%d]", i)
		if err := validName(m.Name); err != nil {
			v.errorf(key+".name", "%w", err)
		} else if j, dup := members[m.Name]; dup {
			v.errorf(key+".name", "member %q defined twice (also at keyserver.members[%d])", m.Name, j)
		} else {
			members[m.Name] = i
		}
		if pk := m.PublicKeySource.validate(v, key); pk != "" {
			if j, dup := keys[pk]; dup {
				v.errorf(key, "member %q has the same public key as keyserver.members[%d]", m.Name, j)
			}
			keys[pk] = i
		}
	}

	switch k.KEM {
	case KEMHybrid, KEMX25519:
	default:
		v.errorf("keyserver.kem", "unknown KEM %q (want hybrid or x25519)", k.KEM)
	}
	checkPositive(v, "keyserver.heartbeat", k.Heartbeat)
	if k.LeaveDelay < 0 {
		v.errorf("keyserver.leave_delay", "must not be negative, got %v", k.LeaveDelay)
	}

	groups := map[string]int{}     // name -> index
	filters := map[string]string{} // filter -> key where it first appeared
	for i := range k.Groups {
		k.Groups[i].validate(v, fmt.Sprintf("keyserver.groups[%d]", i), members, groups, filters)
		if _, dup := groups[k.Groups[i].Name]; !dup {
			groups[k.Groups[i].Name] = i
		}
	}

	if k.MetricsListen != "" {
		checkAddress(v, "keyserver.metrics_listen", k.MetricsListen)
	}
}

// validate checks one group. members and groups hold the names defined so
// far; filters the topic filters claimed so far.
func (g *Group) validate(v *validator, p string, members, groups map[string]int, filters map[string]string) {
	if err := validName(g.Name); err != nil {
		v.errorf(p+".name", "%w", err)
	} else if j, dup := groups[g.Name]; dup {
		v.errorf(p+".name", "group %q defined twice (also at keyserver.groups[%d])", g.Name, j)
	}

	if len(g.Topics) == 0 {
		v.errorf(p+".topics", "empty; want at least one topic filter")
	}
	for j, f := range g.Topics {
		key := fmt.Sprintf("%s.topics[%d]", p, j)
		if err := validPolicyFilter(f); err != nil {
			v.wrap(key, err)
		} else if prev, dup := filters[f]; dup {
			v.errorf(key, "filter %q already claimed at %s", f, prev)
		} else {
			filters[f] = key
		}
	}

	switch g.Scheme {
	case SchemeStatic, SchemeUpdate, SchemeSlotted, SchemeLKH:
	default:
		v.errorf(p+".scheme", "unknown scheme %q (want static, update, slotted or lkh)", g.Scheme)
	}

	for j, m := range g.Members {
		key := fmt.Sprintf("%s.members[%d]", p, j)
		if _, ok := members[m]; !ok {
			v.errorf(key, "unknown member %q (define it in keyserver.members)", m)
		}
	}
	checkUnique(v, p+".members", g.Members)

	if g.RekeyBatch < 0 {
		v.errorf(p+".rekey_batch", "must not be negative, got %v", g.RekeyBatch)
	}
	checkPositive(v, p+".rekey_lead", g.RekeyLead)
	checkPositive(v, p+".send_grace", g.SendGrace)
	checkPositive(v, p+".receive_retention", g.ReceiveRetention)
	if g.ReceiveRetention > 0 && g.ReceiveRetention < g.SendGrace {
		v.errorf(p+".receive_retention", "%v is shorter than send_grace %v: messages sealed under an old key could not be opened", g.ReceiveRetention, g.SendGrace)
	}
	checkPositive(v, p+".slot", g.Slot)
	if g.Slot > 0 && g.Slot%time.Millisecond != 0 {
		v.errorf(p+".slot", "%v is not a whole number of milliseconds", g.Slot)
	}
	if g.SlotDepth < 1 || g.SlotDepth > maxSlotDepth {
		v.errorf(p+".slot_depth", "%d out of range (want 1 to %d)", g.SlotDepth, maxSlotDepth)
	}
	checkPositive(v, p+".member_interval", g.MemberInterval)
	if g.SkewSlots < 0 || g.SkewSlots > 255 {
		v.errorf(p+".skew_slots", "%d out of range (want 0 to 255)", g.SkewSlots)
	}
	if g.Degree < 2 {
		v.errorf(p+".degree", "%d too small (want at least 2)", g.Degree)
	}
	if g.MaxMessageSize < minMaxMessageSize || g.MaxMessageSize > maxMQTTPacket {
		v.errorf(p+".max_message_size", "%v out of range (want 1KiB to %d bytes)", g.MaxMessageSize, maxMQTTPacket)
	}
}

// Warnings lists settings that are valid but weaken the key server's
// security, one line each, for the operator's log.
func (k *Keyserver) Warnings() []string {
	var w []string
	if k.Upstream.TLS.InsecureSkipVerify {
		w = append(w, "keyserver.upstream.tls.insecure_skip_verify: the upstream broker's certificate is not checked")
	}
	if k.Heartbeat > DefaultMaxStaleness/2 {
		w = append(w, fmt.Sprintf("keyserver.heartbeat: %v is more than half the sidecars' default max_staleness %v; sidecars may stop sealing between heartbeats", k.Heartbeat, DefaultMaxStaleness))
	}
	for i, g := range k.Groups {
		if len(g.Members) == 0 {
			w = append(w, fmt.Sprintf("keyserver.groups[%d].members: group %q has no members; nobody can join it", i, g.Name))
		}
	}
	return appendModeWarning(w, "keyserver.identity", k.Identity)
}
