package supervisor

import (
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/supervisor/notify"
	workerproto "github.com/rbee/rbee-hive/worker"
)

func TestStaleWorkerIsRestarted(t *testing.T) {
	const threshold = time.Second
	h := newHarness(t, func(c *config.Config) {
		c.Heartbeat.Interval = config.Duration(400 * time.Millisecond)
		c.Heartbeat.StaleThreshold = config.Duration(threshold)
	})
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_NO_HEARTBEAT": "true"}})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	last := *wi.LastHeartbeat
	h.waitFor("stale detection", 5*time.Second, func() bool {
		return counter(t, h.reg, "rbee_hive_workers_stale_total", nil) == 1
	})
	if lag := time.Since(last); lag > threshold+time.Second {
		t.Errorf("stale detected %s after the last heartbeat; want ≤ threshold + 1s", lag)
	}
	h.waitFor("a restart after stale", 10*time.Second, func() bool {
		wi = h.get(res.WorkerID)
		return wi.RestartCount == 1
	})
	if wi.ExitReason != ReasonStale {
		t.Errorf("exit reason %q", wi.ExitReason)
	}
	if got := counter(t, h.reg, "rbee_hive_worker_restarts_total", map[string]string{"reason": "stale"}); got != 1 {
		t.Errorf("restarts{stale} = %v", got)
	}
}

func TestHeartbeatsKeepWorkerFresh(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		c.Heartbeat.Interval = config.Duration(300 * time.Millisecond)
		c.Heartbeat.StaleThreshold = config.Duration(time.Second)
	})
	res := h.spawn(map[string]any{"backend": "sim"})
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	time.Sleep(2500 * time.Millisecond)
	if wi := h.get(res.WorkerID); wi.State != StateIdle || wi.RestartCount != 0 || wi.Health != "healthy" {
		t.Errorf("heartbeating worker: %+v", wi)
	}
	if got := counter(t, h.reg, "rbee_hive_workers_stale_total", nil); got != 0 {
		t.Errorf("stale_total = %v", got)
	}
}

func TestStaleActions(t *testing.T) {
	for _, tc := range []struct {
		action string
		want   State
	}{
		{"mark", StateStale},
		{"kill", StateStopped},
	} {
		t.Run(tc.action, func(t *testing.T) {
			h := newHarness(t, func(c *config.Config) {
				c.Heartbeat.Interval = config.Duration(200 * time.Millisecond)
				c.Heartbeat.StaleThreshold = config.Duration(500 * time.Millisecond)
				c.Heartbeat.StaleAction = config.StaleAction(tc.action)
			})
			res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_NO_HEARTBEAT": "true"}})
			h.waitState(res.WorkerID, StateIdle, 10*time.Second)
			wi := h.waitState(res.WorkerID, tc.want, 5*time.Second)
			if tc.action == "kill" {
				if wi.ExitReason != ReasonStale || wi.RestartCount != 0 {
					t.Errorf("killed stale worker: %+v", wi)
				}
				return
			}
			// mark: a heartbeat brings it back.
			code, body := h.do("POST", "/v1/heartbeat", map[string]any{"worker_id": res.WorkerID, "timestamp": time.Now().Format(time.RFC3339), "health_status": "degraded"})
			if code != 200 {
				t.Fatalf("heartbeat: %d %s", code, body)
			}
			if wi := h.get(res.WorkerID); wi.State != StateIdle || wi.Health != "degraded" {
				t.Errorf("after heartbeat: state %s health %s", wi.State, wi.Health)
			}
		})
	}
}

// A process outside every worker cgroup (this test) sends READY=1 naming a
// loading worker in its payload: rejected and counted, the worker unchanged.
func TestSpoofedNotifyIsRejected(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_LOAD_TIME": "30s"}})
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: h.cfg.Heartbeat.NotifySocket, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for i := 0; i < 3; i++ {
		if _, err := conn.Write([]byte("READY=1\nWATCHDOG=1\nRBEE_WORKER_ID=" + res.WorkerID + "\n")); err != nil {
			t.Fatal(err)
		}
	}
	h.waitFor("3 rejections", 5*time.Second, func() bool {
		return counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "unknown_sender"}) == 3
	})
	if wi := h.get(res.WorkerID); wi.State != StateLoading {
		t.Errorf("spoofed READY moved the worker to %s", wi.State)
	}
}

