package e2e

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// BenchmarkHeartbeatCPU is the hive's own CPU (utime+stime from /proc) over
// a fixed window with 100 real rbee-simworkers heartbeating over the notify
// socket at 10 Hz (stale threshold 200 ms → WATCHDOG_USEC, pings at half),
// against the same 100 workers at the real 30 s rate, in the same run. The
// seed's goal: heartbeat overhead < 1 % CPU at the 30 s rate.
//
//	go test -run '^$' -bench HeartbeatCPU -benchtime 1x ./test/e2e/
func BenchmarkHeartbeatCPU(b *testing.B) {
	require(b, "/bin/sh")
	const workers = 100
	const window = 10 * time.Second
	for _, tc := range []struct {
		name      string
		threshold string
	}{
		{"30s-rate", "60s"},
		{"10Hz", "200ms"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				// stale_action "mark": a ping late under load marks, never restarts.
				h := startHive(b, hiveOptions{extra: fmt.Sprintf(`
[heartbeat]
interval = "100ms"
stale_threshold = %q
stale_action = "mark"

[backends.hb]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}"]
health = "notify"
load_timeout = "60s"
memory_limit = "48MiB"
`, tc.threshold)})
				for range workers {
					h.spawn("hb", nil)
				}
				testkit.WaitFor(b, 2*time.Minute, "all workers ready", func() bool {
					code, body, err := h.Try(b.Context(), "GET", "/v1/workers/list", nil)
					return err == nil && code == 200 && strings.Count(string(body), `"state":"idle"`)+strings.Count(string(body), `"state":"stale"`) == workers
				})
				time.Sleep(time.Second) // let start-up work settle
				before := cpuTicks(b, h.Cmd.Process.Pid)
				time.Sleep(window)
				used := float64(cpuTicks(b, h.Cmd.Process.Pid)-before) / 100 // USER_HZ
				share := used / window.Seconds() * 100
				b.ReportMetric(share, "hive-cpu-%")
				b.Logf("%s: hive CPU %.2f %% of one core with %d workers", tc.name, share, workers)
			}
		})
	}
}

// cpuTicks reads utime+stime of pid in clock ticks.
func cpuTicks(t testing.TB, pid int) uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command name (which may hold spaces) start at ')'.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return ut + st
}
