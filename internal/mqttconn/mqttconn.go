// Package mqttconn holds what the sidecar, the key client and the key
// server share about their connection to the upstream broker.
package mqttconn

import (
	"crypto/tls"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// Options say how to reach the upstream broker.
type Options struct {
	URL            string // tcp://, ssl://, ws://, wss:// (anything paho accepts)
	ClientID       string // stable, so that upstream keeps this client's session
	Username       string
	Password       string
	TLS            *tls.Config
	KeepAlive      time.Duration // default 30s
	ConnectTimeout time.Duration // default 10s
	// MaxReconnectInterval caps the reconnect back-off (default 2s).
	MaxReconnectInterval time.Duration
}

// Paho returns paho client options for o with the given client id, without
// any session or reconnect policy (callers set those).
func (o Options) Paho(clientID string) *paho.ClientOptions {
	keepAlive := o.KeepAlive
	if keepAlive <= 0 {
		keepAlive = 30 * time.Second
	}
	connectTimeout := o.ConnectTimeout
	if connectTimeout <= 0 {
		connectTimeout = 10 * time.Second
	}
	p := paho.NewClientOptions().
		AddBroker(o.URL).
		SetClientID(clientID).
		SetUsername(o.Username).
		SetPassword(o.Password).
		SetKeepAlive(keepAlive).
		SetPingTimeout(keepAlive / 2).
		SetConnectTimeout(connectTimeout).
		SetMaxReconnectInterval(o.Backoff())
	if o.TLS != nil {
		p.SetTLSConfig(o.TLS)
	}
	return p
}

// Backoff is the longest wait between reconnect attempts.
func (o Options) Backoff() time.Duration {
	if o.MaxReconnectInterval > 0 {
		return o.MaxReconnectInterval
	}
	return 2 * time.Second
}
