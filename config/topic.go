package config

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// MQTT topic rules (MQTT 3.1.1 section 4.7, MQTT 5 section 4.7), shared by the
// configuration, the sidecar's topic policy and the key server.

// maxTopicLength is the longest topic or filter MQTT can carry: its UTF-8
// strings have a 16-bit length.
const maxTopicLength = 65535

// sharePrefix starts a shared-subscription filter: $share/<name>/<filter>.
const sharePrefix = "$share/"

var (
	// ErrInvalidFilter is wrapped by the errors of ValidFilter.
	ErrInvalidFilter = errors.New("invalid topic filter")
	// ErrInvalidTopic is wrapped by the errors of ValidTopic.
	ErrInvalidTopic = errors.New("invalid topic name")
)

// ValidFilter reports whether filter is a valid MQTT topic filter: not empty,
// at most 65535 bytes of UTF-8 without NUL, '+' only as a whole level, '#'
// only as a whole and last level. A shared-subscription filter
// "$share/<name>/<filter>" is valid if name is not empty and has no wildcard
// and filter is valid.
func ValidFilter(filter string) error {
	if rest, ok := strings.CutPrefix(filter, sharePrefix); ok {
		name, sub, ok := strings.Cut(rest, "/")
		switch {
		case name == "":
			return fmt.Errorf("%w %q: empty share name", ErrInvalidFilter, filter)
		case strings.ContainsAny(name, "+#"):
			return fmt.Errorf("%w %q: wildcard in share name", ErrInvalidFilter, filter)
		case !ok || sub == "":
			return fmt.Errorf("%w %q: no filter after the share name", ErrInvalidFilter, filter)
		}
		if why := filterProblem(sub); why != "" {
			return fmt.Errorf("%w %q: %s", ErrInvalidFilter, filter, why)
		}
		return nil
	}
	if why := filterProblem(filter); why != "" {
		return fmt.Errorf("%w %q: %s", ErrInvalidFilter, filter, why)
	}
	return nil
}

// filterProblem says what is wrong with a (non-shared) filter, or "".
func filterProblem(filter string) string {
	if why := stringProblem(filter); why != "" {
		return why
	}
	for rest := filter; ; {
		level, after, more := strings.Cut(rest, "/")
		switch {
		case strings.Contains(level, "#") && level != "#":
			return "'#' must be a whole level"
		case level == "#" && more:
			return "'#' must be the last level"
		case strings.Contains(level, "+") && level != "+":
			return "'+' must be a whole level"
		}
		if !more {
			return ""
		}
		rest = after
	}
}

// stringProblem checks what topics and filters have in common.
func stringProblem(s string) string {
	switch {
	case s == "":
		return "empty"
	case len(s) > maxTopicLength:
		return fmt.Sprintf("longer than %d bytes", maxTopicLength)
	case !utf8.ValidString(s):
		return "not valid UTF-8"
	case strings.IndexByte(s, 0) >= 0:
		return "contains NUL"
	}
	return ""
}

// ValidTopic reports whether topic is a valid MQTT topic name, the kind a
// PUBLISH carries: a valid filter without wildcards.
func ValidTopic(topic string) error {
	why := stringProblem(topic)
	if why == "" && strings.ContainsAny(topic, "+#") {
		why = "contains a wildcard"
	}
	if why != "" {
		return fmt.Errorf("%w %q: %s", ErrInvalidTopic, topic, why)
	}
	return nil
}

// MatchFilter reports whether topic matches filter under MQTT's rules: '+'
// matches exactly one level, '#' matches the rest including the parent level
// ("a/#" matches "a"), and topics that start with '$' are not matched by a
// filter that starts with a wildcard. A "$share/<name>/" prefix is removed
// from filter first. Wildcards count only as whole levels; the result for an
// invalid filter is false or a literal comparison, never a panic.
func MatchFilter(filter, topic string) bool {
	if rest, ok := strings.CutPrefix(filter, sharePrefix); ok {
		_, sub, ok := strings.Cut(rest, "/")
		if !ok {
			return false
		}
		filter = sub
	}
	if strings.HasPrefix(topic, "$") && (strings.HasPrefix(filter, "+") || strings.HasPrefix(filter, "#")) {
		return false
	}
	for {
		fl, frest, fmore := strings.Cut(filter, "/")
		if fl == "#" && !fmore {
			return true
		}
		tl, trest, tmore := strings.Cut(topic, "/")
		if fl != "+" && fl != tl {
			return false
		}
		switch {
		case !fmore && !tmore:
			return true
		case !tmore:
			return frest == "#" // "a/#" matches "a"
		case !fmore:
			return false
		}
		filter, topic = frest, trest
	}
}
