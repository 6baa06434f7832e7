package supervisor

import (
	"context"
	"log/slog"
	"math"
	"strconv"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
	workerproto "github.com/rbee/rbee-hive/worker"
)

// gpuQueryTimeout bounds one GPU process query, so a hung driver delays a
// pass instead of stopping the monitor.
const gpuQueryTimeout = 2 * time.Second

// resourceSample is one monitor reading of a run.
type resourceSample struct {
	at      time.Time
	stats   cgroup.Stats
	cpuRate float64 // CPU seconds per second since the run's previous sample
	hasRate bool
	vram    uint64
	hasVRAM bool // a cuda worker whose GPU answered
}

// monitor samples every running worker's RAM, CPU and VRAM. Its state
// belongs to the one goroutine that runs it.
type monitor struct {
	s *Supervisor
	// gpuDown remembers which GPUs failed their last query, so a broken
	// driver is logged when it breaks and when it recovers, not each pass.
	gpuDown map[int]bool
}

func newMonitor(s *Supervisor) *monitor { return &monitor{s: s, gpuDown: make(map[int]bool)} }

// run samples every resources.sample_interval until ctx ends.
func (m *monitor) run(ctx context.Context) {
	t := time.NewTicker(m.s.cfg.Resources.SampleInterval.D())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.pass(ctx)
		}
	}
}

type sampleTarget struct {
	w      *worker
	r      *run
	cuda   bool
	device int
	prev   *resourceSample
}

