package supervisor

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

func TestSpawnReadyStop(t *testing.T) {
	t.Setenv("RBEE_CANARY", "hive-secret") // must not reach the worker
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim"})
	if res.State != StateLoading || !strings.HasPrefix(res.WorkerID, "w-") || !strings.HasPrefix(res.URL, "http://127.0.0.1:") {
		t.Fatalf("spawn answer %+v", res)
	}
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	if wi.PID == nil {
		t.Fatal("no pid")
	}
	pid := *wi.PID
	// The worker runs in its own leaf.
	if id, err := h.cg.LeafOf(pid); err != nil || id != res.WorkerID {
		t.Fatalf("LeafOf(%d) = %q, %v", pid, id, err)
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	vars := strings.Split(string(env), "\x00")
	for _, want := range []string{"RBEE_WORKER_ID=" + res.WorkerID, "NOTIFY_SOCKET=" + h.cfg.Heartbeat.NotifySocket,
		"WATCHDOG_USEC=2000000", "RBEE_HIVE_URL=" + h.srv.URL} {
		if !contains(vars, want) {
			t.Errorf("worker env lacks %s: %q", want, vars)
		}
	}
	for _, v := range vars {
		if strings.HasPrefix(v, "RBEE_CANARY=") || strings.HasPrefix(v, "CUDA_VISIBLE_DEVICES=") {
			t.Errorf("worker env has %s", v)
		}
	}
	// Heartbeats flow (interval = threshold/2 = 1 s).
	h.waitFor("a heartbeat", 5*time.Second, func() bool {
		return counter(t, h.reg, "rbee_hive_heartbeats_total", nil) >= 1
	})
	if got := h.s.Summary(); got != "1 worker: 1 idle" {
		t.Errorf("Summary = %q", got)
	}
	code, body := h.do("GET", "/v1/workers/list", nil)
	if code != 200 || !strings.Contains(string(body), `"state":"idle"`) || !strings.Contains(string(body), `"workers":[`) {
		t.Fatalf("list: %d %s", code, body)
	}

	start := time.Now()
	code, body = h.do("DELETE", "/v1/workers/"+res.WorkerID, nil)
	if code != 200 || !strings.Contains(string(body), `"state":"stopped"`) {
		t.Fatalf("delete: %d %s", code, body)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("graceful stop took %s", d)
	}
	if alive(pid) {
		t.Error("worker process still alive after stop")
	}
	if _, err := h.cg.Load(res.WorkerID); err == nil {
		t.Error("leaf still exists after stop")
	}
	if code, _ := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 404 {
		t.Errorf("second delete: %d, want 404", code)
	}
	if got := counter(t, h.reg, "rbee_hive_worker_exits_total", map[string]string{"reason": "stopped"}); got != 1 {
		t.Errorf("exits{stopped} = %v", got)
	}
}
