package proxy

import (
	"fmt"

	"github.com/smqtt/smqtt/config"
)

// Rule protects the topics matching any of Filters with the key of Group.
type Rule struct {
	Filters []string
	Group   string
}

// Policy maps topics to the group whose key protects them: the first rule
// with a matching filter wins. A topic no rule matches is unprotected.
type Policy struct {
	rules []Rule
}

// NewPolicy checks the rules' filters and returns the policy.
func NewPolicy(rules []Rule) (*Policy, error) {
	for i, r := range rules {
		if r.Group == "" {
			return nil, fmt.Errorf("proxy: protect[%d]: empty group", i)
		}
		for j, f := range r.Filters {
			if err := config.ValidFilter(f); err != nil {
				return nil, fmt.Errorf("proxy: protect[%d].topics[%d]: %w", i, j, err)
			}
		}
	}
	return &Policy{rules: append([]Rule(nil), rules...)}, nil
}

// Group returns the group protecting topic, or ok == false when the topic is
// unprotected.
func (p *Policy) Group(topic string) (group string, ok bool) {
	for _, r := range p.rules {
		for _, f := range r.Filters {
			if config.MatchFilter(f, topic) {
				return r.Group, true
			}
		}
	}
	return "", false
}

// Groups lists every group the policy names, once each, in rule order.
func (p *Policy) Groups() []string {
	var out []string
	seen := map[string]bool{}
	for _, r := range p.rules {
		if !seen[r.Group] {
			seen[r.Group] = true
			out = append(out, r.Group)
		}
	}
	return out
}
