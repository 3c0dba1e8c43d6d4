// Package mqtttest has the plain MQTT clients that stand in for unmodified
// applications in tests, the demo and the benchmarks.
package mqtttest

import (
	"fmt"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// Msg is one message an App received.
type Msg struct {
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
	At      time.Time // when it arrived
}

// App is a legacy MQTT 3.1.1 application: it knows nothing of smqtt.
type App struct {
	Client paho.Client
	Inbox  chan Msg
}

// AppOptions tune an App.
type AppOptions struct {
	CleanSession bool // default true (set KeepSession to ask for a persistent one)
	KeepSession  bool
	InboxSize    int // default 100000
	Username     string
	Password     string
}

// Connect connects an App with client id to the broker at url.
func Connect(url, clientID string, o AppOptions) (*App, error) {
	if o.InboxSize == 0 {
		o.InboxSize = 100000
	}
	a := &App{Inbox: make(chan Msg, o.InboxSize)}
	opts := paho.NewClientOptions().
		AddBroker(url).
		SetClientID(clientID).
		SetCleanSession(!o.KeepSession).
		SetUsername(o.Username).
		SetPassword(o.Password).
		SetAutoReconnect(false).
		SetOrderMatters(true).
		SetConnectTimeout(5 * time.Second).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
			a.Inbox <- Msg{Topic: m.Topic(), Payload: append([]byte(nil), m.Payload()...), QoS: m.Qos(), Retain: m.Retained(), At: time.Now()}
		})
	a.Client = paho.NewClient(opts)
	tok := a.Client.Connect()
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return nil, fmt.Errorf("app %s: connect %s: %v", clientID, url, tok.Error())
	}
	return a, nil
}

// Subscribe subscribes and waits for the SUBACK.
func (a *App) Subscribe(filter string, qos byte) error {
	tok := a.Client.Subscribe(filter, qos, nil)
	if !tok.WaitTimeout(10 * time.Second) {
		return fmt.Errorf("subscribe %q: timed out", filter)
	}
	return tok.Error()
}

// Unsubscribe unsubscribes and waits for the UNSUBACK.
func (a *App) Unsubscribe(filter string) error {
	tok := a.Client.Unsubscribe(filter)
	if !tok.WaitTimeout(10 * time.Second) {
		return fmt.Errorf("unsubscribe %q: timed out", filter)
	}
	return tok.Error()
}

// Publish publishes and, for QoS 1/2, waits for the acknowledgement.
func (a *App) Publish(topic string, qos byte, retain bool, payload []byte) error {
	tok := a.Client.Publish(topic, qos, retain, payload)
	if !tok.WaitTimeout(30 * time.Second) {
		return fmt.Errorf("publish %q: timed out", topic)
	}
	return tok.Error()
}

// Close disconnects cleanly.
func (a *App) Close() { a.Client.Disconnect(50) }

// Next waits up to d for the next message.
func (a *App) Next(d time.Duration) (Msg, bool) {
	select {
	case m := <-a.Inbox:
		return m, true
	case <-time.After(d):
		return Msg{}, false
	}
}
