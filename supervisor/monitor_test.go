package supervisor

import (
	"context"
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
)

const mib = 1 << 20

// sampleEvery sets a test-sized sample interval and the VRAM limit.
func sampleEvery(d time.Duration, factor float64, action string) func(*config.Config) {
	return func(c *config.Config) {
		c.Resources.SampleInterval = config.Duration(d)
		c.Resources.VRAMLimitFactor = factor
		c.Resources.VRAMLimitAction = config.Action(action)
	}
}

// getJSON is GET /v1/workers/{id} through the API.
func (h *harness) getJSON(id string) WorkerInfo {
	h.t.Helper()
	code, body := h.do("GET", "/v1/workers/"+id, nil)
	if code != 200 {
		h.t.Fatalf("GET %s: %d %s", id, code, body)
	}
	var wi WorkerInfo
	if err := json.Unmarshal(body, &wi); err != nil {
		h.t.Fatal(err)
	}
	return wi
}

// TestMonitorRAMAndCPU: a simworker that touches 64 MiB while loading shows
// it in its sampled memory, with a CPU rate once there are two samples, in
// GET /v1/workers/{id} and in the list.
func TestMonitorRAMAndCPU(t *testing.T) {
	h := newHarness(t, sampleEvery(100*time.Millisecond, 1.5, "log"))
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_ALLOC_MIB": "64"}})
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	// Only a sample taken after READY (allocation done) counts: under qemu
	// the 64 MiB are still being touched while earlier samples are taken.
	ready := time.Now()
	var wi WorkerInfo
	h.waitFor("two samples after READY", 5*time.Second, func() bool {
		wi = h.getJSON(res.WorkerID)
		return wi.Resources != nil && wi.Resources.CPUPercent != nil && wi.Resources.SampledAt.After(ready)
	})
	r := wi.Resources
	if r.MemoryCurrentBytes < 64*mib || r.MemoryPeakBytes < r.MemoryCurrentBytes {
		t.Errorf("memory current %d peak %d, want ≥ 64 MiB and peak ≥ current", r.MemoryCurrentBytes, r.MemoryPeakBytes)
	}
	if *r.CPUPercent < 0 || r.SampledAt.IsZero() || time.Since(r.SampledAt) > 5*time.Second {
		t.Errorf("cpu %v%% sampled at %v", *r.CPUPercent, r.SampledAt)
	}
	if r.VRAMBytes != nil || r.VRAMLimitBytes != nil {
		t.Errorf("a CPU worker has VRAM figures: %+v", r)
	}
	var listed bool
	for _, w := range h.s.List() {
		if w.ID == res.WorkerID {
			listed = w.Resources != nil && w.Resources.MemoryCurrentBytes >= 64*mib
		}
	}
	if !listed {
		t.Error("the list does not show the worker's sampled resources")
	}
}

