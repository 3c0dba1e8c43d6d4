package proxy

import (
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Drop reasons, the values of the "reason" label of smqtt_sidecar_dropped_total.
const (
	DropNoKey       = "no_key"        // protected topic, no key to seal: never sent in clear
	DropMalformed   = "malformed"     // not an envelope (truncated, bad flags, plaintext)
	DropVersion     = "version"       // unsupported envelope version
	DropUnknownKey  = "unknown_epoch" // no key for the envelope's epoch
	DropAuth        = "auth"          // AEAD failure: tampered, wrong key, other topic or group
	DropReplay      = "replay"        // replayed or duplicated envelope
	DropStaleRetain = "stale_retained"
	DropDenied      = "denied"           // unmatched topic with unmatched: deny
	DropQueueFull   = "queue_full"       // outbound queue full and the publish could not wait
	DropOffline     = "qos0_offline"     // QoS 0 published while upstream was down
	DropLocalFull   = "local_write_full" // a local subscriber's write queue was full
	DropUpstream    = "upstream_error"   // upstream refused or failed a QoS 0 publish
)

// Metrics are the sidecar's Prometheus collectors.
type Metrics struct {
	Messages    *prometheus.CounterVec // direction=out|in, protection=protected|plain
	Dropped     *prometheus.CounterVec // direction, reason
	QueueDepth  prometheus.GaugeFunc
	Connected   prometheus.Gauge
	Reconnects  prometheus.Counter
	Subscribed  prometheus.Gauge // filters mirrored upstream
	Sessions    prometheus.Gauge // session mode: app connections relayed now
	registerers []prometheus.Collector
}

func newMetrics(reg prometheus.Registerer, queueDepth func() float64) *Metrics {
	m := &Metrics{
		Messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "smqtt_sidecar_messages_total",
			Help: "Messages relayed, by direction (out: local app to upstream; in: upstream to local apps) and protection.",
		}, []string{"direction", "protection"}),
		Dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "smqtt_sidecar_dropped_total",
			Help: "Messages dropped, by direction and reason.",
		}, []string{"direction", "reason"}),
		QueueDepth: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "smqtt_sidecar_queue_depth",
			Help: "QoS 1/2 messages held in the outbound queue, not yet acknowledged by upstream.",
		}, queueDepth),
		Connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "smqtt_sidecar_upstream_connected",
			Help: "1 while the upstream connection is up.",
		}),
		Reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "smqtt_sidecar_upstream_connects_total",
			Help: "Successful upstream connections (the first one and every reconnect).",
		}),
		Subscribed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "smqtt_sidecar_upstream_filters",
			Help: "Topic filters mirrored upstream.",
		}),
	}
	m.Sessions = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "smqtt_sidecar_sessions",
		Help: "Session mode: app connections relayed upstream now, each with an upstream session of its own.",
	})
	m.registerers = []prometheus.Collector{m.Messages, m.Dropped, m.QueueDepth, m.Connected, m.Reconnects, m.Subscribed, m.Sessions}
	if reg != nil {
		for _, c := range m.registerers {
			_ = reg.Register(c)
		}
	}
	return m
}

func (m *Metrics) drop(direction, reason string) {
	m.Dropped.WithLabelValues(direction, reason).Inc()
}

func (m *Metrics) dropN(direction, reason string, n int) {
	m.Dropped.WithLabelValues(direction, reason).Add(float64(n))
}

// DropCounts returns the drop counters as "direction/reason" → count, for
// logs and tests.
func (sc *Sidecar) DropCounts() map[string]int {
	out := map[string]int{}
	ch := make(chan prometheus.Metric, 64)
	go func() { sc.metrics.Dropped.Collect(ch); close(ch) }()
	for m := range ch {
		var pb dto.Metric
		if m.Write(&pb) != nil {
			continue
		}
		var dir, reason string
		for _, l := range pb.GetLabel() {
			switch l.GetName() {
			case "direction":
				dir = l.GetValue()
			case "reason":
				reason = l.GetValue()
			}
		}
		out[dir+"/"+reason] = int(pb.GetCounter().GetValue())
	}
	return out
}

// MessageCounts returns the relayed-message counters as
// "direction/protection" → count.
func (sc *Sidecar) MessageCounts() map[string]int {
	out := map[string]int{}
	for _, k := range [][2]string{{"out", "protected"}, {"out", "plain"}, {"in", "protected"}, {"in", "plain"}} {
		var pb dto.Metric
		if sc.metrics.Messages.WithLabelValues(k[0], k[1]).Write(&pb) == nil {
			out[k[0]+"/"+k[1]] = int(pb.GetCounter().GetValue())
		}
	}
	return out
}
