package supervisor

import (
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/config"
)

func TestBackoff(t *testing.T) {
	for _, tc := range []struct {
		n        int
		min, max time.Duration
	}{
		{1, 800 * time.Millisecond, 1200 * time.Millisecond},
		{2, 1600 * time.Millisecond, 2400 * time.Millisecond},
		{4, 6400 * time.Millisecond, 9600 * time.Millisecond},
		{10, 48 * time.Second, 72 * time.Second},
		{100, 48 * time.Second, 72 * time.Second},
	} {
		for i := 0; i < 50; i++ {
			d := backoff(time.Second, time.Minute, 0.2, tc.n)
			if d < tc.min || d > tc.max {
				t.Fatalf("backoff(n=%d) = %s, want within [%s, %s]", tc.n, d, tc.min, tc.max)
			}
		}
	}
	if d := backoff(0, time.Minute, 0.2, 3); d != 0 {
		t.Errorf("zero base gave %s", d)
	}
}

func TestCrashRestartsWithSameID(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_CRASH_AFTER": "300ms"}})
	first := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	var wi WorkerInfo
	h.waitFor("a restart", 10*time.Second, func() bool {
		wi = h.get(res.WorkerID)
		return wi.RestartCount >= 1 && wi.PID != nil && *wi.PID != *first.PID
	})
	if wi.ExitReason != ReasonExited || wi.ExitCode != nil && *wi.ExitCode != 0 && *wi.ExitCode != 1 {
		t.Errorf("exit %q code %v", wi.ExitReason, wi.ExitCode)
	}
	if wi.LastRestart == nil || wi.ID != res.WorkerID || wi.URL != res.URL {
		t.Errorf("after restart: %+v", wi)
	}
	if id, err := h.cg.LeafOf(*wi.PID); err != nil || id != res.WorkerID {
		t.Errorf("restarted worker in leaf %q (%v)", id, err)
	}
	if got := counter(t, h.reg, "rbee_hive_worker_restarts_total", map[string]string{"reason": "exited"}); got < 1 {
		t.Errorf("restarts{exited} = %v", got)
	}
}

func TestCrashLoopFails(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		c.Workers.Restart.MaxFailures = 3
		c.Workers.Restart.BackoffBase = config.Duration(10 * time.Millisecond)
	})
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_CRASH_AFTER": "50ms"}})
	wi := h.waitState(res.WorkerID, StateFailed, 15*time.Second)
	if wi.RestartCount != 2 || wi.ExitReason != ReasonExited || wi.ExitCode == nil || *wi.ExitCode != 1 {
		t.Errorf("failed worker: restarts %d, exit %q %v", wi.RestartCount, wi.ExitReason, wi.ExitCode)
	}
	time.Sleep(200 * time.Millisecond)
	if wi2 := h.get(res.WorkerID); wi2.RestartCount != 2 || wi2.State != StateFailed || wi2.PID != nil {
		t.Errorf("failed worker restarted anyway: %+v", wi2)
	}
	if _, err := h.cg.Load(res.WorkerID); err == nil {
		t.Error("failed worker's leaf still exists")
	}
	// DELETE removes a failed worker.
	if code, _ := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 {
		t.Errorf("delete failed worker: %d", code)
	}
}

