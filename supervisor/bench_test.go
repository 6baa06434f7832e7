package supervisor

import (
	"context"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/supervisor/notify"
)

// report adds median and p99 of samples to the benchmark's output.
func report(b *testing.B, samples []time.Duration, what string) {
	if len(samples) == 0 {
		return
	}
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	q := func(p float64) time.Duration { return samples[int(p*float64(len(samples)-1))] }
	b.ReportMetric(float64(q(0.5).Microseconds())/1000, what+"-p50-ms")
	b.ReportMetric(float64(q(0.99).Microseconds())/1000, what+"-p99-ms")
	b.ReportMetric(float64(samples[len(samples)-1].Microseconds())/1000, what+"-max-ms")
}

// BenchmarkSpawnToRunning: POST /v1/workers/spawn until the answer, by which
// time the worker process runs inside its cgroup leaf (checked after).
func BenchmarkSpawnToRunning(b *testing.B) {
	h := newHarness(b)
	var samples []time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		res := h.spawn(map[string]any{"backend": "sim"})
		samples = append(samples, time.Since(start))
		b.StopTimer()
		wi := h.get(res.WorkerID)
		if wi.PID == nil {
			b.Fatal("no pid")
		}
		if id, err := h.cg.LeafOf(*wi.PID); err != nil || id != res.WorkerID {
			b.Fatalf("not in its leaf: %q %v", id, err)
		}
		if code, _ := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 {
			b.Fatal("stop failed")
		}
		b.StartTimer()
	}
	report(b, samples, "spawn")
}

