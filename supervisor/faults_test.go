package supervisor

import (
	"context"
	"net/http"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
)

func TestOOMIsReasonOOMAndRestarted(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.Workers.Restart.MaxFailures = 2 })
	res := h.spawn(map[string]any{"backend": "sim", "memory_limit_bytes": 64 << 20,
		"env": map[string]string{"RBEE_SIM_ALLOC_MIB": "256"}})
	var wi WorkerInfo
	h.waitFor("an OOM exit", 20*time.Second, func() bool {
		wi = h.get(res.WorkerID)
		return wi.ExitReason != ""
	})
	if wi.ExitReason != ReasonOOM {
		t.Fatalf("exit reason %q, want oom (%+v)", wi.ExitReason, wi)
	}
	// Counted, backed off and retried, then the breaker stops it: no hot loop.
	wi = h.waitState(res.WorkerID, StateFailed, 20*time.Second)
	if wi.RestartCount != 1 || wi.ExitReason != ReasonOOM {
		t.Errorf("after OOMs: restarts %d reason %q", wi.RestartCount, wi.ExitReason)
	}
	if got := counter(t, h.reg, "rbee_hive_worker_oom_kills_total", nil); got != 2 {
		t.Errorf("oom_kills_total = %v, want 2", got)
	}
	if got := counter(t, h.reg, "rbee_hive_worker_restarts_total", map[string]string{"reason": "oom"}); got != 1 {
		t.Errorf("restarts{oom} = %v", got)
	}
}

func TestIgnoredSIGTERMIsKilledAfterGrace(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.Workers.GracePeriod = config.Duration(500 * time.Millisecond) })
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_IGNORE_SIGTERM": "true"}})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	start := time.Now()
	code, body := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil)
	took := time.Since(start)
	if code != 200 {
		t.Fatalf("delete: %d %s", code, body)
	}
	if took < 500*time.Millisecond || took > 5*time.Second {
		t.Errorf("stop took %s; want grace (500ms) then a kill", took)
	}
	if alive(*wi.PID) {
		t.Error("worker survived")
	}
}

func TestForkedGrandchildIsCleanedUp(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "forker"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	leaf, err := h.cg.Load(res.WorkerID)
	if err != nil {
		t.Fatal(err)
	}
	pids, err := leaf.Pids()
	if err != nil || len(pids) < 2 {
		t.Fatalf("leaf pids %v (%v): want the worker and the grandchild", pids, err)
	}
	if code, body := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 {
		t.Fatalf("delete: %d %s", code, body)
	}
	for _, p := range pids {
		if alive(p) {
			t.Errorf("pid %d (worker %d) survived the stop", p, *wi.PID)
		}
	}
}

func TestLoadTimeout(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		b := c.Backends["sim"]
		b.LoadTimeout = config.Duration(300 * time.Millisecond)
		c.Backends["sim"] = b
	})
	res := h.spawn(map[string]any{"backend": "sim", "restart": "never", "env": map[string]string{"RBEE_SIM_LOAD_TIME": "30s"}})
	wi := h.waitState(res.WorkerID, StateFailed, 10*time.Second)
	if wi.ExitReason != ReasonLoadTimeout {
		t.Errorf("exit reason %q", wi.ExitReason)
	}
}

func TestShutdownStopsEverything(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.Workers.GracePeriod = config.Duration(500 * time.Millisecond) })
	var pids []int
	for _, env := range []map[string]string{{}, {}, {"RBEE_SIM_IGNORE_SIGTERM": "true"}} {
		res := h.spawn(map[string]any{"backend": "sim", "env": env})
		wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
		pids = append(pids, *wi.PID)
	}
	rep := h.s.Shutdown(context.Background())
	if rep.Total != 3 || rep.Graceful != 2 || rep.Forced != 1 {
		t.Errorf("shutdown report %+v", rep)
	}
	if rep.Duration > 5*time.Second {
		t.Errorf("shutdown took %s", rep.Duration)
	}
	for _, p := range pids {
		if alive(p) {
			t.Errorf("pid %d survived shutdown", p)
		}
	}
	if ids, err := h.cg.List(); err != nil || len(ids) != 0 {
		t.Errorf("leaves after shutdown: %v %v", ids, err)
	}
	if _, err := h.s.Spawn(context.Background(), SpawnRequest{ModelRef: "file:/m", Backend: "sim", Device: new(int64)}); err == nil {
		t.Error("spawn accepted after shutdown")
	}
}

func TestConcurrentSpawnsGetDistinctPorts(t *testing.T) {
	// 50 workers at once on a loaded host (or an emulated VM) miss the 2s
	// heartbeat threshold and restart in a loop; this test is about ports.
	h := newHarness(t, func(c *config.Config) {
		c.Workers.PortMin, c.Workers.PortMax = 31000, 31100
		c.Heartbeat.StaleThreshold = config.Duration(time.Minute)
	})
	const n = 50
	results := make([]SpawnResult, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = h.spawn(map[string]any{"backend": "sim"})
		}()
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, r := range results {
		if seen[r.URL] {
			t.Fatalf("two workers got %s", r.URL)
		}
		seen[r.URL] = true
	}
	// Every worker bound its port: all become ready.
	for _, r := range results {
		h.waitState(r.WorkerID, StateIdle, 60*time.Second)
	}
}

func TestCleanLeftovers(t *testing.T) {
	h := newHarness(t)
	// What a SIGKILLed hive leaves: a populated worker leaf nobody knows.
	leaf, err := h.cg.Create("w-leftover1", cgroup.Limits{MemoryMax: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sh", "-c", "sleep 600")
	if err := leaf.Start(cmd); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	n, err := h.s.CleanLeftovers(context.Background())
	if err != nil || n != 1 {
		t.Fatalf("CleanLeftovers = %d, %v", n, err)
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("leftover process survived")
	}
	if ids, _ := h.cg.List(); len(ids) != 0 {
		t.Errorf("leaves left: %v", ids)
	}
}

// A DELETE whose client hangs up at once still gives the worker its grace
// period: the stop was accepted, only the answer is lost.
func TestDeleteKeepsGraceWhenClientLeaves(t *testing.T) {
	const grace = 2 * time.Second
	h := newHarness(t, func(c *config.Config) { c.Workers.GracePeriod = config.Duration(grace) })
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_IGNORE_SIGTERM": "true"}})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "DELETE", h.srv.URL+"/v1/workers/"+res.WorkerID, nil)
	req.Header.Set("Authorization", "Bearer "+h.token)
	start := time.Now()
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("DELETE answered %d before the client left", resp.StatusCode)
	}
	time.Sleep(grace / 2)
	if !alive(*wi.PID) {
		t.Fatalf("worker killed %s after a DELETE whose client left; grace is %s", time.Since(start).Round(time.Millisecond), grace)
	}
	h.waitFor("the stop to finish", grace+5*time.Second, func() bool { return !alive(*wi.PID) })
}
