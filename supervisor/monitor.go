package supervisor

import (
	"context"
	"log/slog"
	"math"
	"slices"
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
// belongs to the one goroutine that runs it; the slices and maps are kept
// from pass to pass so that a pass allocates nothing of its own.
type monitor struct {
	s *Supervisor
	// gpuDown remembers which GPUs failed their last query, so a broken
	// driver is logged when it breaks and when it recovers, not each pass.
	gpuDown map[int]bool
	targets []sampleTarget
	samples []resourceSample // samples[i] is targets[i]'s; at.IsZero(): none
	// gpuProcs is this pass's per-process VRAM by device (pid → bytes); a
	// device present with a nil map failed its query.
	gpuProcs map[int]map[int]uint64
	gpuSpare map[int]map[int]uint64 // last pass's maps, reused by device
}

func newMonitor(s *Supervisor) *monitor {
	return &monitor{s: s, gpuDown: make(map[int]bool), gpuProcs: make(map[int]map[int]uint64), gpuSpare: make(map[int]map[int]uint64)}
}

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
	// the run's previous sample, for the CPU rate (hasPrev false: none)
	prevAt  time.Time
	prevCPU time.Duration
	hasPrev bool
}

// pass reads every running worker's cgroup and, for cuda workers, its
// GPU's per-process memory (one query per GPU), then stores the samples and
// applies the VRAM limit. s.mu is held only to list the runs and to store
// the results, never across a read from the kernel or the driver.
func (m *monitor) pass(ctx context.Context) {
	s := m.s
	s.mu.Lock()
	targets := m.targets[:0]
	for _, w := range s.workers {
		if w.run == nil {
			continue
		}
		t := sampleTarget{w: w, r: w.run, cuda: w.backendCfg.CUDA, device: w.device}
		if p := w.run.sample; p != nil {
			t.prevAt, t.prevCPU, t.hasPrev = p.at, p.stats.CPUUsage, true
		}
		targets = append(targets, t)
	}
	s.mu.Unlock()
	m.targets = targets
	defer clear(m.targets) // drop the worker pointers until the next pass
	if len(targets) == 0 {
		return
	}
	samples := slices.Grow(m.samples[:0], len(targets))[:len(targets)]
	m.samples = samples
	m.startGPUPass()
	for i, t := range targets {
		samples[i] = resourceSample{}
		if ctx.Err() != nil {
			return
		}
		st, err := t.r.leaf.Stats()
		if err != nil {
			continue // the run is ending; its waiter removes the leaf
		}
		now := time.Now()
		smp := &samples[i]
		smp.at, smp.stats = now, st
		if t.hasPrev && now.After(t.prevAt) && st.CPUUsage >= t.prevCPU {
			smp.cpuRate = (st.CPUUsage - t.prevCPU).Seconds() / now.Sub(t.prevAt).Seconds()
			smp.hasRate = true
		}
		if t.cuda && s.deps.GPUs != nil {
			procs, ok := m.gpuProcs[t.device]
			if !ok {
				procs = m.gpuProcesses(ctx, t.device)
				m.gpuProcs[t.device] = procs
			}
			if procs != nil {
				smp.vram, smp.hasVRAM = vramOf(t.r.leaf, procs)
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, t := range targets {
		if samples[i].at.IsZero() || t.w.run != t.r {
			continue
		}
		if t.r.sample == nil {
			t.r.sample = new(resourceSample) // once per run, overwritten after
		}
		*t.r.sample = samples[i]
		s.checkVRAM(t.w, t.r)
	}
}

// startGPUPass forgets the last pass's GPU answers, keeping their maps for
// reuse.
func (m *monitor) startGPUPass() {
	for dev, procs := range m.gpuProcs {
		if procs != nil {
			clear(procs)
			m.gpuSpare[dev] = procs
		}
	}
	clear(m.gpuProcs)
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
	out := m.gpuSpare[index]
	if out == nil {
		out = make(map[int]uint64, len(procs))
	}
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
