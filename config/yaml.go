package config

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// This file turns yaml.v3's node tree and its error strings into key paths,
// so that every error names the key it is about, and tells which keys a
// document set explicitly (for defaults).

// maxIndexedNodes bounds the work spent walking a document whose aliases
// expand it far beyond its size; real configurations have a few hundred nodes.
const maxIndexedNodes = 100_000

// docIndex records, for a parsed document, the key path of every node.
type docIndex struct {
	entries []indexEntry          // every node in document order (alias targets repeated under each path)
	values  map[string]*yaml.Node // key path -> value node (first occurrence)
	line    map[string]int        // key path -> line where it first appears
}

type indexEntry struct {
	node  *yaml.Node
	path  string
	isKey bool
}

func indexDocument(doc *yaml.Node) (*docIndex, error) {
	x := &docIndex{values: map[string]*yaml.Node{}, line: map[string]int{}}
	if !x.walk(doc, "", map[*yaml.Node]bool{}) {
		return nil, &Error{Err: fmt.Errorf("document expands to more than %d nodes (aliases?)", maxIndexedNodes)}
	}
	return x, nil
}

// walk indexes n under path; it returns false if the document is too large.
// Aliases are followed (a key set through an alias is set), but never into a
// node that is already being walked.
func (x *docIndex) walk(n *yaml.Node, path string, active map[*yaml.Node]bool) bool {
	if len(x.entries) >= maxIndexedNodes {
		return false
	}
	x.entries = append(x.entries, indexEntry{node: n, path: path})
	if _, seen := x.line[path]; !seen && path != "" {
		x.line[path] = n.Line
	}
	if active[n] {
		return true
	}
	active[n] = true
	defer delete(active, n)

	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			if !x.walk(c, path, active) {
				return false
			}
		}
	case yaml.AliasNode:
		if n.Alias != nil {
			return x.walk(n.Alias, path, active)
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			if !x.walk(c, fmt.Sprintf("%s[%d]", path, i), active) {
				return false
			}
		}
	case yaml.MappingNode:
		return x.walkPairs(n, path, active)
	}
	return true
}

// walkPairs indexes the key-value pairs of mapping m, and those merged into
// it with "<<", as children of path.
func (x *docIndex) walkPairs(m *yaml.Node, path string, active map[*yaml.Node]bool) bool {
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], m.Content[i+1]
		if isMergeKey(k) {
			for _, src := range mergeSources(v) {
				if active[src] {
					continue
				}
				active[src] = true
				ok := x.walkPairs(src, path, active)
				delete(active, src)
				if !ok {
					return false
				}
			}
			continue
		}
		child := joinPath(path, k.Value)
		if len(x.entries) >= maxIndexedNodes {
			return false
		}
		x.entries = append(x.entries, indexEntry{node: k, path: child, isKey: true})
		if _, seen := x.values[child]; !seen {
			x.values[child] = v
			x.line[child] = k.Line
		}
		if !x.walk(v, child, active) {
			return false
		}
	}
	return true
}

func isMergeKey(k *yaml.Node) bool {
	return k.Kind == yaml.ScalarNode && k.Value == "<<" &&
		(k.Tag == "" || k.Tag == "!" || k.Tag == "!!merge" || k.Tag == "tag:yaml.org,2002:merge")
}

// mergeSources returns the mappings that a "<<" value merges: an alias to a
// mapping, a mapping, or a sequence of those.
func mergeSources(v *yaml.Node) []*yaml.Node {
	for v.Kind == yaml.AliasNode && v.Alias != nil {
		v = v.Alias
	}
	switch v.Kind {
	case yaml.MappingNode:
		return []*yaml.Node{v}
	case yaml.SequenceNode:
		var out []*yaml.Node
		for _, c := range v.Content {
			for c.Kind == yaml.AliasNode && c.Alias != nil {
				c = c.Alias
			}
			if c.Kind == yaml.MappingNode {
				out = append(out, c)
			}
		}
		return out
	}
	return nil
}

// simpleKey matches map keys that can be written bare in a key path.
var simpleKey = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// joinPath appends a mapping key to a key path: "sidecar" + "upstream" ->
// "sidecar.upstream". Keys that are not plain words are quoted:
// sidecar.static_keys["a.b"].
func joinPath(path, key string) string {
	if !simpleKey.MatchString(key) {
		return fmt.Sprintf("%s[%q]", path, key)
	}
	if path == "" {
		return key
	}
	return path + "." + key
}

// isSet reports whether the document gives the key at path a non-null value.
func (x *docIndex) isSet(path string) bool {
	n, ok := x.values[path]
	return ok && n.ShortTag() != "!!null"
}

// lines returns the key path -> line map kept by File for validation errors.
func (x *docIndex) lines() map[string]int { return x.line }

