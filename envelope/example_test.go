package envelope_test

import (
	"fmt"

	"github.com/smqtt/smqtt/envelope"
)

// staticKeys is the simplest KeyLookup: one key for one group and epoch.
type staticKeys struct {
	group string
	epoch uint32
	key   envelope.GroupKey
}

func (k *staticKeys) GroupKey(group string, epoch uint32) (*envelope.GroupKey, bool) {
	if group != k.group || epoch != k.epoch {
		return nil, false
	}
	return &k.key, true
}

func Example() {
	keys := &staticKeys{group: "demo", epoch: 1} // a real key comes from the key server
	sealer, err := envelope.NewSealer("demo", 1, &keys.key, 0x2a)
	if err != nil {
		panic(err)
	}
	msg, seq, err := sealer.Seal(nil, "secure/room1/temperature", 0, []byte("21.5"))
	if err != nil {
		panic(err)
	}

	// The receiver: open, then check replay, then deliver.
	opener := envelope.NewOpener(keys, 0)
	var window envelope.ReplayWindow // one per (group, epoch, sender)
	h, plaintext, err := opener.Open(nil, "demo", "secure/room1/temperature", msg)
	if err != nil {
		fmt.Println("drop:", envelope.Reason(err))
		return
	}
	fmt.Printf("seq %d, %d bytes on the wire, new: %v, plaintext %q\n", seq, len(msg), window.Accept(h.Seq), plaintext)
	fmt.Println("replayed is new:", window.Accept(h.Seq))

	_, _, err = opener.Open(nil, "demo", "secure/room2/temperature", msg)
	fmt.Println("moved to another topic:", envelope.Reason(err))
	// Output:
	// seq 1, 42 bytes on the wire, new: true, plaintext "21.5"
	// replayed is new: false
	// moved to another topic: auth
}
