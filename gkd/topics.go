package gkd

import (
	"crypto/sha256"
	"encoding/hex"
)

// Key-distribution topics name members, servers and groups by opaque ids
// only, lower-case hex, so that no member or group name reaches the broker.
// The prefix is the configured topic_prefix ("smqtt/v1" by default), without
// a trailing slash.

const groupIDLabel = "smqtt/v1 group\x00"

// GroupID returns the opaque id of the group called name at the key server
// whose id is server: the first 8 bytes of
// SHA-256("smqtt/v1 group\x00" || server || name).
func GroupID(server [8]byte, name string) [8]byte {
	h := sha256.New()
	h.Write([]byte(groupIDLabel))
	h.Write(server[:])
	h.Write([]byte(name))
	var id [8]byte
	copy(id[:], h.Sum(nil))
	return id
}

// RequestTopic is where member publishes its requests to server:
// prefix/s/SERVER/MEMBER.
func RequestTopic(prefix string, server, member [8]byte) string {
	return prefix + "/s/" + hex.EncodeToString(server[:]) + "/" + hex.EncodeToString(member[:])
}

// RequestFilter is what server subscribes to for every member's requests:
// prefix/s/SERVER/+.
func RequestFilter(prefix string, server [8]byte) string {
	return prefix + "/s/" + hex.EncodeToString(server[:]) + "/+"
}

// MemberTopic is where the key server publishes messages for one member:
// prefix/m/MEMBER.
func MemberTopic(prefix string, member [8]byte) string {
	return prefix + "/m/" + hex.EncodeToString(member[:])
}

// GroupTopic is where the key server broadcasts to a group's members:
// prefix/g/GROUP.
func GroupTopic(prefix string, group [8]byte) string {
	return prefix + "/g/" + hex.EncodeToString(group[:])
}

// PolicyTopic is where server publishes its topic policy: prefix/p/SERVER.
func PolicyTopic(prefix string, server [8]byte) string {
	return prefix + "/p/" + hex.EncodeToString(server[:])
}
