package config

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// A ByteSize is a number of bytes. In YAML it is written as an integer
// (4096) or as an integer with a unit: B, KB, MB, GB (powers of 1000) or KiB,
// MiB, GiB (powers of 1024), with or without a space, in any letter case:
// "256KiB", "1 MiB", "1000".
type ByteSize int64

var sizeUnits = []struct {
	suffix string
	factor int64
}{
	// Longest suffixes first, so that "KiB" is not read as "B".
	{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30},
	{"kb", 1000}, {"mb", 1000 * 1000}, {"gb", 1000 * 1000 * 1000},
	{"b", 1},
}

// ParseByteSize parses a size such as "256KiB", "1MB" or "4096".
func ParseByteSize(s string) (ByteSize, error) {
	num := strings.TrimSpace(s)
	factor := int64(1)
	lower := strings.ToLower(num)
	for _, u := range sizeUnits {
		if strings.HasSuffix(lower, u.suffix) {
			num = strings.TrimSpace(num[:len(num)-len(u.suffix)])
			factor = u.factor
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || num == "" || num[0] == '+' {
		return 0, fmt.Errorf("invalid size %q (want bytes, or an integer with B, KB, KiB, MB, MiB, GB or GiB)", s)
	}
	if n < 0 {
		return 0, fmt.Errorf("invalid size %q: negative", s)
	}
	if n > math.MaxInt64/factor {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return ByteSize(n * factor), nil
}

// String formats the size with the largest binary unit that divides it:
// 262144 -> "256KiB".
func (s ByteSize) String() string {
	switch {
	case s != 0 && s%(1<<30) == 0:
		return strconv.FormatInt(int64(s>>30), 10) + "GiB"
	case s != 0 && s%(1<<20) == 0:
		return strconv.FormatInt(int64(s>>20), 10) + "MiB"
	case s != 0 && s%(1<<10) == 0:
		return strconv.FormatInt(int64(s>>10), 10) + "KiB"
	}
	return strconv.FormatInt(int64(s), 10)
}

// UnmarshalYAML decodes an integer or a size string.
func (s *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d column %d: want a size such as 4096, 64KiB or 1MiB, got %s",
			n.Line, n.Column, describeNode(n))}}
	}
	v, err := ParseByteSize(n.Value)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d column %d: %v", n.Line, n.Column, err)}}
	}
	*s = v
	return nil
}

// MarshalYAML writes the size as String does.
func (s ByteSize) MarshalYAML() (any, error) { return s.String(), nil }
