package config

import (
	"errors"
	"strings"
	"testing"
)

func TestValidFilter(t *testing.T) {
	valid := []string{
		"a", "a/b/c", "#", "+", "+/+", "a/+/c", "a/#", "+/#", "/", "a//b", "/a", "a/",
		"$SYS/#", "$share/group/a/#", "$share/g/#", "$share/g/+/x", "sport/tennis/player1/#",
		"héllo/wörld", strings.Repeat("x", 65535),
	}
	for _, f := range valid {
		if err := ValidFilter(f); err != nil {
			t.Errorf("ValidFilter(%.40q) = %v, want nil", f, err)
		}
	}
	invalid := []struct{ filter, why string }{
		{"", "empty"},
		{"a/#/b", "'#' must be the last level"},
		{"#/a", "'#' must be the last level"},
		{"a#", "'#' must be a whole level"},
		{"a/b#", "'#' must be a whole level"},
		{"##", "'#' must be a whole level"},
		{"a+", "'+' must be a whole level"},
		{"a/+b/c", "'+' must be a whole level"},
		{"++", "'+' must be a whole level"},
		{"a\x00b", "contains NUL"},
		{"a\xffb", "not valid UTF-8"},
		{strings.Repeat("x", 65536), "longer than 65535 bytes"},
		{"$share//a", "empty share name"},
		{"$share/", "empty share name"},
		{"$share/g", "no filter after the share name"},
		{"$share/g/", "no filter after the share name"},
		{"$share/g+/a", "wildcard in share name"},
		{"$share/g/a/#/b", "'#' must be the last level"},
	}
	for _, tt := range invalid {
		err := ValidFilter(tt.filter)
		if err == nil {
			t.Errorf("ValidFilter(%.40q) = nil, want an error (%s)", tt.filter, tt.why)
			continue
		}
		if !errors.Is(err, ErrInvalidFilter) || !strings.Contains(err.Error(), tt.why) {
			t.Errorf("ValidFilter(%.40q) = %.120v, want ErrInvalidFilter saying %q", tt.filter, err, tt.why)
		}
	}
}

func TestValidTopic(t *testing.T) {
	for _, topic := range []string{"a", "a/b", "/a", "a/", "$SYS/broker", "smqtt/v1"} {
		if err := ValidTopic(topic); err != nil {
			t.Errorf("ValidTopic(%q) = %v, want nil", topic, err)
		}
	}
	for _, topic := range []string{"", "a/+", "a/#", "a+b", "a\x00", "\xc3"} {
		if err := ValidTopic(topic); !errors.Is(err, ErrInvalidTopic) {
			t.Errorf("ValidTopic(%q) = %v, want ErrInvalidTopic", topic, err)
		}
	}
}

func TestMatchFilter(t *testing.T) {
	tests := []struct {
		filter, topic string
		want          bool
	}{
		// Literal levels.
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/b", "a/b/c", false},
		{"a/b/c", "a/b", false},
		{"a/b", "a/b/", false},
		{"a", "A", false},
		{"/a", "/a", true},
		{"/a", "a", false},
		{"a//b", "a//b", true},
		// '+' matches exactly one level, which may be empty.
		{"a/+", "a/b", true},
		{"a/+", "a/", true},
		{"a/+", "a", false},
		{"a/+", "a/b/c", false},
		{"+/b", "a/b", true},
		{"+/b", "/b", true},
		{"+", "a", true},
		{"+", "/a", false},
		{"+/+", "/a", true},
		{"a/+/c", "a/b/c", true},
		{"a/+/c", "a/b/d", false},
		// '#' matches the rest, including the parent level.
		{"#", "a", true},
		{"#", "a/b/c", true},
		{"#", "/", true},
		{"a/#", "a", true},
		{"a/#", "a/b", true},
		{"a/#", "a/b/c", true},
		{"a/#", "ab", false},
		{"a/#", "b/a", false},
		{"a/b/#", "a", false},
		{"a/+/#", "a/b", true},
		{"a/+/#", "a", false},
		{"+/#", "a", true},
		{"sport/tennis/player1/#", "sport/tennis/player1/ranking/wimbledon", true},
		// Topics starting with '$' are not matched by leading wildcards.
		{"#", "$SYS/x", false},
		{"+/x", "$SYS/x", false},
		{"$SYS/#", "$SYS/x", true},
		{"$SYS/+", "$SYS/x", true},
		{"a/#", "a/$x", true},
		// Shared subscriptions match like their filter.
		{"$share/g/a/#", "a/b", true},
		{"$share/g/a/+", "a/b", true},
		{"$share/g/#", "$SYS/x", false},
		{"$share/g/a", "b", false},
		{"$share/g", "g", false},
		// Wildcards count only as whole levels.
		{"a#", "ab", false},
		{"a#", "a#", true},
		{"a+", "a+", true},
		{"#/a", "x/a", false},
	}
	for _, tt := range tests {
		if got := MatchFilter(tt.filter, tt.topic); got != tt.want {
			t.Errorf("MatchFilter(%q, %q) = %v, want %v", tt.filter, tt.topic, got, tt.want)
		}
	}
}

// matchReference is a plain, level-by-level statement of MQTT matching for
// valid filters, to check MatchFilter against.
func matchReference(filter, topic string) bool {
	if strings.HasPrefix(filter, sharePrefix) {
		parts := strings.SplitN(filter, "/", 3)
		filter = parts[2]
	}
	if strings.HasPrefix(topic, "$") && (filter[0] == '+' || filter[0] == '#') {
		return false
	}
	f := strings.Split(filter, "/")
	tl := strings.Split(topic, "/")
	for i, level := range f {
		if level == "#" {
			return true
		}
		if i >= len(tl) {
			return false
		}
		if level != "+" && level != tl[i] {
			return false
		}
	}
	return len(f) == len(tl)
}

func FuzzMatchFilter(f *testing.F) {
	for _, s := range [][2]string{
		{"a/b", "a/b"}, {"a/+", "a/b"}, {"a/#", "a"}, {"#", "$SYS/x"}, {"+/+", "/"},
		{"$share/g/a/#", "a/b/c"}, {"a/+/#", "a/b"}, {"a#", "a#"}, {"", ""},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, filter, topic string) {
		got := MatchFilter(filter, topic) // must not panic, whatever the input
		if ValidFilter(filter) != nil || ValidTopic(topic) != nil {
			return
		}
		if want := matchReference(filter, topic); got != want {
			t.Fatalf("MatchFilter(%q, %q) = %v, reference says %v", filter, topic, got, want)
		}
		if !strings.HasPrefix(filter, sharePrefix) && !strings.ContainsAny(filter, "+#") && got != (filter == topic) {
			t.Fatalf("MatchFilter(%q, %q) = %v for a filter without wildcards", filter, topic, got)
		}
		if !strings.HasPrefix(topic, "$") && !MatchFilter("#", topic) {
			t.Fatalf("MatchFilter(\"#\", %q) = false", topic)
		}
		if !strings.HasPrefix(filter, sharePrefix) && MatchFilter("$share/g/"+filter, topic) != got {
			t.Fatalf("$share/g/%q and %q disagree on %q", filter, filter, topic)
		}
	})
}
