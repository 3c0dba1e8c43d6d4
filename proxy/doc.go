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
//   - bridge.go (bridgepackets.go, upstreamconn.go): the MQTT 3.1.1
//     connection to upstream, its persistent session, ordered in-flight
//     resends, and the acknowledgements that tell the outbound queue when
//     upstream holds a message. It dials as paho.mqtt.golang does (its
//     WebSocket dialer, TLS, proxies) but keeps the session itself: paho's
//     client handed every upstream message through five goroutines, with a
//     token, a timer and a store entry per message, resent in-flight
//     messages in random order, and was a fifth of the relay's CPU
//     (docs/PERFORMANCE.md). The key client and key server use paho's
//     client, where none of that matters.
//   - mirror.go: local subscriptions mirrored upstream with reference counts.
//   - inbound.go: opening, replay check, durable replay state, retained
//     register, messages held for local persistent sessions
//     (keptsessions.go, kept in the same log across restarts); deliver.go:
//     delivery to local subscribers.
//
// Local application publishes are never routed locally: they go upstream and
// come back through the mirror like everyone else's, so a local subscriber
// gets each message exactly once whichever sidecar it came from, and the
// sidecar's own injections are never forwarded again.
package proxy
