package main

import (
	"context"
	"log/slog"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/admission"
	"github.com/rbee/rbee-hive/admission/estimate"
	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/model"
	"github.com/rbee/rbee-hive/proxy"
	"github.com/rbee/rbee-hive/supervisor"
	"github.com/rbee/rbee-hive/supervisor/notify"
	"github.com/rbee/rbee-hive/systemd"
)

// The adapters below fit each package's own API to the small interfaces the
// supervisor declares, so that neither side imports the other's internals.

// admitter estimates a GPU worker's VRAM from its model file when the
// request named none, then asks the ledger.
type admitter struct {
	ledger *admission.Ledger
	log    *slog.Logger
}

func (a admitter) Admit(ctx context.Context, req supervisor.AdmitRequest) (supervisor.Claim, error) {
	r := admission.Request{WorkerID: req.WorkerID, MemoryBytes: uint64(req.MemoryBytes)}
	if req.CUDA {
		dev := req.Device
		r.GPU = &dev
		r.VRAMBytes = req.VRAMBytes
		if r.VRAMBytes == 0 && req.ModelPath != "" {
			est, err := estimate.EstimateWith(req.ModelPath, estimate.Options{ContextSize: req.ContextSize, Parallel: req.Parallel})
			if err != nil {
				// No estimate is no reason to refuse: the margin still applies
				// and the monitor watches real use.
				a.log.Warn("VRAM estimate failed", "worker_id", req.WorkerID, "model", req.ModelRef, "err", err)
			} else {
				r.VRAMBytes = est.VRAMBytes
			}
		}
	}
	if !req.CUDA && req.ModelPath != "" && req.MemoryBytes > 0 {
		a.warnCPU(req)
	}
	c, err := a.ledger.Admit(ctx, r)
	if err != nil {
		return nil, err
	}
	return claim{Claim: c, vram: r.VRAMBytes}, nil
}

// warnCPU logs when a CPU worker's memory limit is below what its GGUF
// model needs at the backend's context and slots: the worker will be OOM
// killed, which the operator may want (a probe), so it is not refused.
func (a admitter) warnCPU(req supervisor.AdmitRequest) {
	est, err := estimate.EstimateWith(req.ModelPath, estimate.Options{ContextSize: req.ContextSize, Parallel: req.Parallel, CPU: true})
	if err != nil || est.RAMBytes == 0 {
		return // not a GGUF model, or no figure: nothing to compare
	}
	if uint64(req.MemoryBytes) < est.RAMBytes {
		a.log.Warn("memory limit below the model's estimated need", "worker_id", req.WorkerID, "model", req.ModelRef,
			"memory_limit_bytes", req.MemoryBytes, "estimate_bytes", est.RAMBytes, "context_size", req.ContextSize, "parallel", req.Parallel)
	}
}

// claim is a ledger claim that remembers the VRAM it was admitted for, so
// the supervisor's monitor can hold the worker to it (vram_limit_factor).
type claim struct {
	*admission.Claim
	vram uint64
}

func (c claim) VRAMBytes() uint64 { return c.vram }

// modelStore adapts model.Store to the supervisor's ModelStore.
type modelStore struct{ store *model.Store }

func (m modelStore) Acquire(ref string) func() { return m.store.Acquire(ref) }

func (m modelStore) Ensure(ctx context.Context, ref string) (string, <-chan supervisor.ModelResult, error) {
	path, wait, err := m.store.Ensure(ctx, ref)
	if err != nil || wait == nil {
		return path, nil, err
	}
	out := make(chan supervisor.ModelResult, 1)
	go func() {
		r := <-wait // the store delivers exactly once, also when it closes
		out <- supervisor.ModelResult{Path: r.LocalPath, Err: r.Err}
	}()
	return "", out, nil
}

// proxyAdapter adapts proxy.Proxy to the supervisor's Proxy.
type proxyAdapter struct{ px *proxy.Proxy }

func (p proxyAdapter) Forward(w http.ResponseWriter, r *http.Request, t supervisor.ProxyTarget) {
	// A served model's workers are labelled by its name: the set operators
	// chose, bounded, and what clients of /openai/v1/ send as model.
	labels := proxy.Labels{Backend: t.Backend, Model: canonicalRef(t.Model)}
	if t.Served != "" {
		labels.Model = t.Served
	}
	hooks := proxy.Hooks{
		OnStart: t.OnStart,
		OnEnd:   t.OnEnd,
		Prepare: func(out *http.Request) {
			if t.Token != "" {
				out.Header.Set("Authorization", "Bearer "+t.Token)
			}
		},
	}
	if t.API == string(config.APIOpenAI) {
		p.px.ServeOpenAI(w, r, t.URL, proxy.Route(t.Route), labels, hooks)
		return
	}
	p.px.Serve(w, r, t.URL, labels, hooks)
}

// canonicalRef is a model reference's catalog spelling, so that hf:a/b and
// hf:a/b@main share one metric series.
func canonicalRef(ref string) string {
	if r, err := model.ParseRef(ref); err == nil {
		return r.String()
	}
	return ref
}

// fakeDevices turns the config's [[gpu.fake]] entries into the fake driver's
// devices (used when gpu.driver = "fake").
func fakeDevices(cfg *config.Config) []gpu.FakeDevice {
	out := make([]gpu.FakeDevice, 0, len(cfg.GPU.Fake))
	for _, f := range cfg.GPU.Fake {
		out = append(out, gpu.FakeDevice{UUID: f.UUID, Name: f.Name, MemoryTotal: uint64(f.MemoryTotal)})
	}
	return out
}

// gpuList adapts gpu.GPUs to the supervisor's GPUs.
type gpuList struct{ g gpu.GPUs }

func (l gpuList) GPUDevices(ctx context.Context) ([]supervisor.GPUDevice, error) {
	devs, err := l.g.Devices(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]supervisor.GPUDevice, 0, len(devs))
	for _, d := range devs {
		out = append(out, supervisor.GPUDevice{Index: d.Index, UUID: d.UUID})
	}
	return out, nil
}

func (l gpuList) GPUProcesses(ctx context.Context, index int) ([]supervisor.GPUProcess, error) {
	procs, err := l.g.Processes(ctx, index)
	if err != nil {
		return nil, err
	}
	out := make([]supervisor.GPUProcess, 0, len(procs))
	for _, p := range procs {
		out = append(out, supervisor.GPUProcess{PID: p.PID, UsedBytes: p.UsedMemory})
	}
	return out, nil
}

// hiveCollector exports counters owned by the wiring: notify datagrams and
// log entries journald could not take.
type hiveCollector struct {
	listener *notify.Listener
	journal  *systemd.WorkerJournal
	received *prometheus.Desc
	dropped  *prometheus.Desc
}

func newHiveCollector(l *notify.Listener, j *systemd.WorkerJournal) *hiveCollector {
	return &hiveCollector{
		listener: l,
		journal:  j,
		received: prometheus.NewDesc("rbee_hive_notify_datagrams_received_total",
			"Datagrams read from the notify socket, accepted or not.", nil, nil),
		dropped: prometheus.NewDesc("rbee_hive_log_entries_dropped_total",
			"Worker output lines journald could not take in time (the log file and tail still have them).", nil, nil),
	}
}

func (c *hiveCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.received
	ch <- c.dropped
}

func (c *hiveCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.received, prometheus.CounterValue, float64(c.listener.Stats().Received))
	var dropped uint64
	if c.journal != nil {
		dropped = c.journal.Dropped()
	}
	ch <- prometheus.MustNewConstMetric(c.dropped, prometheus.CounterValue, float64(dropped))
}
