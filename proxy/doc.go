// Package proxy is the smqtt sidecar: the MQTT endpoint that unmodified
// applications connect to instead of their broker. It relays their traffic
// to an untrusted upstream broker, sealing the payloads (and the
// confidential MQTT 5 properties) of protected topics on the way out and
// opening them on the way in. It runs in one of two modes (Options.Mode).
//
// # Session mode (the default)
//
// Every application connection gets an upstream connection of its own, with
// the application's client id, protocol version, session flags, Will and
// credentials; the sidecar relays packets between the two and holds no
// message, so sessions, acknowledgements, retained messages and offline
// queues are the broker's. A connection travels through these files in this
// order:
//
//   - session.go: accept, the application's CONNECT turned into the upstream
//     one (the Will sealed), the handshake, the CONNACK back.
//   - sessionout.go: the application's packets to upstream (PUBLISH sealed).
//   - sessionin.go: upstream's packets to the application (PUBLISH opened,
//     checked against the session's replay state).
//   - sessionstate.go: the replay state of each application session, kept in
//     inbound.log with the host-wide state (state.go, inboundlog.go).
//   - mqttwire.go: the MQTT packets the relay decodes, properties kept raw.
//
// # Bridge mode
//
// One shared MQTT 3.1.1 upstream connection per host, a local mochi-mqtt
// broker for the applications, and a durable store-and-forward queue. A
// message travels through these files in this order:
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
