package proxy

import (
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/smqtt/smqtt/config"
)

// Rule protects the topics matching any of Filters with the key of Group.
type Rule struct {
	Filters []string
	Group   string
}

// Policy maps topics to the group whose key protects them. It is the union
// of the sidecar's own protect rules and the key server's signed topic
// policy: the local rules are looked at first (first matching rule wins),
// then the key server's. A key-server filter for a group this sidecar does
// not belong to still protects its topics: they are refused outbound and
// dropped inbound, never relayed in clear. A topic no rule matches is
// unprotected.
type Policy struct {
	local  atomic.Pointer[[]Rule]
	server atomic.Pointer[[]Rule]
}

// NewPolicy checks the rules' filters and returns the policy.
func NewPolicy(rules []Rule) (*Policy, error) {
	if err := checkRules(rules, "protect"); err != nil {
		return nil, err
	}
	p := &Policy{}
	local := append([]Rule(nil), rules...)
	p.local.Store(&local)
	p.server.Store(&[]Rule{})
	return p, nil
}

func checkRules(rules []Rule, what string) error {
	for i, r := range rules {
		if r.Group == "" {
			return fmt.Errorf("proxy: %s[%d]: empty group", what, i)
		}
		for j, f := range r.Filters {
			if err := config.ValidFilter(f); err != nil {
				return fmt.Errorf("proxy: %s[%d].topics[%d]: %w", what, i, j, err)
			}
		}
	}
	return nil
}

// SetServerPolicy installs the key server's topic policy. Rules name groups
// as the sidecar knows them (a group it does not belong to may carry any
// name that is not one of its own). A local rule whose filter overlaps a
// server filter of another group is reported as an error; the policy is
// installed all the same.
func (p *Policy) SetServerPolicy(rules []Rule) error {
	if err := checkRules(rules, "key server policy"); err != nil {
		return err
	}
	// Installed even when it conflicts: the key server's filters are
	// protected whatever happens (a conflicting topic keeps its local
	// group, first match, so it is never sent in clear either).
	cp := append([]Rule(nil), rules...)
	p.server.Store(&cp)
	return conflicts(*p.local.Load(), rules)
}

// SetLocalRules replaces the sidecar's own protect rules (a reload). Rules
// that conflict with the key server's policy are refused and the old ones
// kept.
func (p *Policy) SetLocalRules(rules []Rule) error {
	if err := checkRules(rules, "protect"); err != nil {
		return err
	}
	if err := conflicts(rules, *p.server.Load()); err != nil {
		return err
	}
	cp := append([]Rule(nil), rules...)
	p.local.Store(&cp)
	return nil
}

// conflicts reports a local filter that overlaps a server filter of
// another group.
func conflicts(local, server []Rule) error {
	for _, l := range local {
		for _, lf := range l.Filters {
			for _, s := range server {
				for _, sf := range s.Filters {
					if s.Group != l.Group && FiltersOverlap(lf, sf) {
						return fmt.Errorf("sidecar.protect: topic filter %q maps to group %q, but the key server's policy maps %q to another group", lf, l.Group, sf)
					}
				}
			}
		}
	}
	return nil
}

// Group returns the group protecting topic, or ok == false when the topic is
// unprotected.
func (p *Policy) Group(topic string) (group string, ok bool) {
	if g, ok := match(*p.local.Load(), topic); ok {
		return g, true
	}
	return match(*p.server.Load(), topic)
}

func match(rules []Rule, topic string) (string, bool) {
	for _, r := range rules {
		for _, f := range r.Filters {
			if config.MatchFilter(f, topic) {
				return r.Group, true
			}
		}
	}
	return "", false
}

// FiltersOverlap reports whether some topic matches both MQTT filters.
func FiltersOverlap(a, b string) bool {
	la, lb := strings.Split(a, "/"), strings.Split(b, "/")
	for i := 0; ; i++ {
		switch {
		case i < len(la) && la[i] == "#", i < len(lb) && lb[i] == "#":
			return true
		case i == len(la) && i == len(lb):
			return true
		case i == len(la) || i == len(lb):
			// "a/#" also matches "a": handled above when the longer one
			// ends in "#" at exactly this level.
			return i == len(la) && i+1 == len(lb) && lb[i] == "#" || i == len(lb) && i+1 == len(la) && la[i] == "#"
		case la[i] == "+" || lb[i] == "+" || la[i] == lb[i]:
			continue
		default:
			return false
		}
	}
}
