package proxy

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

// localClient stands in for a local application's connection.
func localClient(id string, version byte, clean bool, expiry uint32) *mqtt.Client {
	return &mqtt.Client{ID: id, Properties: mqtt.ClientProperties{
		ProtocolVersion: version,
		Clean:           clean,
		Props:           packets.Properties{SessionExpiryInterval: expiry, SessionExpiryIntervalFlag: expiry > 0},
	}}
}

// inflightOf summarises what the local broker gets in flight when it loads
// the kept sessions: "client topic payload qos retain" per message.
func inflightOf(k *keptSessions) []string {
	msgs, _ := k.storedInflight()
	var out []string
	for _, m := range msgs {
		out = append(out, m.Client+" "+m.TopicName+" "+string(m.Payload)+" "+string('0'+rune(m.FixedHeader.Qos))+" "+map[bool]string{true: "retain", false: "live"}[m.FixedHeader.Retain])
	}
	return out
}

// TestKeptSessionsSurviveRestart: the persistent sessions, their
// subscriptions and the messages they have not acknowledged come back from
// the inbound log after a restart (and after the compaction every start
// does); what was acknowledged, not delivered, or belongs to a session
// without persistence or one that expired does not.
func TestKeptSessionsSurviveRestart(t *testing.T) {
	dir := t.TempDir()
	st := openState(t, dir)
	k := st.kept
	app := localClient("app311", 4, false, 0)
	five := localClient("app5", 5, true, 60) // Clean Start, kept for 60 s
	clean := localClient("clean", 4, true, 0)
	for _, cl := range []*mqtt.Client{app, five, clean} {
		k.established(cl, cl.Properties.Clean)
	}
	if !k.subscribed(app, packets.Subscription{Filter: "a/#", Qos: 1}) ||
		!k.subscribed(five, packets.Subscription{Filter: "b/+", Qos: 2, NoLocal: true, RetainAsPublished: true, Identifier: 7}) {
		t.Fatal("a persistent session's subscription was not kept")
	}
	if k.subscribed(clean, packets.Subscription{Filter: "c", Qos: 1}) {
		t.Fatal("a clean session's subscription was kept")
	}
	acked := k.hold("a/x", []byte("acked"), 1, false, map[string]byte{"app311": 1, "clean": 1})
	both := k.hold("b/y", []byte("both"), 2, true, map[string]byte{"app5": 2, "app311": 1})
	waiting := k.hold("a/z", []byte("waiting"), 1, false, map[string]byte{"app311": 1})
	if k.hold("c", []byte("nobody"), 1, false, map[string]byte{"clean": 1}) != nil {
		t.Fatal("a message for no kept session was held")
	}
	k.handed(acked, app, 10)
	k.settle(acked)
	k.completed(app, 10) // the application's PUBACK
	k.handed(both, five, 3)
	k.settle(both) // app311 did not get it (it had it as a retained value, say)
	k.handed(waiting, app, 11)
	k.settle(waiting)
	commitState(t, st)
	must(t, st.close())

	st = openState(t, dir)
	k = st.kept
	clients := k.storedClients()
	if len(clients) != 2 || clients[0].ID != "app311" || clients[0].ProtocolVersion != 4 || clients[1].ID != "app5" || clients[1].Properties.SessionExpiryInterval != 60 {
		t.Fatalf("kept sessions after a restart: %+v", clients)
	}
	wantSubs := []storage.Subscription{
		{T: storage.SubscriptionKey, Client: "app311", Filter: "a/#", Qos: 1},
		{T: storage.SubscriptionKey, Client: "app5", Filter: "b/+", Qos: 2, NoLocal: true, RetainAsPublished: true, Identifier: 7},
	}
	if subs := k.storedSubscriptions(); !slices.Equal(subs, wantSubs) {
		t.Fatalf("kept subscriptions after a restart: %+v, want %+v", subs, wantSubs)
	}
	if got, want := inflightOf(k), []string{"app311 a/z waiting 1 live", "app5 b/y both 2 retain"}; !slices.Equal(got, want) {
		t.Fatalf("in flight after a restart: %q, want %q", got, want)
	}
	// The packet ids they were loaded under are the ones the application
	// acknowledges.
	k.completed(localClient("app5", 5, false, 60), 1)
	k.expired("app311")
	commitState(t, st)
	must(t, st.close())

	st = openState(t, dir)
	defer st.close()
	if n := st.kept.count.Load(); n != 1 || st.kept.messagesHeld() != 0 {
		t.Fatalf("after the acknowledgement and the expiry: %d sessions, %d messages held; want 1, 0", n, st.kept.messagesHeld())
	}
}

// TestTornCommitKeepsHeldMessagesFirst: a commit that a crash cuts short at
// any byte never leaves a message's replay state without the message held
// for the persistent session it is for, which would refuse upstream's
// resend of a message the session never got.
func TestTornCommitKeepsHeldMessagesFirst(t *testing.T) {
	dir := t.TempDir()
	st := openState(t, dir)
	app := localClient("app", 4, false, 0)
	st.kept.established(app, false)
	st.kept.subscribed(app, packets.Subscription{Filter: "secure/#", Qos: 1})
	commitState(t, st)
	path := filepath.Join(dir, inboundLogName)
	before, err := os.ReadFile(path)
	must(t, err)
	for seq := uint64(1); seq <= 3; seq++ {
		if !st.accept("demo", 1, 7, seq) {
			t.Fatal("a fresh sequence number refused")
		}
		st.kept.hold("secure/t", []byte{byte(seq)}, 1, false, map[string]byte{"app": 1})
	}
	commitState(t, st)
	must(t, st.close())
	after, err := os.ReadFile(path)
	must(t, err)
	for cut := len(before); cut <= len(after); cut++ {
		torn := t.TempDir()
		must(t, os.WriteFile(filepath.Join(torn, inboundLogName), after[:cut], 0o600))
		st := openState(t, torn)
		held := len(inflightOf(st.kept))
		for seq := uint64(1); seq <= 3; seq++ {
			if refuses(st, "demo", 1, 7, seq) && held < int(seq) {
				t.Fatalf("cut at byte %d of %d: message %d is refused as a replay but not held (%d held)", cut, len(after), seq, held)
			}
		}
		st.close()
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