// TestRestartPolicies: a crash is exit 1; an outside SIGTERM makes the
// simworker exit 0 (a clean exit that nobody asked the hive for).
func TestRestartPolicies(t *testing.T) {
	for _, tc := range []struct {
		policy RestartPolicy
		how    string
		want   State
	}{
		{RestartNever, "crash", StateFailed},
		{RestartNever, "sigterm", StateStopped},
		{RestartOnFailure, "sigterm", StateStopped},
		{RestartOnFailure, "crash", StateRestarting},
		{RestartAlways, "sigterm", StateRestarting},
		{RestartAlways, "delete", ""}, // a deliberate stop is never restarted
	} {
		t.Run(string(tc.policy)+"/"+tc.how, func(t *testing.T) {
			h := newHarness(t, func(c *config.Config) { c.Workers.Restart.BackoffBase = config.Duration(2 * time.Second) })
			req := map[string]any{"backend": "sim", "restart": tc.policy}
			if tc.how == "crash" {
				req["env"] = map[string]string{"RBEE_SIM_CRASH_AFTER": "200ms"}
			}
			res := h.spawn(req)
			wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
			switch tc.how {
			case "sigterm":
				if err := syscall.Kill(*wi.PID, syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
			case "delete":
				if code, _ := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 {
					t.Fatalf("delete: %d", code)
				}
				time.Sleep(300 * time.Millisecond)
				if _, err := h.s.Get(res.WorkerID); err == nil {
					t.Error("deleted worker is back")
				}
				if ids, _ := h.cg.List(); len(ids) != 0 {
					t.Errorf("leaves after delete: %v", ids)
				}
				return
			}
			wi = h.waitState(res.WorkerID, tc.want, 10*time.Second)
			if wi.RestartPolicy != tc.policy || wi.PID != nil {
				t.Errorf("policy %q pid %v", wi.RestartPolicy, wi.PID)
			}
		})
	}
}

func TestAfterFailureBackoffResetAndBreaker(t *testing.T) {
	cfg := testConfig(t)
	cfg.Workers.Restart = config.Restart{BackoffBase: config.Duration(time.Second), BackoffMax: config.Duration(3 * time.Second),
		StableAfter: config.Duration(10 * time.Second), MaxFailures: 3, FailureWindow: config.Duration(time.Minute)}
	s, err := New(cfg, Deps{Cgroups: newCgroups(t)})
	if err != nil {
		t.Fatal(err)
	}
	w := &worker{id: "w-unit", log: s.log, logs: newLogSink("w-unit", t.TempDir(), 4096, 1, nil), state: StateLoading}
	s.workers[w.id] = w
	t0 := time.Now()
	steps := []struct {
		ran       time.Duration // how long the failed run lasted
		at        time.Duration // when it failed, after t0
		wantState State
		wantDelay time.Duration
	}{
		{time.Second, 0, StateRestarting, time.Second},
		{time.Second, 2 * time.Second, StateRestarting, 2 * time.Second},
		{20 * time.Second, 30 * time.Second, StateRestarting, time.Second}, // stable run: counters reset
		{time.Second, 32 * time.Second, StateRestarting, 2 * time.Second},
		{time.Second, 35 * time.Second, StateFailed, 0}, // 3 failures within the window
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, st := range steps {
		now := t0.Add(st.at)
		s.afterFailure(w, ReasonExited, now.Add(-st.ran), now, "test")
		if w.state != st.wantState {
			t.Fatalf("step %d: state %s, want %s", i, w.state, st.wantState)
		}
		if st.wantState == StateRestarting {
			if d := w.deadlineAt.Sub(now); d != st.wantDelay || w.deadlineFor != dlRestart {
				t.Errorf("step %d: restart in %s, want %s", i, d, st.wantDelay)
			}
		}
	}
}

// A restarted worker starts with a clean report: nothing its previous run
// said (figures, status, health) is shown as if the new run had said it.
func TestRestartClearsReportedFigures(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_CRASH_AFTER": "500ms"}})
	first := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	h.s.mu.Lock()
	w := h.s.workers[res.WorkerID]
	if w.figures == nil {
		w.figures = map[string]string{}
	}
	w.figures["RBEE_VRAM_BYTES"] = "123456"
	h.s.mu.Unlock()
	h.waitFor("a restart", 10*time.Second, func() bool {
		wi := h.get(res.WorkerID)
		return wi.RestartCount >= 1 && wi.PID != nil && *wi.PID != *first.PID
	})
	if wi := h.get(res.WorkerID); wi.Figures["RBEE_VRAM_BYTES"] == "123456" {
		t.Errorf("the previous run's figure survived the restart: %v", wi.Figures)
	}
}

// A port taken while the worker was down (another process bound it) must
// not send every restart into a bind failure until the circuit breaker
// gives up: the restart moves the worker to a free port.
func TestRestartMovesOffATakenPort(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		c.Workers.Restart.BackoffBase = config.Duration(500 * time.Millisecond)
		c.Workers.Restart.BackoffMax = config.Duration(500 * time.Millisecond)
		c.Workers.Restart.Jitter = 0
	})
	res := h.spawn(map[string]any{"backend": "sim"})
	first := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	if err := syscall.Kill(*first.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The worker's socket closes as it dies; take its port before the
	// 500 ms backoff ends.
	var squatter net.Listener
	h.waitFor("the dead worker's port", 400*time.Millisecond, func() bool {
		l, err := net.Listen("tcp", net.JoinHostPort(h.s.cfg.WorkerHost, strconv.Itoa(first.Port)))
		if err != nil {
			return false
		}
		squatter = l
		return true
	})
	defer squatter.Close()
	var wi WorkerInfo
	h.waitFor("a restart on another port", 10*time.Second, func() bool {
		wi = h.get(res.WorkerID)
		return wi.RestartCount >= 1 && wi.State == StateIdle
	})
	if wi.Port == first.Port || wi.URL == first.URL {
		t.Errorf("restarted on the taken port %d (%s)", wi.Port, wi.URL)
	}
	if wi.RestartCount != 1 {
		t.Errorf("restart count %d, want 1 (no bind failures)", wi.RestartCount)
	}
}
