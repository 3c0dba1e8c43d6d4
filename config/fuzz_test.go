package config

import (
	"errors"
	"os"
	"strings"
	"testing"
)

// FuzzParse checks that no input makes the loader panic, and that every error
// it or the role validation returns is one line naming ErrInvalid.
func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile(examplePath); err == nil {
		f.Add(data)
	}
	for _, s := range []string{
		sidecarBase,
		keyserverBase + twoMembers + "  groups: [{name: g, topics: [\"a/#\"], members: [a, b], max_message_size: 64KiB}]\n",
		"sidecar: {upstream: &u {url: \"tcp://b:1\"}, protect: [{topics: [x], group: g}]}\nkeyserver: {upstream: *u}\n",
		"sidecar:\n  queue: {max_messages: lots}\n",
		"- a\n",
		"a: &a [*a]\n",
	} {
		f.Add([]byte(s))
	}
	dir := fixtureDir(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := Parse(data, dir)
		if err != nil {
			checkFuzzError(t, err)
			return
		}
		if file.Sidecar != nil {
			if s, err := file.SidecarConfig(); err != nil {
				checkFuzzError(t, err)
			} else {
				_ = s.Warnings()
			}
		}
		if file.Keyserver != nil {
			if k, err := file.KeyserverConfig(); err != nil {
				checkFuzzError(t, err)
			} else {
				_ = k.Warnings()
			}
		}
	})
}

func checkFuzzError(t *testing.T, err error) {
	t.Helper()
	msg := err.Error()
	if !strings.HasPrefix(msg, "config: ") || strings.ContainsAny(msg, "\r\n") || !errors.Is(err, ErrInvalid) {
		t.Fatalf("error %q: want one line starting with \"config: \" wrapping ErrInvalid", msg)
	}
}