// TestMonitorVRAM: a cuda worker's VRAM is the fake GPU's per-process use
// of the pids in its cgroup; over expected × factor it is logged and
// counted once per crossing, and with action kill stopped with reason
// vram_limit and then handled by its restart policy.
func TestMonitorVRAM(t *testing.T) {
	tests := []struct {
		name    string
		action  string
		restart RestartPolicy
	}{
		{"log keeps it running", "log", "on-failure"},
		{"kill restarts on-failure", "kill", "on-failure"},
		{"kill with restart never fails it", "kill", "never"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, sampleEvery(100*time.Millisecond, 1.5, tc.action))
			res := h.spawn(map[string]any{"backend": "gpu", "device": 0, "vram_bytes": 1 << 30, "restart": tc.restart})
			wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
			pid := *wi.PID
			labels := map[string]string{"backend": "gpu", "device": "0"}

			if err := h.gpu.SetProcess(0, pid, 512*mib); err != nil {
				t.Fatal(err)
			}
			h.waitFor("the VRAM sample", 5*time.Second, func() bool {
				wi = h.getJSON(res.WorkerID)
				return wi.Resources != nil && wi.Resources.VRAMBytes != nil && *wi.Resources.VRAMBytes == 512*mib
			})
			if l := wi.Resources.VRAMLimitBytes; l == nil || *l != 1536*mib || wi.Resources.VRAMOverLimit {
				t.Errorf("limit %v over %v, want 1.5 GiB and false", l, wi.Resources.VRAMOverLimit)
			}
			if got := counter(t, h.reg, "rbee_hive_worker_vram_bytes", labels); got != 512*mib {
				t.Errorf("rbee_hive_worker_vram_bytes{gpu,0} = %v", got)
			}
			if problems, err := testutil.GatherAndLint(h.reg); err != nil || len(problems) > 0 {
				t.Errorf("lint: %v %v", problems, err)
			}

			if err := h.gpu.SetProcess(0, pid, 2<<30); err != nil {
				t.Fatal(err)
			}
			h.waitFor("the limit to be counted", 5*time.Second, func() bool {
				return counter(t, h.reg, "rbee_hive_worker_vram_limit_exceeded_total", labels) == 1
			})
			if tc.action == "log" {
				time.Sleep(500 * time.Millisecond) // five more samples, still over
				if n := strings.Count(h.logs.String(), "worker over its VRAM limit"); n != 1 {
					t.Errorf("logged %d times, want once per crossing", n)
				}
				wi = h.getJSON(res.WorkerID)
				if wi.State != StateIdle || *wi.PID != pid || !wi.Resources.VRAMOverLimit {
					t.Errorf("state %s pid %d over %v, want the same idle worker, over its limit", wi.State, *wi.PID, wi.Resources.VRAMOverLimit)
				}
				// Back under, then over again: a second crossing.
				_ = h.gpu.SetProcess(0, pid, 512*mib)
				h.waitFor("back under", 5*time.Second, func() bool { return !h.getJSON(res.WorkerID).Resources.VRAMOverLimit })
				_ = h.gpu.SetProcess(0, pid, 2<<30)
				h.waitFor("a second crossing", 5*time.Second, func() bool {
					return counter(t, h.reg, "rbee_hive_worker_vram_limit_exceeded_total", labels) == 2
				})
				return
			}

			want := StateIdle
			if tc.restart == RestartNever {
				want = StateFailed
			}
			h.waitFor("the vram_limit exit", 10*time.Second, func() bool {
				return counter(t, h.reg, "rbee_hive_worker_exits_total", map[string]string{"reason": string(ReasonVRAMLimit)}) == 1
			})
			_ = h.gpu.ExitProcess(0, pid) // the driver frees a dead process's memory
			wi = h.waitState(res.WorkerID, want, 10*time.Second)
			if wi.ExitReason != ReasonVRAMLimit {
				t.Errorf("exit reason %q, want %q", wi.ExitReason, ReasonVRAMLimit)
			}
			if alive(pid) {
				t.Errorf("pid %d still alive", pid)
			}
			restarts := counter(t, h.reg, "rbee_hive_worker_restarts_total", map[string]string{"reason": string(ReasonVRAMLimit)})
			if tc.restart == RestartNever {
				if restarts != 0 || wi.RestartCount != 0 {
					t.Errorf("restarted %v/%d times with restart=never", restarts, wi.RestartCount)
				}
				return
			}
			if restarts != 1 || wi.RestartCount != 1 || wi.PID == nil || *wi.PID == pid {
				t.Errorf("restarts %v count %d pid %v, want one restart with a new pid", restarts, wi.RestartCount, wi.PID)
			}
			// The new run starts under its limit and stays up.
			time.Sleep(300 * time.Millisecond)
			if got := counter(t, h.reg, "rbee_hive_worker_vram_limit_exceeded_total", labels); got != 1 {
				t.Errorf("exceeded = %v after the restart, want 1", got)
			}
			if wi = h.get(res.WorkerID); wi.State != StateIdle {
				t.Errorf("restarted worker is %s", wi.State)
			}
		})
	}
}

// TestMonitorVRAMForkedChild: GPU memory held by a child of the worker (a
// pid other than the main one, in the same cgroup) counts for the worker.
func TestMonitorVRAMForkedChild(t *testing.T) {
	h := newHarness(t, sampleEvery(100*time.Millisecond, 1.5, "log"), func(c *config.Config) {
		be := c.Backends["forker"]
		be.CUDA = true
		c.Backends["gpufork"] = be
	})
	res := h.spawn(map[string]any{"backend": "gpufork", "device": 1, "vram_bytes": 1 << 30})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	leaf, err := h.cg.Load(res.WorkerID)
	if err != nil {
		t.Fatal(err)
	}
	var child int
	h.waitFor("the forked child", 5*time.Second, func() bool {
		pids, _ := leaf.Pids()
		for _, p := range pids {
			if p != *wi.PID {
				child = p
			}
		}
		return child != 0
	})
	_ = h.gpu.SetProcess(1, *wi.PID, 100*mib)
	_ = h.gpu.SetProcess(1, child, 300*mib)
	_ = h.gpu.SetProcess(1, syscall.Getpid(), 5<<30) // not the worker's
	h.waitFor("main + child VRAM", 5*time.Second, func() bool {
		r := h.get(res.WorkerID).Resources
		return r != nil && r.VRAMBytes != nil && *r.VRAMBytes == 400*mib
	})
	if got := counter(t, h.reg, "rbee_hive_worker_vram_bytes", map[string]string{"backend": "gpufork", "device": "1"}); got != 400*mib {
		t.Errorf("rbee_hive_worker_vram_bytes{gpufork,1} = %v", got)
	}
}

