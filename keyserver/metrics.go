package keyserver

import "github.com/prometheus/client_golang/prometheus"

// metrics are the key server's Prometheus collectors.
type metrics struct {
	rekeys   *prometheus.CounterVec // group
	joins    *prometheus.CounterVec // group
	refused  *prometheus.CounterVec // group, reason
	dropped  *prometheus.CounterVec // reason: malformed, unknown, forged, replay, rate
	members  *prometheus.GaugeVec   // group: members holding the key
	epoch    *prometheus.GaugeVec   // group
	rekeyDur prometheus.Histogram

	commitDur prometheus.Histogram // one store commit
	leader    prometheus.Gauge     // 1 while this key server leads (etcd) or serves (bbolt)
	failovers prometheus.Counter   // terms this key server began on state another term left
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		rekeys: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "smqtt_keyserver_rekeys_total", Help: "Epoch changes, by group.",
		}, []string{"group"}),
		joins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "smqtt_keyserver_joins_total", Help: "Join responses sent, by group.",
		}, []string{"group"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "smqtt_keyserver_refused_total", Help: "Signed refusals sent, by group and reason.",
		}, []string{"group", "reason"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "smqtt_keyserver_dropped_total", Help: "Requests dropped unanswered, by reason.",
		}, []string{"reason"}),
		members: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "smqtt_keyserver_members", Help: "Members holding the group key.",
		}, []string{"group"}),
		epoch: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "smqtt_keyserver_epoch", Help: "The group's current epoch.",
		}, []string{"group"}),
		rekeyDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "smqtt_keyserver_rekey_seconds", Help: "Key-server time to build and send one rekey.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		commitDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "smqtt_keyserver_commit_seconds", Help: "Time of one store commit (bbolt or etcd).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "smqtt_keyserver_leader", Help: "1 while this key server leads (always, on bbolt), 0 while it stands by.",
		}),
		failovers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "smqtt_keyserver_failovers_total", Help: "Times this key server took over the lead of state an earlier leader left in etcd.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.rekeys, m.joins, m.refused, m.dropped, m.members, m.epoch, m.rekeyDur, m.commitDur, m.leader, m.failovers} {
			_ = reg.Register(c)
		}
	}
	return m
}
