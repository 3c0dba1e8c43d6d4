package gkd

import (
	"crypto/sha256"
	"encoding/hex"
	"regexp"
	"strings"
	"testing"
)

func TestGroupIDIsTheDocumentedHash(t *testing.T) {
	server := [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
	// Pinned: changing it renames every group on every deployment.
	if got := hex.EncodeToString(func() []byte { id := GroupID(server, "demo"); return id[:] }()); got != "f3b81e6bf83b6800" {
		t.Errorf("GroupID(0102030405060708, demo) = %s, want f3b81e6bf83b6800", got)
	}
	for _, name := range []string{"", "demo", "usine-été", strings.Repeat("g", 300)} {
		sum := sha256.Sum256([]byte("smqtt/v1 group\x00" + string(server[:]) + name))
		if got := GroupID(server, name); !equal8(got, sum[:8]) {
			t.Errorf("GroupID(%q) = %x, want %x", name, got, sum[:8])
		}
	}
}

func equal8(a [8]byte, b []byte) bool { return string(a[:]) == string(b) }

func TestGroupIDSeparatesServersAndNames(t *testing.T) {
	a, b := [8]byte{1}, [8]byte{2}
	ids := map[[8]byte]string{}
	for _, tc := range []struct {
		server [8]byte
		name   string
	}{{a, "demo"}, {b, "demo"}, {a, "demo2"}, {a, "Demo"}, {a, ""}} {
		id := GroupID(tc.server, tc.name)
		if prev, dup := ids[id]; dup {
			t.Errorf("GroupID(%x, %q) = GroupID of %s", tc.server, tc.name, prev)
		}
		ids[id] = hex.EncodeToString(tc.server[:]) + "/" + tc.name
	}
}

func TestTopicsAreStableAndOpaque(t *testing.T) {
	p := newParties(t, SuiteX25519)
	server, member := rawID(p.server), rawID(p.alice)
	group := GroupID(server, "secret-plant-group")
	const prefix = "smqtt/v1"
	s, m, g := hex.EncodeToString(server[:]), hex.EncodeToString(member[:]), hex.EncodeToString(group[:])
	for _, tc := range []struct{ got, want string }{
		{RequestTopic(prefix, server, member), prefix + "/s/" + s + "/" + m},
		{RequestFilter(prefix, server), prefix + "/s/" + s + "/+"},
		{MemberTopic(prefix, member), prefix + "/m/" + m},
		{GroupTopic(prefix, group), prefix + "/g/" + g},
		{PolicyTopic(prefix, server), prefix + "/p/" + s},
		{GroupTopic("acme/keys", [8]byte{0xab, 0xcd, 0, 0, 0, 0, 0, 0x01}), "acme/keys/g/abcd000000000001"},
	} {
		if tc.got != tc.want {
			t.Errorf("topic %q, want %q", tc.got, tc.want)
		}
	}
	if s != p.server.Public().ID() || m != p.alice.Public().ID() {
		t.Error("topic ids differ from PublicKey.ID")
	}
	opaque := regexp.MustCompile(`^smqtt/v1/[smgp]/[0-9a-f]{16}(/([0-9a-f]{16}|\+))?$`)
	for _, topic := range []string{
		RequestTopic(prefix, server, member), RequestFilter(prefix, server),
		MemberTopic(prefix, member), GroupTopic(prefix, group), PolicyTopic(prefix, server),
	} {
		if !opaque.MatchString(topic) || strings.Contains(topic, "secret") {
			t.Errorf("topic %q is not made of opaque lower-case ids", topic)
		}
	}
	// A request topic matches the filter the server subscribes to.
	if rt, f := RequestTopic(prefix, server, member), RequestFilter(prefix, server); rt[:strings.LastIndex(rt, "/")] != f[:strings.LastIndex(f, "/")] {
		t.Errorf("request topic %q is not under filter %q", rt, f)
	}
}
