package router

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	queueWait *prometheus.HistogramVec
	coldStart *prometheus.HistogramVec
	queueLen  *prometheus.GaugeVec
	loads     *prometheus.CounterVec
	unloads   *prometheus.CounterVec
	evictions *prometheus.CounterVec
	rejected  *prometheus.CounterVec
}

// Refusal codes: the code of the OpenAI error body and the reason label of
// rbee_hive_openai_rejected_total.
var rejectCodes = []string{"queue_full", "load_timeout", "no_room", "load_failed", "model_not_loaded"}

func newMetrics(reg prometheus.Registerer, models []string) (*metrics, error) {
	m := &metrics{
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rbee_hive_openai_queue_wait_seconds",
			Help:    "Time from a request's arrival at the OpenAI endpoint to its worker being chosen (loads and full workers included), by served model.",
			Buckets: []float64{.0005, .001, .005, .025, .1, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600},
		}, []string{"model"}),
		coldStart: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rbee_hive_openai_cold_start_seconds",
			Help:    "Time from spawning a served model's worker to its being ready, by served model.",
			Buckets: []float64{.1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600},
		}, []string{"model"}),
		queueLen: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "rbee_hive_openai_queue_length",
			Help: "Requests waiting for a worker of a served model.",
		}, []string{"model"}),
		loads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_openai_loads_total",
			Help: "Workers of a served model started and ready, by reason (request, manual).",
		}, []string{"model", "reason"}),
		unloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_openai_unloads_total",
			Help: "Workers of a served model stopped by the endpoint, by reason (ttl, manual, evicted).",
		}, []string{"model", "reason"}),
		evictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_openai_evictions_total",
			Help: "Idle workers of a served model stopped to make room for another, by the resource admission lacked (vram, ram).",
		}, []string{"model", "reason"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_openai_rejected_total",
			Help: "Requests for a served model answered 503, by reason (queue_full, load_timeout, no_room, load_failed, model_not_loaded).",
		}, []string{"model", "reason"}),
	}
	for _, c := range []prometheus.Collector{m.queueWait, m.coldStart, m.queueLen, m.loads, m.unloads, m.evictions, m.rejected} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("router: register metrics: %w", err)
		}
	}
	// Every series exists from the start, so rate() and dashboards see
	// zeros rather than nothing.
	for _, n := range models {
		m.queueWait.WithLabelValues(n)
		m.coldStart.WithLabelValues(n)
		m.queueLen.WithLabelValues(n).Set(0)
		for _, r := range []string{ReasonRequest, ReasonManual} {
			m.loads.WithLabelValues(n, r)
		}
		for _, r := range []string{ReasonTTL, ReasonManual, ReasonEvicted} {
			m.unloads.WithLabelValues(n, r)
		}
		for _, r := range []string{"vram", "ram"} {
			m.evictions.WithLabelValues(n, r)
		}
		for _, r := range rejectCodes {
			m.rejected.WithLabelValues(n, r)
		}
	}
	return m, nil
}
