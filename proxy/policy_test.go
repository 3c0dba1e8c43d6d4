package proxy

import "testing"

func TestFiltersOverlap(t *testing.T) {
	cases := []struct {
		a, b string
		want bool
	}{
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/+", "a/b", true},
		{"a/#", "a", true},
		{"a/#", "a/b/c", true},
		{"#", "x/y", true},
		{"a/+/c", "a/b/d", false},
		{"a/+/c", "+/b/+", true},
		{"a/b", "a/b/c", false},
		{"a/+", "a", false},
		{"secure/#", "plain/#", false},
	}
	for _, c := range cases {
		if got := FiltersOverlap(c.a, c.b); got != c.want {
			t.Errorf("FiltersOverlap(%q, %q) = %v, want %v", c.a, c.b, got, c.want)
		}
		if got := FiltersOverlap(c.b, c.a); got != c.want {
			t.Errorf("FiltersOverlap(%q, %q) = %v, want %v", c.b, c.a, got, c.want)
		}
	}
}

func TestPolicyUnionAndConflicts(t *testing.T) {
	p, err := NewPolicy([]Rule{{Filters: []string{"secure/#"}, Group: "demo"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := p.Group("other/x"); ok {
		t.Fatal("unprotected topic reported protected")
	}
	if err := p.SetServerPolicy([]Rule{{Filters: []string{"secure/a/#"}, Group: "ops"}, {Filters: []string{"ops/#"}, Group: "ops"}}); err == nil {
		t.Fatal("a local rule overlapping another group's server filter was accepted")
	}
	if g, ok := p.Group("ops/x"); !ok || g != "ops" {
		t.Fatalf("a conflicting policy left the server's other filters unprotected: %q %v", g, ok)
	}
	if err := p.SetServerPolicy([]Rule{{Filters: []string{"secure/#"}, Group: "demo"}, {Filters: []string{"other/#"}, Group: "#ops"}}); err != nil {
		t.Fatal(err)
	}
	if g, ok := p.Group("other/x"); !ok || g != "#ops" {
		t.Fatalf("server-only filter not protected: %q %v", g, ok)
	}
	if g, ok := p.Group("secure/x"); !ok || g != "demo" {
		t.Fatalf("local rule lost: %q %v", g, ok)
	}
}
