package proxy_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/smqtt/smqtt/internal/faultnet"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/keyclient"
	"github.com/smqtt/smqtt/proxy"
	"github.com/smqtt/smqtt/proxy/queue"
)

// TestUpstreamMutualTLS: the sidecars reach a broker that requires TLS with
// client certificates (mTLS), verifying the broker's certificate.
func TestUpstreamMutualTLS(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		ca, caKey := newCA(t)
		serverCert := issue(t, ca, caKey, "127.0.0.1", false)
		clientCert := issue(t, ca, caKey, "sidecar", true)
		pool := x509.NewCertPool()
		pool.AddCert(ca)

		s := mqtt.New(&mqtt.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
		must(t, s.AddHook(new(auth.AllowHook), nil))
		nl, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
			Certificates: []tls.Certificate{serverCert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12,
		})
		must(t, err)
		must(t, s.AddListener(listeners.NewNet("tls", nl)))
		must(t, s.Serve())
		t.Cleanup(func() { s.Close() })
		url := "ssl://" + nl.Addr().String()

		r := newModeRig(t, mode, tlsUpstream{url})
		withTLS := func(o *proxy.Options) {
			o.Upstream.TLS = &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{clientCert}, MinVersion: tls.VersionTLS12}
		}
		a, b := r.sidecar(uniq("a"), "", withTLS), r.sidecar(uniq("b"), "", withTLS)
		pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/tls", 1))
		must(t, pub.Publish("secure/tls", 1, false, []byte("over mTLS")))
		expect(t, sub, "secure/tls", "over mTLS")

		// without a client certificate the broker refuses the sidecar
		sc, err := proxy.New(proxy.Options{
			Mode:     mode,
			Listen:   []string{"tcp://127.0.0.1:0"},
			Upstream: proxy.UpstreamOptions{URL: url, ClientID: uniq("c"), TLS: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
			Rules:    testRules, Keys: keyclient.NewRing(), DataDir: t.TempDir(),
		})
		must(t, err)
		must(t, sc.Start())
		time.Sleep(500 * time.Millisecond)
		if sc.Connected() {
			t.Fatal("connected to an mTLS broker without a client certificate")
		}
		sc.Close(t.Context())
	})
}

// TestUpstreamWebSocket: the sidecars reach the broker over WebSocket (the
// upstream connection is dialed by the sidecar, not by paho).
func TestUpstreamWebSocket(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		s := mqtt.New(&mqtt.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
		must(t, s.AddHook(new(auth.AllowHook), nil))
		addr := freeAddr(t)
		must(t, s.AddListener(listeners.NewWebsocket(listeners.Config{ID: "ws", Address: addr})))
		must(t, s.Serve())
		t.Cleanup(func() { s.Close() })

		r := newModeRig(t, mode, tlsUpstream{"ws://" + addr})
		a, b := r.sidecar(uniq("a"), ""), r.sidecar(uniq("b"), "")
		pub, sub := r.app(a, uniq("pub")), r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/ws/#", 1))
		for i := range 50 {
			must(t, pub.Publish(fmt.Sprintf("secure/ws/%d", i), 1, false, []byte(fmt.Sprintf("over websocket %d", i))))
		}
		for i := range 50 {
			expect(t, sub, fmt.Sprintf("secure/ws/%d", i), fmt.Sprintf("over websocket %d", i))
		}
	})
}

type tlsUpstream struct{ url string }

func (u tlsUpstream) URL() string    { return u.url }
func (u tlsUpstream) Restart() error { return nil }
func (u tlsUpstream) Close() error   { return nil }

// TestLocalListeners: applications reach the sidecar over WebSocket and a
// Unix socket as well as TCP.
func TestLocalListeners(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		sock := filepath.Join(t.TempDir(), "smqtt.sock")
		wsAddr := freeAddr(t)
		a := r.sidecar(uniq("a"), "", func(o *proxy.Options) {
			o.Listen = []string{"tcp://127.0.0.1:0", "ws://" + wsAddr, "unix://" + sock}
		})
		b := r.sidecar(uniq("b"), "")
		sub := r.app(b, uniq("sub"))
		must(t, sub.Subscribe("secure/via/#", 1))
		for _, url := range []string{"ws://" + wsAddr, "unix://" + sock} {
			var app *mqtttest.App
			var err error
			deadline := time.Now().Add(5 * time.Second)
			for app, err = mqtttest.Connect(url, uniq("app"), mqtttest.AppOptions{}); err != nil && time.Now().Before(deadline); {
				time.Sleep(50 * time.Millisecond)
				app, err = mqtttest.Connect(url, uniq("app"), mqtttest.AppOptions{})
			}
			must(t, err)
			must(t, app.Publish("secure/via/x", 1, false, []byte(url)))
			expect(t, sub, "secure/via/x", url)
			app.Close()
		}
		_ = a
	})
}

// TestBackpressureInsteadOfLoss: with the outbound queue full and upstream
// down, a further QoS 1 publish is not acknowledged and not dropped: the app
// waits, and everything arrives once upstream returns.
func TestBackpressureInsteadOfLoss(t *testing.T) {
	up := embeddedUpstream(t, false)
	r := newBridgeRig(t, up)
	relay, err := faultnet.New(up.Addr())
	must(t, err)
	t.Cleanup(func() { relay.Close() })
	a := r.sidecar(uniq("a"), "", func(o *proxy.Options) {
		o.Queue = queue.Options{Sync: queue.SyncBatch, MaxMessages: 10}
		o.Upstream.URL = relay.URL()
	})
	b := r.sidecar(uniq("b"), "")
	sub := r.app(b, uniq("sub"))
	must(t, sub.Subscribe("secure/bp", 1))
	pub := r.app(a, uniq("pub"))

	relay.Down() // upstream unreachable for A
	waitFor(t, func() bool { return !a.Connected() }, "upstream down")
	var toks []paho.Token
	for i := 0; i < 20; i++ {
		toks = append(toks, pub.Client.Publish("secure/bp", 1, false, []byte{byte(i)}))
	}
	waitFor(t, func() bool { return a.QueueLen() == 10 }, "queue full")
	time.Sleep(200 * time.Millisecond)
	acked := 0
	for _, tok := range toks {
		select {
		case <-tok.Done():
			acked++
		default:
		}
	}
	if acked != 10 {
		t.Fatalf("%d publishes acknowledged with a queue of 10 and upstream down", acked)
	}
	if n := a.DropCounts()["out/"+proxy.DropQueueFull]; n != 0 {
		t.Fatalf("%d messages dropped instead of waiting", n)
	}
	relay.Up()
	for i := 0; i < 20; i++ {
		m, ok := sub.Next(10 * time.Second)
		if !ok || m.Payload[0] != byte(i) {
			t.Fatalf("message %d: got %v %v", i, m.Payload, ok)
		}
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	defer l.Close()
	return l.Addr().String()
}

func newCA(t *testing.T) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	must(t, err)
	ca, err := x509.ParseCertificate(der)
	must(t, err)
	return ca, key
}

func issue(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, name string, client bool) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	if client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP(name)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	must(t, err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