func TestHeartbeatAPI(t *testing.T) {
	h := newHarness(t)
	a := h.spawn(map[string]any{"backend": "sim"})
	b := h.spawn(map[string]any{"backend": "sim"})
	h.waitState(a.WorkerID, StateIdle, 10*time.Second)
	tokA := h.workerToken(a.WorkerID)
	body := func(id, status string) map[string]any {
		return map[string]any{"worker_id": id, "timestamp": "2026-11-27T10:00:00Z", "health_status": status}
	}
	for _, tc := range []struct {
		name  string
		body  any
		token string
		code  int
		ecode string
	}{
		{"no token", body(a.WorkerID, "healthy"), "-", 401, "MISSING_API_KEY"},
		{"wrong token", body(a.WorkerID, "healthy"), "nope", 401, "INVALID_API_KEY"},
		{"worker token for another worker", body(b.WorkerID, "healthy"), tokA, 403, "FORBIDDEN"},
		{"unknown worker", body("w-nosuchworker1", "healthy"), "", 404, "NOT_FOUND"},
		{"bad health_status", body(a.WorkerID, "sick"), "", 422, "VALIDATION_ERROR"},
		{"missing worker_id", map[string]any{"health_status": "healthy"}, "", 422, "VALIDATION_ERROR"},
		{"malformed JSON", `{"worker_id":`, "", 400, "INVALID_JSON"},
		{"own token", body(a.WorkerID, "degraded"), tokA, 200, ""},
		{"API token", body(b.WorkerID, "healthy"), "", 200, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var code int
			var out []byte
			switch tc.token {
			case "":
				code, out = h.do("POST", "/v1/heartbeat", tc.body)
			case "-":
				code, out = h.do("POST", "/v1/heartbeat", tc.body, "")
			default:
				code, out = h.do("POST", "/v1/heartbeat", tc.body, tc.token)
			}
			if code != tc.code {
				t.Fatalf("status %d, want %d: %s", code, tc.code, out)
			}
			if tc.ecode != "" && !strings.Contains(string(out), `"code":"`+tc.ecode+`"`) {
				t.Errorf("body %s, want code %s", out, tc.ecode)
			}
			if tc.code == 200 && string(out) != "{\"message\":\"Heartbeat received\"}\n" {
				t.Errorf("body %q", out)
			}
		})
	}
	if wi := h.get(a.WorkerID); wi.Health != "degraded" {
		t.Errorf("health %q after a degraded heartbeat", wi.Health)
	}
}

// workerToken reads a worker's RBEE_WORKER_TOKEN from the registry.
func (h *harness) workerToken(id string) string {
	h.s.mu.Lock()
	defer h.s.mu.Unlock()
	return h.s.workers[id].token
}

// TestSocketDropsExported: datagrams the socket drops before attribution
// (here: oversize) show up in the same rejected family as spoofed senders.
func TestSocketDropsExported(t *testing.T) {
	h := newHarness(t)
	conn, err := net.Dial("unixgram", h.cfg.Heartbeat.NotifySocket)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("WATCHDOG=1\nSTATUS=" + strings.Repeat("x", 5000))); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "oversize"})
		if got == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rejected{oversize} = %v, want 1", got)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if problems, err := testutil.GatherAndLint(h.reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
}

// With stale_action mark, a worker whose heartbeats resume is idle again and
// must be found stale again when it falls silent a second time: its new
// deadline has to reach the loop, which had nothing left to wake up for.
func TestStaleAgainAfterHeartbeatResumes(t *testing.T) {
	const threshold = 500 * time.Millisecond
	h := newHarness(t, func(c *config.Config) {
		c.Heartbeat.Interval = config.Duration(200 * time.Millisecond)
		c.Heartbeat.StaleThreshold = config.Duration(threshold)
		c.Heartbeat.StaleAction = "mark"
	})
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_NO_HEARTBEAT": "true"}})
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	h.waitState(res.WorkerID, StateStale, 5*time.Second)
	code, body := h.do("POST", "/v1/heartbeat", map[string]any{"worker_id": res.WorkerID, "timestamp": time.Now().Format(time.RFC3339), "health_status": "healthy"})
	if code != 200 {
		t.Fatalf("heartbeat: %d %s", code, body)
	}
	if wi := h.get(res.WorkerID); wi.State != StateIdle {
		t.Fatalf("after heartbeat: %s", wi.State)
	}
	h.waitState(res.WorkerID, StateStale, threshold+2*time.Second)
	if got := counter(t, h.reg, "rbee_hive_workers_stale_total", nil); got != 2 {
		t.Errorf("stale_total = %v, want 2", got)
	}
}

