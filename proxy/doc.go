// Package proxy is the smqtt sidecar: a local MQTT broker that unmodified
// applications connect to, and a bridge that relays their traffic to an
// untrusted upstream broker, sealing the payloads of protected topics on the
// way out and opening them on the way in.
//
// A message travels through these files in this order:
//
//   - hook.go: the mochi-mqtt hook on the local broker. It sees every local
//     PUBLISH, SUBSCRIBE, UNSUBSCRIBE, Will and session expiry.
//   - outbound.go: policy lookup, sealing under the group's current key, the
//     durable outbound queue (QoS 1/2), and the pipelined sender to upstream.
//   - bridge.go: the paho.mqtt.golang connection to upstream, its persistent
//     session, ordered in-flight resends, and the acknowledgement store that
//     tells the outbound queue when upstream holds a message.
//   - mirror.go: local subscriptions mirrored upstream with reference counts.
//   - inbound.go: opening, replay check, durable replay state, retained
//     register, and injection into the local broker.
//
// Local application publishes are never routed locally: they go upstream and
// come back through the mirror like everyone else's, so a local subscriber
// gets each message exactly once whichever sidecar it came from, and the
// sidecar's own injections are never forwarded again.
package proxy
