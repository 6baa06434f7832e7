package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
	"github.com/rbee/rbee-hive/systemd/journaltest"
)

// Syslog priorities as journald stores them.
const (
	priErr     = 3
	priWarning = 4
	priNotice  = 5
	priInfo    = 6
)

// lifecycleCheck is one entry the hive must have written about a worker.
type lifecycleCheck struct {
	name    string
	worker  string            // worker id: matched as WORKER_ID=<id>
	message string            // MESSAGE, exactly; "": any
	fields  map[string]string // further fields the entry must carry
	minPri  int               // PRIORITY must lie in [minPri, maxPri]
	maxPri  int
	why     string // said when the priority is wrong
}

// TestJournaldLifecycle is issue 8's acceptance test: with log_format =
// "journal" and a real journald, the hive's lifecycle entries are found by
// WORKER_ID with sensible priorities, the workers' own output by
// -t rbee-worker / RBEE_WORKER_ID, and a journald that stops reading or dies
// never stalls supervision.
func TestJournaldLifecycle(t *testing.T) {
	require(t, journaltest.JournaldPath, journaltest.JournalctlPath)
	j := journaltest.Start(t) // before the hive: it asks once whether journald is there
	h := startHive(t, hiveOptions{logFormat: "journal", logLevel: "info", extra: simBackends})

	// A worker that becomes ready and is stopped, and one that crashes after
	// it is ready and is restarted once.
	steady := h.spawn("sim", nil)
	crasher := h.spawn("sim", map[string]string{"RBEE_SIM_CRASH_AFTER": "1500ms"})
	// And one the kernel OOM-kills while it loads (256MiB in a 64MiB cgroup).
	code, body := h.Do("POST", "/v1/workers/spawn", spawnRequest{ModelRef: h.model, Backend: "small", Restart: "never",
		Env: map[string]string{"RBEE_SIM_ALLOC_MIB": "256"}})
	if code != http.StatusOK {
		t.Fatalf("spawn: %d %s", code, body)
	}
	var oomed struct {
		WorkerID string `json:"worker_id"`
	}
	if err := json.Unmarshal(body, &oomed); err != nil {
		t.Fatal(err)
	}
	h.waitState(steady, 15*time.Second, "idle")
	testkit.WaitFor(t, 20*time.Second, "the crashing worker to be restarted", func() bool {
		wi, _ := h.worker(crasher)
		return wi.RestartCount >= 1
	})
	h.waitState(oomed.WorkerID, 15*time.Second, "failed")
	h.stop(crasher)
	h.stop(steady)

	checks := []lifecycleCheck{
		{name: "registered", worker: steady, message: "worker registered", fields: map[string]string{"BACKEND": "sim"},
			minPri: priNotice, maxPri: priInfo},
		{name: "started", worker: steady, message: "worker started", minPri: priNotice, maxPri: priInfo},
		{name: "ready", worker: steady, message: "worker ready", fields: map[string]string{"VIA": "READY=1"},
			minPri: priNotice, maxPri: priInfo},
		{name: "stopped: state", worker: steady, message: "worker state", fields: map[string]string{"TO": "stopped"},
			minPri: priNotice, maxPri: priInfo},
		{name: "stopped: exit of an ordered stop", worker: steady, message: "worker exited",
			fields: map[string]string{"ORDERED": "stopped", "EXIT_REASON": "exited", "EXIT_CODE": "0"},
			minPri: priNotice, maxPri: priInfo,
			why: "a stop the operator asked for is routine (info or notice); warning pages on-call for nothing"},
		{name: "crash", worker: crasher, message: "worker exited", fields: map[string]string{"EXIT_REASON": "exited", "EXIT_CODE": "1"},
			minPri: priErr, maxPri: priWarning, why: "a crash must stand out: warning or worse"},
		// Matched by its fields, not its wording.
		{name: "oom kill", worker: oomed.WorkerID, fields: map[string]string{"EXIT_REASON": "oom"},
			minPri: priErr, maxPri: priWarning, why: "an OOM kill must stand out: warning or worse"},
		{name: "restarted", worker: crasher, message: "restarting worker", fields: map[string]string{"RESTART_COUNT": "1", "REASON": "exited"},
			minPri: priNotice, maxPri: priInfo},
		{name: "restarting state", worker: crasher, message: "worker state", fields: map[string]string{"TO": "restarting"},
			minPri: priWarning, maxPri: priInfo},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			matches := []string{"WORKER_ID=" + c.worker}
			if c.message != "" {
				matches = append(matches, "MESSAGE="+c.message)
			}
			entries := j.WaitFor(t, 1, 5*time.Second, matches...)
			var matched []journaltest.Entry
			for _, e := range entries {
				if hasFields(e, c.fields) {
					matched = append(matched, e)
				}
			}
			if len(matched) == 0 {
				t.Fatalf("no %q entry of %s with %v; found %d with that message: %v", c.message, c.worker, c.fields, len(entries), entries)
			}
			for _, e := range matched {
				if e["SYSLOG_IDENTIFIER"] != "rbee-hive" {
					t.Errorf("SYSLOG_IDENTIFIER %q, want rbee-hive", e["SYSLOG_IDENTIFIER"])
				}
				pri, err := strconv.Atoi(e["PRIORITY"])
				if err != nil || pri < c.minPri || pri > c.maxPri {
					t.Errorf("%q (%v) logged at PRIORITY %q, want %d..%d; %s", c.message, c.fields, e["PRIORITY"], c.minPri, c.maxPri, c.why)
				}
			}
		})
	}

	// The workers' own output, filed by the hive with their id.
	outputs := []struct {
		worker string
		want   []string
	}{
		{steady, []string{"msg=listening", "msg=ready", "msg=stopping"}},
		{crasher, []string{"msg=ready", "crashing on purpose"}},
	}
	for _, o := range outputs {
		t.Run("output of "+o.worker, func(t *testing.T) {
			for _, want := range o.want {
				testkit.WaitFor(t, 5*time.Second, fmt.Sprintf("%q in %s's journal", want, o.worker), func() bool {
					for _, e := range j.Entries(t, "-t", "rbee-worker", "RBEE_WORKER_ID="+o.worker) {
						if strings.Contains(e["MESSAGE"], want) {
							if e["RBEE_STREAM"] != "stderr" || e["SYSLOG_IDENTIFIER"] != "rbee-worker" {
								t.Errorf("worker line %q: RBEE_STREAM %q SYSLOG_IDENTIFIER %q", e["MESSAGE"], e["RBEE_STREAM"], e["SYSLOG_IDENTIFIER"])
							}
							return true
						}
					}
					return false
				})
			}
			// The id filter must not let another worker's lines in.
			for _, e := range j.Entries(t, "RBEE_WORKER_ID="+o.worker) {
				if e["RBEE_WORKER_ID"] != o.worker {
					t.Errorf("entry of %s under RBEE_WORKER_ID=%s", e["RBEE_WORKER_ID"], o.worker)
				}
			}
		})
	}

	// A journald that stops reading (its socket buffer fills) and then one
	// that is gone: the hive keeps supervising either way.
	j.Pause(t)
	superviseWithoutJournald(t, h, "journald paused")
	j.Resume(t)
	dropped0 := droppedLogEntries(t, h)
	j.Kill(t)
	superviseWithoutJournald(t, h, "journald killed")
	if dropped := droppedLogEntries(t, h); dropped <= dropped0 {
		t.Errorf("rbee_hive_log_entries_dropped_total %v → %v with journald dead: worker lines were neither filed nor counted", dropped0, dropped)
	}

	// Once journald is back, entries flow again without restarting the hive.
	j.Restart(t)
	back := h.spawn("sim", nil)
	h.waitState(back, 15*time.Second, "idle")
	j.WaitFor(t, 1, 5*time.Second, "WORKER_ID="+back, "MESSAGE=worker ready")
	j.WaitFor(t, 1, 5*time.Second, "-t", "rbee-worker", "RBEE_WORKER_ID="+back)
	h.stop(back)
}