// TestMonitorGPUFailure: a GPU query that fails leaves VRAM unsampled (no
// limit action on missing data), logs once, and keeps RAM sampling going.
func TestMonitorGPUFailure(t *testing.T) {
	h := newHarness(t, sampleEvery(100*time.Millisecond, 1.5, "kill"))
	res := h.spawn(map[string]any{"backend": "gpu", "device": 0, "vram_bytes": 1 << 20})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	_ = h.gpu.SetProcess(0, *wi.PID, 1<<30)
	_ = h.gpu.Close() // every query now fails
	h.waitFor("a RAM sample", 5*time.Second, func() bool {
		r := h.get(res.WorkerID).Resources
		return r != nil && r.CPUPercent != nil
	})
	time.Sleep(300 * time.Millisecond)
	if r := h.get(res.WorkerID).Resources; r.VRAMBytes != nil {
		t.Errorf("VRAM %d reported from a failing GPU", *r.VRAMBytes)
	}
	if n := strings.Count(h.logs.String(), "reading GPU processes failed"); n != 1 {
		t.Errorf("GPU failure logged %d times, want once", n)
	}
	if st := h.get(res.WorkerID).State; st != StateIdle {
		t.Errorf("state %s, want idle", st)
	}
}

// TestMonitorStopsWithRun: Run's monitor goroutine ends with its context.
func TestMonitorStopsWithRun(t *testing.T) {
	h := newHarness(t)
	s, err := New(h.cfg, Deps{Cgroups: h.cg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = s.Run(ctx); close(done) }()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
}

// fixedStats wraps a cgroup manager so that Leaf.Stats answers a constant
// without reading the kernel: what is left of a monitor pass is the
// supervisor's own work.
type fixedStats struct{ cgroup.Manager }

func (m fixedStats) Create(id string, l cgroup.Limits) (cgroup.Leaf, error) {
	leaf, err := m.Manager.Create(id, l)
	if err != nil {
		return nil, err
	}
	return fixedStatsLeaf{leaf}, nil
}

type fixedStatsLeaf struct{ cgroup.Leaf }

func (fixedStatsLeaf) Stats() (cgroup.Stats, error) {
	return cgroup.Stats{MemoryCurrent: 1 << 20, CPUUsage: time.Second}, nil
}

// TestMonitorPassAllocatesNothing: beyond the cgroup reads, a pass over
// running workers allocates nothing (no per-pass lists, no per-worker
// samples), and it still stores every worker's sample.
func TestMonitorPassAllocatesNothing(t *testing.T) {
	const workers = 20
	h := newHarnessWrapped(t, func(m cgroup.Manager) cgroup.Manager { return fixedStats{m} }, func(c *config.Config) {
		c.Resources.SampleInterval = config.Duration(time.Hour)
		c.Backends["sleeper"] = config.Backend{Command: []string{"/bin/sleep", "3600"}, Health: "callback",
			LoadTimeout: config.Duration(time.Hour), MemoryLimit: 64 << 20}
	})
	for i := 0; i < workers; i++ {
		h.spawn(map[string]any{"backend": "sleeper"})
	}
	m := newMonitor(h.s)
	ctx := context.Background()
	m.pass(ctx) // sizes the monitor's lists and each run's sample
	if n := testing.AllocsPerRun(20, func() { m.pass(ctx) }); n != 0 {
		t.Errorf("%v allocations per pass over %d workers, want 0", n, workers)
	}
	for _, wi := range h.s.List() {
		if wi.Resources == nil || wi.Resources.MemoryCurrentBytes != 1<<20 {
			t.Fatalf("worker %s not sampled: %+v", wi.ID, wi.Resources)
		}
	}
}
