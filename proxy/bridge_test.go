package proxy

import (
	"strconv"
	"testing"

	"github.com/eclipse/paho.mqtt.golang/packets"
)

// paho's resume marks every stored PUBLISH as a duplicate while its writer
// may be sending the same packet: the store must hand out copies, and must
// keep resending in the order packets were first stored.
func TestAckStoreHandsOutCopiesInStoredOrder(t *testing.T) {
	outboundKey := func(mid uint16) string { return "o." + strconv.Itoa(int(mid)) } // paho's key for an outbound packet
	s := newAckStore()
	s.Open()
	for i, mid := range []uint16{9, 3, 7} {
		p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
		p.Qos, p.MessageID, p.TopicName = 1, mid, "t"
		p.Payload = []byte{byte(i)}
		s.Put(outboundKey(mid), p)
	}
	got := s.Get(outboundKey(3)).(*packets.PublishPacket)
	got.Dup = true
	if again := s.Get(outboundKey(3)).(*packets.PublishPacket); again.Dup {
		t.Fatal("setting Dup on a packet from Get changed the stored packet")
	}
	keys := s.All()
	want := []string{outboundKey(9), outboundKey(3), outboundKey(7)}
	if len(keys) != len(want) {
		t.Fatalf("All() = %v, want %v", keys, want)
	}
	for i := range want {
		if keys[i] != want[i] {
			t.Fatalf("All() = %v, want %v (the order of Put)", keys, want)
		}
	}
}