// superviseWithoutJournald spawns two workers, waits until they are ready
// and stops them, while the API keeps answering promptly. Two workers log
// well over the 10 datagrams a unix socket queues by default
// (net.unix.max_dgram_qlen), so a paused journald really blocks the sender.
func superviseWithoutJournald(t *testing.T, h *hive, phase string) {
	t.Helper()
	listPromptly(t, h, phase)
	start := time.Now()
	ids := []string{h.spawn("sim", nil), h.spawn("sim", nil)}
	for _, id := range ids {
		h.waitState(id, 15*time.Second, "idle")
	}
	listPromptly(t, h, phase)
	for _, id := range ids {
		h.stop(id)
		if _, code := h.worker(id); code != http.StatusNotFound {
			t.Errorf("%s: worker %s still listed after DELETE (%d)", phase, id, code)
		}
	}
	listPromptly(t, h, phase)
	t.Logf("%s: 2 spawns, ready and stops took %v", phase, time.Since(start).Round(time.Millisecond))
}

// listPromptly fails unless GET /v1/workers/list answers within a second.
func listPromptly(t *testing.T, h *hive, phase string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	code, body, err := h.Try(ctx, "GET", "/v1/workers/list", nil)
	took := time.Since(start)
	if err != nil || code != http.StatusOK {
		t.Fatalf("%s: list: %d %v %s", phase, code, err, body)
	}
	if took > time.Second {
		t.Errorf("%s: list took %v", phase, took)
	}
}

var droppedRE = regexp.MustCompile(`(?m)^rbee_hive_log_entries_dropped_total (\S+)$`)

func droppedLogEntries(t *testing.T, h *hive) float64 {
	t.Helper()
	m := droppedRE.FindSubmatch(h.Metrics())
	if m == nil {
		t.Fatal("rbee_hive_log_entries_dropped_total missing from /metrics")
	}
	v, err := strconv.ParseFloat(string(bytes.TrimSpace(m[1])), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func hasFields(e journaltest.Entry, want map[string]string) bool {
	for k, v := range want {
		if e[k] != v {
			return false
		}
	}
	return true
}
