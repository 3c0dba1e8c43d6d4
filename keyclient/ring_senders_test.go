package keyclient_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/smqtt/smqtt/envelope"
	"github.com/smqtt/smqtt/keyclient"
)

type edSigner ed25519.PrivateKey

func (k edSigner) Sign(m []byte) []byte { return ed25519.Sign(ed25519.PrivateKey(k), m) }

// The ring seals for a sender_auth group only once the roster lists its
// own sender id, refuses older rosters, and keeps a group the
// configuration requires sender_auth even when told otherwise.
func TestRingSenderAuth(t *testing.T) {
	r := keyclient.NewRing()
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	r.SetProofSigner(edSigner(priv))
	var key envelope.GroupKey
	if err := r.Install("g", 1, key, 42, true); err != nil {
		t.Fatal(err)
	}
	if r.SenderAuth("g") || r.AnySenderAuth() {
		t.Fatal("a group is sender_auth before anyone said so")
	}
	r.SetSenderAuth("g", true)
	if _, err := r.ProofSigner("g"); !errors.Is(err, keyclient.ErrNoRoster) {
		t.Fatalf("ProofSigner without a roster: %v", err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(r.InstallRoster("g", 5, map[uint64]ed25519.PublicKey{7: pub}))
	if _, err := r.ProofSigner("g"); !errors.Is(err, keyclient.ErrNoRoster) {
		t.Fatalf("ProofSigner with a roster that does not list sender 42: %v", err)
	}
	must(r.InstallRoster("g", 6, map[uint64]ed25519.PublicKey{7: pub, 42: pub}))
	if s, err := r.ProofSigner("g"); err != nil || s == nil {
		t.Fatalf("ProofSigner with sender 42 listed: %v", err)
	}
	if err := r.InstallRoster("g", 5, nil); err == nil {
		t.Fatal("an older roster was installed")
	}
	if k, ok := r.SenderKey("g", 7); !ok || !k.Equal(pub) {
		t.Fatal("sender 7's key is not the roster's")
	}
	if _, ok := r.SenderKey("g", 8); ok {
		t.Fatal("a sender the roster does not list has a key")
	}
	if v, ok := r.RosterVersion("g"); !ok || v != 6 {
		t.Fatalf("RosterVersion = %d, %v", v, ok)
	}

	r.RequireSenderAuth("h")
	r.SetSenderAuth("h", false)
	r.Forget("h")
	if !r.SenderAuth("h") {
		t.Fatal("a group the configuration requires sender_auth was switched off")
	}
	r.SetSenderAuth("g", false)
	if r.SenderAuth("g") {
		t.Fatal("SetSenderAuth(false) left the group sender_auth")
	}
	if _, ok := r.SenderKey("g", 7); ok {
		t.Fatal("a roster outlived its group's sender_auth")
	}
}