// pass reads every running worker's cgroup and, for cuda workers, its
// GPU's per-process memory (one query per GPU), then stores the samples and
// applies the VRAM limit. s.mu is held only to list the runs and to store
// the results, never across a read from the kernel or the driver.
func (m *monitor) pass(ctx context.Context) {
	s := m.s
	s.mu.Lock()
	targets := make([]sampleTarget, 0, len(s.workers))
	for _, w := range s.workers {
		if w.run != nil {
			targets = append(targets, sampleTarget{w: w, r: w.run, cuda: w.backendCfg.CUDA, device: w.device, prev: w.run.sample})
		}
	}
	s.mu.Unlock()
	if len(targets) == 0 {
		return
	}
	samples := make([]*resourceSample, len(targets))
	gpuProcs := make(map[int]map[int]uint64) // device → pid → bytes; nil: the query failed
	for i, t := range targets {
		if ctx.Err() != nil {
			return
		}
		st, err := t.r.leaf.Stats()
		if err != nil {
			continue // the run is ending; its waiter removes the leaf
		}
		now := time.Now()
		smp := &resourceSample{at: now, stats: st}
		if p := t.prev; p != nil && now.After(p.at) && st.CPUUsage >= p.stats.CPUUsage {
			smp.cpuRate = (st.CPUUsage - p.stats.CPUUsage).Seconds() / now.Sub(p.at).Seconds()
			smp.hasRate = true
		}
		if t.cuda && s.deps.GPUs != nil {
			procs, ok := gpuProcs[t.device]
			if !ok {
				procs = m.gpuProcesses(ctx, t.device)
				gpuProcs[t.device] = procs
			}
			if procs != nil {
				smp.vram, smp.hasVRAM = vramOf(t.r.leaf, procs)
			}
		}
		samples[i] = smp
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, t := range targets {
		if samples[i] == nil || t.w.run != t.r {
			continue
		}
		t.r.sample = samples[i]
		s.checkVRAM(t.w, t.r)
	}
}

// gpuProcesses returns GPU index's processes as pid → bytes, or nil when
// the query failed.
func (m *monitor) gpuProcesses(ctx context.Context, index int) map[int]uint64 {
	qctx, cancel := context.WithTimeout(ctx, gpuQueryTimeout)
	procs, err := m.s.deps.GPUs.GPUProcesses(qctx, index)
	cancel()
	if err != nil {
		if !m.gpuDown[index] && ctx.Err() == nil {
			m.s.log.Warn("reading GPU processes failed; worker VRAM not sampled", slog.Int("device", index), slog.Any("err", err))
		}
		m.gpuDown[index] = true
		return nil
	}
	if m.gpuDown[index] {
		m.s.log.Info("reading GPU processes works again", slog.Int("device", index))
		delete(m.gpuDown, index)
	}
	out := make(map[int]uint64, len(procs))
	for _, p := range procs {
		out[p.PID] += p.UsedBytes
	}
	return out
}

// vramOf sums the GPU memory of every process in leaf: llama-server and
// friends may fork, and the driver reports whichever pid holds the context.
func vramOf(leaf cgroup.Leaf, procs map[int]uint64) (uint64, bool) {
	if len(procs) == 0 {
		return 0, true // nobody on this GPU: no need to list the leaf
	}
	pids, err := leaf.Pids()
	if err != nil {
		return 0, false
	}
	var sum uint64
	for _, pid := range pids {
		sum += procs[pid]
	}
	return sum, true
}

// vramLimit is w's VRAM limit in bytes; 0: none (no expectation known).
func (s *Supervisor) vramLimit(w *worker) uint64 {
	if w.vramExpected == 0 {
		return 0
	}
	return uint64(math.Ceil(float64(w.vramExpected) * s.cfg.Resources.VRAMLimitFactor))
}

// checkVRAM applies resources.vram_limit_* to r's latest sample: one log
// line and one count per crossing of the limit, and with action "kill" a
// stop whose exit reason is vram_limit (the restart policy then applies as
// to any failure). Caller holds s.mu.
func (s *Supervisor) checkVRAM(w *worker, r *run) {
	smp := r.sample
	limit := s.vramLimit(w)
	if smp == nil || !smp.hasVRAM || limit == 0 {
		return
	}
	if smp.vram <= limit {
		if r.overVRAM {
			r.overVRAM = false
			w.log.Info("worker back under its VRAM limit", slog.Uint64("vram_bytes", smp.vram), slog.Uint64("limit_bytes", limit))
		}
		return
	}
	if r.overVRAM {
		return
	}
	r.overVRAM = true
	s.m.vramExceeded.WithLabelValues(w.backend, strconv.Itoa(w.device)).Inc()
	action := s.cfg.Resources.VRAMLimitAction
	w.log.Warn("worker over its VRAM limit", slog.Uint64("vram_bytes", smp.vram), slog.Uint64("expected_bytes", w.vramExpected),
		slog.Uint64("limit_bytes", limit), slog.Float64("factor", s.cfg.Resources.VRAMLimitFactor), slog.String("action", string(action)))
	if action != config.ActionKill || w.killReason != "" || w.state == StateStopping {
		return
	}
	w.killReason = ReasonVRAMLimit
	s.clearDeadline(w)
	s.setState(w, StateStopping, string(ReasonVRAMLimit))
	s.stopRunAsync(w, r)
}

// resources turns r's latest sample into the API's figures. Caller holds s.mu.
func (s *Supervisor) resources(w *worker, r *run) *Resources {
	smp := r.sample
	if smp == nil {
		return nil
	}
	res := resourcesOf(smp.stats, smp.at)
	if smp.hasRate {
		pct := math.Round(smp.cpuRate*10000) / 100
		res.CPUPercent = &pct
	}
	if smp.hasVRAM {
		v := smp.vram
		res.VRAMBytes = &v
		if lim := s.vramLimit(w); lim > 0 {
			res.VRAMLimitBytes = &lim
			res.VRAMOverLimit = r.overVRAM
		}
	} else if v, err := strconv.ParseUint(w.figures[workerproto.KeyVRAMBytes], 10, 64); err == nil {
		res.VRAMBytes = &v
	}
	return res
}

func resourcesOf(st cgroup.Stats, at time.Time) *Resources {
	return &Resources{MemoryCurrentBytes: st.MemoryCurrent, MemoryPeakBytes: st.MemoryPeak,
		CPUSeconds: st.CPUUsage.Seconds(), Pids: st.PidsCurrent, OOMKills: st.OOMKills, SampledAt: at}
}
