package model

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the Store's instruments, registered into the caller's registry.
type metrics struct {
	inFlight  prometheus.Gauge
	bytes     prometheus.Counter
	failures  *prometheus.CounterVec
	diskBytes prometheus.Gauge
	evictions prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rbee_hive_model_downloads_in_flight",
			Help: "Model downloads currently running.",
		}),
		bytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rbee_hive_model_download_bytes_total",
			Help: "Bytes of model files received from the model hub and written to disk.",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_model_download_failures_total",
			Help: "Model downloads that failed, by reason (disk, network, checksum, not_found, auth, stalled, select, internal).",
		}, []string{"reason"}),
		diskBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rbee_hive_models_disk_bytes",
			Help: "Bytes on disk of the models in the catalog.",
		}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rbee_hive_model_evictions_total",
			Help: "Models deleted by the retention policy (least recently used, not in use) to stay under max_bytes.",
		}),
	}
	// Every reason exists from the start so rate() sees the first failure.
	for _, r := range failureReasons {
		m.failures.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.inFlight, m.bytes, m.failures, m.diskBytes, m.evictions} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("model: register metrics: %w", err)
		}
	}
	return m, nil
}
