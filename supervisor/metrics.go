package supervisor

import (
	"fmt"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	workerproto "github.com/rbee/rbee-hive/worker"
)

// metrics holds the supervisor's counters and reads its gauges at scrape
// time. No label carries a worker id or a pid.
type metrics struct {
	s *Supervisor

	spawnFailures      *prometheus.CounterVec
	restarts           *prometheus.CounterVec
	exits              *prometheus.CounterVec
	heartbeatsRejected *prometheus.CounterVec
	oomKills           prometheus.Counter
	stale              prometheus.Counter
	heartbeats         prometheus.Counter
	healthFails        prometheus.Counter
	portSquatters      prometheus.Counter
	vramExceeded       *prometheus.CounterVec
	logLinesDropped    prometheus.Counter
	illegalTransitions *prometheus.CounterVec
	adopted            prometheus.Counter
	adoptSeconds       prometheus.Gauge

	rejectedDesc *prometheus.Desc // heartbeatsRejected plus the socket's drops
	workersDesc  *prometheus.Desc
	healthDesc   *prometheus.Desc
	memoryDesc   *prometheus.Desc
	vramDesc     *prometheus.Desc
}

// healthUnknown is a running worker's health until it reports one.
const healthUnknown = "unknown"

// reported health values, for the rbee_hive_workers_by_health series.
var healthValues = []string{string(workerproto.Healthy), string(workerproto.Degraded), healthUnknown}

func newMetrics(s *Supervisor, reg *prometheus.Registry) (*metrics, error) {
	m := &metrics{
		s: s,
		spawnFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_hive_worker_spawn_failures_total",
			Help: "Worker processes that could not be started, by reason (cgroup, exec, model, ports)."}, []string{"reason"}),
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_hive_worker_restarts_total",
			Help: "Worker restarts by the restart policy, by the exit reason that caused them."}, []string{"reason"}),
		exits: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_hive_worker_exits_total",
			Help: "Worker process exits, by reason."}, []string{"reason"}),
		heartbeatsRejected: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_hive_heartbeats_rejected_total",
			Help: "Heartbeats and notify datagrams rejected, by reason."}, []string{"reason"}),
		adopted: prometheus.NewCounter(prometheus.CounterOpts{Name: "rbee_hive_workers_adopted_total",
			Help: "Running workers of an earlier hive taken over at start (workers.adopt)."}),
		adoptSeconds: prometheus.NewGauge(prometheus.GaugeOpts{Name: "rbee_hive_adoption_duration_seconds",
			Help: "How long adopting the registry's workers took at this hive's start."}),
		oomKills: prometheus.NewCounter(prometheus.CounterOpts{Name: "rbee_hive_worker_oom_kills_total",
			Help: "Worker exits caused by the kernel OOM killer in the worker's cgroup."}),
		stale: prometheus.NewCounter(prometheus.CounterOpts{Name: "rbee_hive_workers_stale_total",
			Help: "Ready workers that missed their heartbeat deadline."}),
		heartbeats: prometheus.NewCounter(prometheus.CounterOpts{Name: "rbee_hive_heartbeats_total",
			Help: "Heartbeats accepted (WATCHDOG=1, POST /v1/heartbeat, successful http health checks)."}),
		healthFails: prometheus.NewCounter(prometheus.CounterOpts{Name: "rbee_hive_worker_health_check_failures_total",
			Help: "Failed HTTP health checks of ready http-mode workers."}),
		portSquatters: prometheus.NewCounter(prometheus.CounterOpts{Name: "rbee_hive_port_squatters_total",
			Help: "Worker runs kept from readiness, or refused by the proxy, because another process listened on the worker's port."}),
		vramExceeded: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_hive_worker_vram_limit_exceeded_total",
			Help: "Times a cuda worker's sampled VRAM crossed its expected VRAM × resources.vram_limit_factor, by backend and device."},
			[]string{"backend", "device"}),
		logLinesDropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "rbee_hive_worker_log_lines_dropped_total",
			Help: "Worker output lines not written to the worker's log file (disk full, I/O error); still in the in-memory tail and the journal."}),
		illegalTransitions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_hive_worker_illegal_transitions_total",
			Help: "Worker state transitions refused because the state machine does not allow them (a bug), by from and to state."},
			[]string{"from", "to"}),
		rejectedDesc: prometheus.NewDesc("rbee_hive_heartbeats_rejected_total", "Heartbeats and notify datagrams rejected, by reason.",
			[]string{"reason"}, nil),
		workersDesc: prometheus.NewDesc("rbee_hive_workers", "Registered workers by state, backend and device.",
			[]string{"state", "backend", "device"}, nil),
		healthDesc: prometheus.NewDesc("rbee_hive_workers_by_health", "Running workers by the health they last reported (RBEE_HEALTH or health_status), backend and device.",
			[]string{"health", "backend", "device"}, nil),
		memoryDesc: prometheus.NewDesc("rbee_hive_worker_memory_bytes", "Memory in use by workers' cgroups (memory.current summed, as last sampled), by backend and device.",
			[]string{"backend", "device"}, nil),
		vramDesc: prometheus.NewDesc("rbee_hive_worker_vram_bytes", "GPU memory used by the processes in cuda workers' cgroups (summed, as last sampled), by backend and device.",
			[]string{"backend", "device"}, nil),
	}
	// Series exist at 0 from the start, so dashboards and rate() have data.
	for _, r := range spawnFailReasons {
		m.spawnFailures.WithLabelValues(r)
	}
	for _, r := range exitReasons {
		m.exits.WithLabelValues(string(r))
		if r != ReasonStopped {
			m.restarts.WithLabelValues(string(r))
		}
	}
	for _, r := range rejectReasons {
		m.heartbeatsRejected.WithLabelValues(r)
	}
	for _, name := range s.cfg.BackendNames() {
		if s.cfg.Backends[name].CUDA {
			for _, d := range s.devices {
				m.vramExceeded.WithLabelValues(name, strconv.Itoa(d.Index))
			}
		}
	}
	if reg == nil {
		return m, nil
	}
	// heartbeatsRejected is not registered itself: Collect merges it with
	// the notify socket's drops into one family.
	for _, c := range []prometheus.Collector{m.spawnFailures, m.restarts, m.exits,
		m.adopted, m.adoptSeconds, m.oomKills, m.stale, m.heartbeats, m.healthFails, m.portSquatters, m.vramExceeded, m.logLinesDropped, m.illegalTransitions, m} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("supervisor: registering metrics: %w", err)
		}
	}
	return m, nil
}