var (
	reLine    = regexp.MustCompile(`^line (\d+)(?: column (\d+))?: (.*)$`)
	reUnknown = regexp.MustCompile(`^field (.*) not found in type \S+$`)
	reDup     = regexp.MustCompile(`^mapping key (".*") already defined at line (\d+)$`)
	reType    = regexp.MustCompile("^cannot unmarshal (!!\\w+)(?: `(.*)`)? into (.+)$")
)

// typeError turns one of yaml.v3's TypeError strings ("line 5: field urll not
// found in type config.Upstream") into an *Error that names the key path.
func (x *docIndex) typeError(msg string) *Error {
	m := reLine.FindStringSubmatch(msg)
	if m == nil {
		return &Error{Err: errors.New(msg)}
	}
	line, _ := strconv.Atoi(m[1])
	col, _ := strconv.Atoi(m[2]) // set only by this package's own unmarshalers
	rest := m[3]

	if u := reUnknown.FindStringSubmatch(rest); u != nil {
		if e := x.find(line, func(e indexEntry) bool { return e.isKey && e.node.Value == u[1] }); e != nil {
			return &Error{Path: e.path, Line: line, Err: errors.New("unknown key")}
		}
		return &Error{Line: line, Err: fmt.Errorf("unknown key %q", u[1])}
	}
	if d := reDup.FindStringSubmatch(rest); d != nil {
		name, _ := strconv.Unquote(d[1])
		if e := x.find(line, func(e indexEntry) bool { return e.isKey && e.node.Value == name }); e != nil {
			return &Error{Path: e.path, Line: line, Err: fmt.Errorf("key defined twice (first at line %s)", d[2])}
		}
	}
	if col > 0 {
		if e := x.find(line, func(e indexEntry) bool { return !e.isKey && e.node.Column == col }); e != nil {
			return &Error{Path: e.path, Line: line, Err: errors.New(rest)}
		}
	}
	if t := reType.FindStringSubmatch(rest); t != nil {
		tag, shown, into := t[1], t[2], t[3]
		e := x.find(line, func(e indexEntry) bool {
			if e.isKey {
				return false
			}
			n := e.node
			switch tag {
			case "!!map":
				return n.Kind == yaml.MappingNode
			case "!!seq":
				return n.Kind == yaml.SequenceNode
			}
			if n.Kind != yaml.ScalarNode {
				return false
			}
			if strings.HasSuffix(shown, "...") && len(n.Value) > 10 {
				return strings.HasPrefix(n.Value, strings.TrimSuffix(shown, "..."))
			}
			return n.Value == shown
		})
		got := strconv.Quote(shown)
		path := ""
		if e != nil {
			got = describeNode(e.node)
			path = e.path
		}
		return &Error{Path: path, Line: line, Err: fmt.Errorf("want %s, got %s", describeType(into), got)}
	}
	// Something else: name the key if the line holds exactly one.
	path := ""
	for _, e := range x.entries {
		if e.node.Line != line {
			continue
		}
		if path != "" && e.path != path {
			path = ""
			break
		}
		path = e.path
	}
	return &Error{Path: path, Line: line, Err: errors.New(rest)}
}

// find returns the first entry on line that satisfies ok.
func (x *docIndex) find(line int, ok func(indexEntry) bool) *indexEntry {
	for i := range x.entries {
		if x.entries[i].node.Line == line && ok(x.entries[i]) {
			return &x.entries[i]
		}
	}
	return nil
}

func describeNode(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	}
	return strconv.Quote(n.Value)
}

// typeWants maps the names yaml.v3 prints for this package's types to what an
// operator should write instead.
var typeWants = func() map[string]string {
	m := map[string]string{}
	var visit func(t reflect.Type)
	visit = func(t reflect.Type) {
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		name := t.String()
		if _, seen := m[name]; seen {
			return
		}
		switch t.Kind() {
		case reflect.Struct:
			m[name] = "a mapping"
			for i := range t.NumField() {
				if t.Field(i).IsExported() {
					visit(t.Field(i).Type)
				}
			}
		case reflect.Slice:
			m[name] = "a list"
			visit(t.Elem())
		case reflect.Map:
			m[name] = "a mapping"
			visit(t.Elem())
		case reflect.String:
			m[name] = "a string"
		case reflect.Bool:
			m[name] = "true or false"
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
			reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			m[name] = "an integer"
		}
	}
	visit(reflect.TypeFor[File]())
	m["time.Duration"] = "a duration such as 10s, 500ms or 24h"
	m[reflect.TypeFor[ByteSize]().String()] = "a size such as 4096, 64KiB or 1MiB"
	return m
}()

func describeType(goType string) string {
	if w, ok := typeWants[goType]; ok {
		return w
	}
	return goType
}

// yamlError turns a yaml.v3 syntax or decoding error into an *Error.
func yamlError(err error) *Error {
	msg := strings.TrimPrefix(oneLine(err.Error()), "yaml: ")
	if m := reLine.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &Error{Line: line, Err: errors.New(m[3])}
	}
	return &Error{Err: errors.New(msg)}
}