// BenchmarkCrashToRestarted: SIGKILL a ready worker; time until its next
// process runs (zero backoff).
func BenchmarkCrashToRestarted(b *testing.B) {
	h := newHarness(b, func(c *config.Config) {
		c.Workers.Restart.BackoffBase = 0
		c.Workers.Restart.BackoffMax = 0
		c.Workers.Restart.MaxFailures = 1 << 30
	})
	res := h.spawn(map[string]any{"backend": "sim", "restart": "always"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	var samples []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		old := *wi.PID
		t0 := time.Now()
		if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		h.waitFor("restart", 10*time.Second, func() bool {
			wi = h.get(res.WorkerID)
			return wi.PID != nil && *wi.PID != old
		})
		samples = append(samples, wi.StartedAt.Sub(t0))
		b.StopTimer()
		wi = h.waitState(res.WorkerID, StateIdle, 10*time.Second)
		b.StartTimer()
	}
	report(b, samples, "restart")
}

// BenchmarkStaleDetection: a worker that never heartbeats after READY; how
// long after threshold past its last sign of life it is marked stale.
func BenchmarkStaleDetection(b *testing.B) {
	const threshold = 500 * time.Millisecond
	h := newHarness(b, func(c *config.Config) {
		c.Heartbeat.Interval = config.Duration(200 * time.Millisecond)
		c.Heartbeat.StaleThreshold = config.Duration(threshold)
		c.Heartbeat.StaleAction = "mark"
	})
	var samples []time.Duration
	for i := 0; i < b.N; i++ {
		res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_NO_HEARTBEAT": "true"}})
		h.waitState(res.WorkerID, StateIdle, 10*time.Second)
		wi := h.waitState(res.WorkerID, StateStale, 10*time.Second)
		samples = append(samples, wi.LastActivity.Sub(*wi.LastHeartbeat)-threshold)
		b.StopTimer()
		h.do("DELETE", "/v1/workers/"+res.WorkerID, nil)
		b.StartTimer()
	}
	report(b, samples, "stale-lag")
}

// BenchmarkHandleDatagram: attributing one notify datagram. A worker's main
// pid is a map lookup; any other sender costs a /proc/<pid>/cgroup read.
func BenchmarkHandleDatagram(b *testing.B) {
	h := newHarness(b)
	res := h.spawn(map[string]any{"backend": "sim"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	var fields notify.Fields
	if err := fields.Parse([]byte("WATCHDOG=1\nRBEE_HEALTH=healthy")); err != nil {
		b.Fatal(err)
	}
	b.Run("worker", func(b *testing.B) {
		b.ReportAllocs()
		pid := int32(*wi.PID)
		uid := procUID(pid)
		for i := 0; i < b.N; i++ {
			h.s.handleDatagram(pid, uid, &fields)
		}
	})
	b.Run("unknown_sender", func(b *testing.B) {
		b.ReportAllocs()
		pid := int32(syscall.Getpid())
		uid := uint32(syscall.Getuid())
		for i := 0; i < b.N; i++ {
			h.s.handleDatagram(pid, uid, &fields)
		}
	})
}

// BenchmarkBaselineExec is the floor to compare SpawnToRunning with: a
// plain fork+exec+wait of /bin/true on this machine, in the same run.
func BenchmarkBaselineExec(b *testing.B) {
	var samples []time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		if err := exec.Command("/bin/true").Run(); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, time.Since(start))
	}
	report(b, samples, "exec")
}

// BenchmarkMonitorPass: one sampling pass over 50 running workers in real
// leaves (sleeping /bin/sleep processes, so the pass is all there is to
// measure). cpu-share-% is the hive's CPU time per pass over the default
// 5 s interval; the cuda case also queries the fake GPU and lists each
// leaf's pids (every worker holds fake VRAM). gather is one /metrics
// collection of the same 50 workers, for comparison.
func BenchmarkMonitorPass(b *testing.B) {
	const workers = 50
	const interval = 5 * time.Second
	for _, cuda := range []bool{false, true} {
		name := "cpu"
		if cuda {
			name = "cuda"
		}
		b.Run(name, func(b *testing.B) {
			h := newHarness(b, func(c *config.Config) {
				c.Resources.SampleInterval = config.Duration(time.Hour) // only the benchmark samples
				c.Backends["sleeper"] = config.Backend{Command: []string{"/bin/sleep", "3600"}, Health: "callback",
					CUDA: cuda, LoadTimeout: config.Duration(time.Hour), MemoryLimit: 64 << 20}
			})
			for i := 0; i < workers; i++ {
				dev := 0
				if cuda {
					dev = i % 2
				}
				res := h.spawn(map[string]any{"backend": "sleeper", "device": dev, "vram_bytes": 1 << 30})
				if cuda {
					if err := h.gpu.SetProcess(dev, *h.get(res.WorkerID).PID, 512<<20); err != nil {
						b.Fatal(err)
					}
				}
			}
			m := newMonitor(h.s)
			ctx := context.Background()
			m.pass(ctx) // the first pass has no CPU rate to compute
			b.Run("pass", func(b *testing.B) {
				b.ReportAllocs()
				cpu0 := cpuTime(b)
				for i := 0; i < b.N; i++ {
					m.pass(ctx)
				}
				perPass := (cpuTime(b) - cpu0) / time.Duration(b.N)
				b.ReportMetric(float64(perPass.Microseconds()), "cpu-us/pass")
				b.ReportMetric(100*perPass.Seconds()/interval.Seconds(), "cpu-share-%")
			})
			b.Run("gather", func(b *testing.B) {
				cpu0 := cpuTime(b)
				for i := 0; i < b.N; i++ {
					if _, err := h.reg.Gather(); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(((cpuTime(b) - cpu0) / time.Duration(b.N)).Microseconds()), "cpu-us/gather")
			})
			if cuda {
				var sampled int
				for _, wi := range h.s.List() {
					if wi.Resources != nil && wi.Resources.VRAMBytes != nil && *wi.Resources.VRAMBytes == 512<<20 {
						sampled++
					}
				}
				if sampled != workers {
					b.Fatalf("%d of %d workers have their VRAM sampled", sampled, workers)
				}
			}
		})
	}
}

// cpuTime is this process's user+system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkIdleWorkers: what each idle worker costs the hive: sleeping
// /bin/sleep workers (no notify socket, no health probe, nothing written)
// are spawned up to 100, then up to 1000, in one hive; goroutines, OS
// threads and anonymous memory are compared with the same hive before the
// spawns (per worker at 100 and 1000) and between 100 and 1000 (marginal,
// free of fixed costs such as the first heap growth). Figures are taken
// after a GC. Run it with -benchtime 1x.
func BenchmarkIdleWorkers(b *testing.B) {
	h := newHarness(b, func(c *config.Config) {
		c.Resources.SampleInterval = config.Duration(time.Hour)
		c.Workers.ShutdownBudget = config.Duration(time.Minute)
		c.Backends["sleeper"] = config.Backend{Command: []string{"/bin/sleep", "3600"}, Health: "callback",
			LoadTimeout: config.Duration(time.Hour), MemoryLimit: 64 << 20}
	})
	if b.N > 1 {
		b.Fatal("run with -benchtime 1x")
	}
	type figures struct{ goroutines, threads, anonKiB, heapKiB int }
	measure := func() figures {
		g, th, anon := idleFigures(b)
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return figures{g, th, anon, int(ms.HeapInuse >> 10)}
	}
	per := func(a, z figures, n int, label string) {
		b.ReportMetric(float64(z.goroutines-a.goroutines)/float64(n), "goroutines/worker"+label)
		b.ReportMetric(float64(z.threads-a.threads)/float64(n), "threads/worker"+label)
		b.ReportMetric(float64(z.anonKiB-a.anonKiB)/float64(n), "anon-KiB/worker"+label)
		b.ReportMetric(float64(z.heapKiB-a.heapKiB)/float64(n), "heap-KiB/worker"+label)
	}
	base := measure()
	b.ResetTimer()
	for range 100 {
		h.spawn(map[string]any{"backend": "sleeper"})
	}
	b.StopTimer()
	at100 := measure()
	b.StartTimer()
	for range 900 {
		h.spawn(map[string]any{"backend": "sleeper"})
	}
	b.StopTimer()
	at1000 := measure()
	per(base, at100, 100, "@100")
	per(base, at1000, 1000, "@1000")
	per(at100, at1000, 900, "@100-1000")
	b.ReportMetric(float64(at1000.threads), "threads@1000")
	b.ReportMetric(float64(at1000.goroutines), "goroutines@1000")
	b.ReportMetric(float64(at1000.anonKiB)/1024, "anon-MiB@1000")
}

// idleFigures settles the heap, then reads the goroutine count and this
// process's thread count and anonymous resident memory (KiB).
func idleFigures(b *testing.B) (goroutines, threads, anonKiB int) {
	time.Sleep(200 * time.Millisecond) // let starts and pumps settle
	runtime.GC()
	debug.FreeOSMemory()
	st, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(st), "\n") {
		k, v, _ := strings.Cut(line, ":")
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		switch k {
		case "Threads":
			threads, _ = strconv.Atoi(f[0])
		case "RssAnon":
			anonKiB, _ = strconv.Atoi(f[0])
		}
	}
	return runtime.NumGoroutine(), threads, anonKiB
}

