package proxy

import (
	"sort"
	"sync"
)

// mirror keeps the local subscriptions mirrored upstream. Each filter is
// subscribed upstream once, at the highest QoS any local client asked for,
// while at least one local client holds it, and the whole set is subscribed
// again after every upstream (re)connect. Shared subscriptions
// ($share/name/filter) are mirrored as they are, so upstream spreads the
// messages over the sidecars and the local broker over its local members.
type mirror struct {
	mu      sync.Mutex
	filters map[string]*mirrored
}

type mirrored struct {
	clients map[string]byte // local client id -> requested QoS
	qos     byte            // QoS subscribed upstream
}

// change is what the upstream subscription of one filter must become.
type change struct {
	filter string
	qos    byte
	remove bool
}

func newMirror() *mirror { return &mirror{filters: make(map[string]*mirrored)} }

// add records that client holds filter at qos and returns the upstream
// change needed, if any.
func (m *mirror) add(client, filter string, qos byte) (change, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.filters[filter]
	if e == nil {
		e = &mirrored{clients: make(map[string]byte)}
		m.filters[filter] = e
		e.clients[client] = qos
		e.qos = qos
		return change{filter: filter, qos: qos}, true
	}
	e.clients[client] = qos
	if qos > e.qos {
		e.qos = qos
		return change{filter: filter, qos: qos}, true
	}
	return change{}, false
}

// remove drops client's hold on filter and returns the upstream change
// needed when it was the last one.
func (m *mirror) remove(client, filter string) (change, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.filters[filter]
	if e == nil {
		return change{}, false
	}
	if _, ok := e.clients[client]; !ok {
		return change{}, false
	}
	delete(e.clients, client)
	if len(e.clients) > 0 {
		return change{}, false
	}
	delete(m.filters, filter)
	return change{filter: filter, remove: true}, true
}

// all returns every mirrored filter with its upstream QoS, sorted.
func (m *mirror) all() []change {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]change, 0, len(m.filters))
	for f, e := range m.filters {
		out = append(out, change{filter: f, qos: e.qos})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].filter < out[j].filter })
	return out
}

// holds reports whether client already holds filter, and at which QoS.
func (m *mirror) holds(client, filter string) (byte, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.filters[filter]; e != nil {
		q, ok := e.clients[client]
		return q, ok
	}
	return 0, false
}

// get returns the upstream subscription of a mirrored filter.
func (m *mirror) get(filter string) change {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.filters[filter]; e != nil {
		return change{filter: filter, qos: e.qos}
	}
	return change{filter: filter}
}

func (m *mirror) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.filters)
}

func isShared(filter string) bool {
	return len(filter) > 7 && filter[:7] == "$share/"
}
