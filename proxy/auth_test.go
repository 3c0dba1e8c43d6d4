package proxy_test

import (
	"testing"

	"github.com/smqtt/smqtt/internal/mqtttest"
	"github.com/smqtt/smqtt/proxy"
)

// TestLocalAuth: with users configured, the local broker admits only those
// users with their passwords.
func TestLocalAuth(t *testing.T) {
	bothModes(t, func(t *testing.T, mode proxy.Mode) {
		up := embeddedUpstream(t, false)
		r := newModeRig(t, mode, up)
		a := r.sidecar(uniq("a"), "", func(o *proxy.Options) { o.Users = map[string]string{"meter": "s3cret"} })
		if _, err := mqtttest.Connect(localURL(a), uniq("anon"), mqtttest.AppOptions{}); err == nil {
			t.Fatal("an anonymous client was admitted")
		}
		if _, err := mqtttest.Connect(localURL(a), uniq("bad"), mqtttest.AppOptions{Username: "meter", Password: "wrong"}); err == nil {
			t.Fatal("a wrong password was admitted")
		}
		ok, err := mqtttest.Connect(localURL(a), uniq("good"), mqtttest.AppOptions{Username: "meter", Password: "s3cret"})
		must(t, err)
		ok.Close()
	})
}