// systemd-notify's BARRIER=1 comes from the helper's own pid, which is
// usually gone by the time its cgroup is looked up: it must not count as a
// rejected heartbeat (the RbeeHiveHeartbeatsRejected alert would fire for a
// shell worker that follows the README).
func TestBarrierIsNotUnknownSender(t *testing.T) {
	h := newHarness(t)
	exited := exec.Command("/bin/true")
	if err := exited.Run(); err != nil {
		t.Fatal(err)
	}
	h.s.HandleDatagram(int32(exited.Process.Pid), map[string]string{"BARRIER": "1"})
	if got := counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "unknown_sender"}); got != 0 {
		t.Errorf("unknown_sender = %v after a BARRIER=1", got)
	}
	// Anything else from outside every worker still counts.
	h.s.HandleDatagram(int32(exited.Process.Pid), map[string]string{"BARRIER": "1", "READY": "1"})
	if got := counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "unknown_sender"}); got != 1 {
		t.Errorf("unknown_sender = %v after a READY=1 from outside, want 1", got)
	}
}

// Datagrams that arrive while a run is being registered are kept for it,
// but no more of them than the worker could store anyway.
func TestEarlyFieldsBounded(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	h.s.mu.Lock()
	w := h.s.workers[res.WorkerID]
	r := w.run
	w.run, w.startInFlight = nil, true // as between Start and the run's registration
	h.s.mu.Unlock()
	for i := 0; i < 50; i++ {
		fields := map[string]string{}
		for j := 0; j < 100; j++ {
			fields[fmt.Sprintf("RBEE_K%d_%d", i, j)] = "1"
		}
		h.s.HandleDatagram(int32(*wi.PID), fields)
	}
	h.s.mu.Lock()
	early := w.earlyFields
	w.run, w.startInFlight, w.earlyFields = r, false, nil
	h.s.mu.Unlock()
	// The live worker's own datagrams (WATCHDOG, STATUS) land in the same
	// window. Protocol keys are always kept; an RBEE_* key is kept only
	// while the map holds fewer than maxEarly entries, so protocol keys
	// that came first take RBEE_* places. The bound must be reached, not
	// just kept.
	n, protocol := 0, 0
	for k := range early {
		switch {
		case strings.HasPrefix(k, "RBEE_"):
			n++
		case k == workerproto.KeyReady || k == workerproto.KeyWatchdog || k == workerproto.KeyStatus || k == workerproto.KeyStopping:
			protocol++
		default:
			t.Errorf("early field %q kept", k)
		}
	}
	if n > maxEarly || n < maxEarly-protocol {
		t.Errorf("%d early RBEE_* fields kept beside %d protocol keys, want %d-%d", n, protocol, maxEarly-protocol, maxEarly)
	}
}

func TestTruncateKeepsUTF8(t *testing.T) {
	s := strings.Repeat("a", maxStatus-1) + "é"
	if got := string(truncate([]byte(s), maxStatus)); got != strings.Repeat("a", maxStatus-1) {
		t.Errorf("truncate cut inside a rune: %q", got[len(got)-3:])
	}
	if got := string(truncate([]byte("héllo"), 10)); got != "héllo" {
		t.Errorf("short string changed: %q", got)
	}
}

// TestHeartbeatAllocatesNothing: a heartbeat from a ready worker's main pid
// (attribution, health, unchanged figures and status, the stale deadline
// re-armed) allocates nothing; a changed STATUS allocates its string.
func TestHeartbeatAllocatesNothing(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.Resources.SampleInterval = config.Duration(time.Hour) })
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_NO_HEARTBEAT": "true"}})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	pid := int32(*wi.PID)
	uid := procUID(pid)
	var f notify.Fields
	if err := f.Parse([]byte("WATCHDOG=1\nRBEE_HEALTH=degraded\nRBEE_BUSY=1\nSTATUS=serving\n")); err != nil {
		t.Fatal(err)
	}
	h.s.handleDatagram(pid, uid, &f) // the first one stores the figure and the status
	before := h.get(res.WorkerID).LastHeartbeat
	if n := testing.AllocsPerRun(200, func() { h.s.handleDatagram(pid, uid, &f) }); n != 0 {
		t.Errorf("%v allocations per heartbeat, want 0", n)
	}
	wi = h.get(res.WorkerID)
	if wi.Health != "degraded" || wi.Status != "serving" || wi.Figures["RBEE_BUSY"] != "1" || !wi.LastHeartbeat.After(*before) {
		t.Fatalf("heartbeats not applied: %+v", wi)
	}
	if err := f.Parse([]byte("WATCHDOG=1\nSTATUS=serving 2")); err != nil {
		t.Fatal(err)
	}
	h.s.handleDatagram(pid, uid, &f)
	if wi := h.get(res.WorkerID); wi.Status != "serving 2" || wi.Health != "degraded" {
		t.Fatalf("changed status not applied: %+v", wi)
	}
}