// BenchmarkSpawnIsolation: POST /v1/workers/spawn until the answer (the
// process runs in its leaf), then until READY=1, for workers started as
// before isolation (root, all capabilities: the baseline), as root with
// the capability drop (user = "root"), and under a uid of their own (the
// default), interleaved in one loop so that load on the host hits all three
// alike. Report ratios of the p50s against root-all-caps.
func BenchmarkSpawnIsolation(b *testing.B) {
	h := newHarness(b, func(c *config.Config) {
		root := c.Backends["sim"]
		root.User = "root"
		c.Backends["simroot"] = root
	})
	modes := []struct {
		name, backend string
		noIsolation   bool
	}{{"rootcaps", "simroot", true}, {"rootdrop", "simroot", false}, {"uid", "sim", false}}
	spawn := make([][]time.Duration, len(modes))
	ready := make([][]time.Duration, len(modes))
	for i := 0; i < b.N; i++ {
		for m, mode := range modes {
			b.StopTimer()
			h.s.mu.Lock()
			h.s.noIsolation = mode.noIsolation
			h.s.mu.Unlock()
			b.StartTimer()
			start := time.Now()
			res := h.spawn(map[string]any{"backend": mode.backend})
			spawn[m] = append(spawn[m], time.Since(start))
			h.waitState(res.WorkerID, StateIdle, 20*time.Second)
			ready[m] = append(ready[m], time.Since(start))
			b.StopTimer()
			if code, _ := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 {
				b.Fatal("stop failed")
			}
			b.StartTimer()
		}
	}
	for m, mode := range modes {
		report(b, spawn[m], mode.name+"-spawn")
		report(b, ready[m], mode.name+"-ready")
	}
}