// Describe implements prometheus.Collector for the scrape-time gauges.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.rejectedDesc
	ch <- m.workersDesc
	ch <- m.healthDesc
	ch <- m.memoryDesc
	ch <- m.vramDesc
}

type bd struct {
	backend string
	device  int
}

// Collect reads the registry at scrape time: every state for every known
// backend/device pair (0 included), and the monitor's last memory and VRAM
// samples (a scrape reads no cgroup file and never queries the GPU driver).
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	m.collectRejected(ch)
	s := m.s
	counts := make(map[bd]map[State]int)
	health := make(map[bd]map[string]int)
	pairs := make(map[bd]bool)
	for _, name := range s.cfg.BackendNames() {
		if s.cfg.Backends[name].CUDA {
			for _, d := range s.devices {
				pairs[bd{name, d.Index}] = true
			}
		} else {
			pairs[bd{name, 0}] = true
		}
	}
	vram := make(map[bd]float64)
	mem := make(map[bd]float64)
	s.mu.Lock()
	for _, w := range s.workers {
		k := bd{w.backend, w.device}
		pairs[k] = true
		if counts[k] == nil {
			counts[k] = make(map[State]int)
		}
		counts[k][w.state]++
		if w.run != nil {
			if health[k] == nil {
				health[k] = make(map[string]int)
			}
			hv := w.reportedHealth
			if hv == "" {
				hv = healthUnknown
			}
			health[k][hv]++
			// The monitor's last sample keeps a scrape cheap: a v1 stats read
			// costs ~0.4 ms a worker, 40 ms a scrape at 100 workers. A run not
			// sampled yet (its first sample_interval) counts from its first sample.
			if smp := w.run.sample; smp != nil {
				mem[k] += float64(smp.stats.MemoryCurrent)
				if smp.hasVRAM {
					vram[k] += float64(smp.vram)
				}
			}
		}
	}
	s.mu.Unlock()
	for k := range pairs {
		dev := strconv.Itoa(k.device)
		for _, st := range allStates {
			ch <- prometheus.MustNewConstMetric(m.workersDesc, prometheus.GaugeValue, float64(counts[k][st]), string(st), k.backend, dev)
		}
		for _, hv := range healthValues {
			ch <- prometheus.MustNewConstMetric(m.healthDesc, prometheus.GaugeValue, float64(health[k][hv]), hv, k.backend, dev)
		}
		ch <- prometheus.MustNewConstMetric(m.memoryDesc, prometheus.GaugeValue, mem[k], k.backend, dev)
		if s.cfg.Backends[k.backend].CUDA {
			ch <- prometheus.MustNewConstMetric(m.vramDesc, prometheus.GaugeValue, vram[k], k.backend, dev)
		}
	}
}

// collectRejected emits the supervisor's own rejections and the notify
// socket's drops as one family; their reasons do not overlap.
func (m *metrics) collectRejected(ch chan<- prometheus.Metric) {
	for _, r := range rejectReasons {
		var pb dto.Metric
		if err := m.heartbeatsRejected.WithLabelValues(r).Write(&pb); err == nil {
			ch <- prometheus.MustNewConstMetric(m.rejectedDesc, prometheus.CounterValue, pb.GetCounter().GetValue(), r)
		}
	}
	if m.s.deps.NotifyDrops == nil {
		return
	}
	for r, n := range m.s.deps.NotifyDrops() {
		ch <- prometheus.MustNewConstMetric(m.rejectedDesc, prometheus.CounterValue, float64(n), r)
	}
}
