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
	// catalogRebuilds counts corrupt catalogs moved aside and rebuilt.
	catalogRebuilds prometheus.Counter
	partialsRemoved *prometheus.CounterVec
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
		catalogRebuilds: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rbee_hive_model_catalog_rebuilds_total",
			Help: "Times the model catalog was corrupt at start, moved aside and rebuilt from the model files on disk.",
		}),
		partialsRemoved: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_model_partials_removed_total",
			Help: "Orphaned partial downloads (*.incomplete, owned by no running download) removed, by reason (stale: older than the partial max age; max_bytes: to stay under models.max_bytes).",
		}, []string{"reason"}),
	}
	// Every reason exists from the start so rate() sees the first failure.
	for _, r := range failureReasons {
		m.failures.WithLabelValues(r)
	}
	for _, r := range []string{partialStale, partialMaxBytes} {
		m.partialsRemoved.WithLabelValues(r)
	}
	for _, c := range []prometheus.Collector{m.inFlight, m.bytes, m.failures, m.diskBytes, m.evictions, m.catalogRebuilds, m.partialsRemoved} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("model: register metrics: %w", err)
		}
	}
	return m, nil
}
