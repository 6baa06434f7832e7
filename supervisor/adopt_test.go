package supervisor

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/internal/testkit"
	"github.com/rbee/rbee-hive/supervisor/notify"
)

// The first hive of TestAdoptAfterHiveKilled is this test binary run again
// (so it works wherever the tests run, the v2 VM included): it spawns the
// workers asked for, prints them, and waits to be SIGKILLed.
const (
	firstHiveEnv    = "RBEE_TEST_FIRST_HIVE" // the config file
	firstHiveRoot   = "RBEE_TEST_FIRST_HIVE_ROOT"
	firstHiveSpawns = "RBEE_TEST_FIRST_HIVE_SPAWNS" // JSON []SpawnRequest
)

// spawned is what the first hive prints: each worker as it was when the
// first hive reached its wanted state.
type spawned struct {
	ID  string `json:"id"`
	PID int    `json:"pid"`
	URL string `json:"url"`
	// User is who it runs as (its own uid by default).
	User string `json:"user"`
}

func runFirstHive() int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "first hive:", err); return 1 }
	cfg, err := config.Load(os.Getenv(firstHiveEnv), true)
	if err != nil {
		return fail(err)
	}
	cg, err := cgroup.New(cgroup.Options{Root: os.Getenv(firstHiveRoot)})
	if err != nil {
		return fail(err)
	}
	s, err := New(&cfg, Deps{Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)), Cgroups: cg, SelfDir: filepath.Dir(os.Getenv("RBEE_SIMWORKER"))})
	if err != nil {
		return fail(err)
	}
	if _, err := s.Adopt(context.Background()); err != nil {
		return fail(err)
	}
	ln, err := notify.Listen(cfg.Heartbeat.NotifySocket)
	if err != nil {
		return fail(err)
	}
	// As the daemon does: workers with uids of their own send to it.
	if err := os.Chown(cfg.Heartbeat.NotifySocket, 0, int(s.ids.group)); err != nil {
		return fail(err)
	}
	ctx := context.Background()
	go func() { _ = ln.Serve(ctx, s.HandleNotify) }()
	go func() { _ = s.Run(ctx) }()
	var reqs []SpawnRequest
	if err := json.Unmarshal([]byte(os.Getenv(firstHiveSpawns)), &reqs); err != nil {
		return fail(err)
	}
	var out []spawned
	start := time.Now()
	for _, req := range reqs {
		res, err := s.Spawn(ctx, req)
		if err != nil {
			return fail(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			wi, err := s.Get(res.WorkerID)
			if err != nil {
				return fail(err)
			}
			if (wi.State == StateIdle || req.Env["RBEE_SIM_LOAD_TIME"] != "" || req.Backend != "sim") && wi.PID != nil {
				out = append(out, spawned{ID: wi.ID, PID: *wi.PID, URL: wi.URL, User: wi.User})
				break
			}
			if time.Now().After(deadline) {
				return fail(fmt.Errorf("worker %s is %s", wi.ID, wi.State))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	ctx2, cancel := context.WithTimeout(ctx, 5*time.Second)
	_ = s.store.Flush(ctx2) // the writer is quick; the test must not race it
	cancel()
	b, _ := json.Marshal(out)
	fmt.Printf("%s\n%d\n", b, time.Since(start).Nanoseconds())
	select {} // until SIGKILL
}

// TestAdoptAfterHiveKilled: a hive (another process) is SIGKILLed with
// workers idle and loading; one more worker is killed while no hive runs.
// A new supervisor on the same state directory and cgroup tree adopts the
// live ones with the same id, pid and url, keeps their heartbeats, sees the
// loading one become ready and then die of OOM (classified oom from the
// leaf's counter, not the hive's child), restarts the lost one by its
// policy, and stops an adopted one on DELETE.
func TestAdoptAfterHiveKilled(t *testing.T) {
	base := testConfig(t)
	base.Workers.Restart.BackoffBase = config.Duration(200 * time.Millisecond)
	dev := int64(0)
	mem := int64(64 << 20)
	reqs := []SpawnRequest{
		{ModelRef: "file:/models/tiny.gguf", Backend: "sim", Device: &dev},
		{ModelRef: "file:/models/tiny.gguf", Backend: "sim", Device: &dev},
		{ModelRef: "file:/models/tiny.gguf", Backend: "sim", Device: &dev},
		{ModelRef: "file:/models/tiny.gguf", Backend: "sim", Device: &dev, Restart: RestartNever, MemoryLimitBytes: &mem,
			Env: map[string]string{"RBEE_SIM_LOAD_TIME": "4s", "RBEE_SIM_LEAK_MIB_PER_SEC": "40"}},
	}
	root := adoptRoot(t)
	ws, _ := runKilledHive(t, base, root, reqs)
	idle, victim, loader := ws[:2], ws[2], ws[3]
	if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", victim.PID))
		if err != nil || zombie(b) {
			break // dead before the new hive looks
		}
		if time.Now().After(deadline) {
			t.Fatal("SIGKILLed worker still running")
		}
	}

	h := newHarnessWrapped(t, sameTree(t, root), func(c *config.Config) { *c = *base })
	for _, w := range append(idle, loader) {
		wi := h.get(w.ID)
		if wi.PID == nil || *wi.PID != w.PID || wi.URL != w.URL || wi.AdoptedAt == nil || wi.User != w.User || w.User == "" {
			t.Errorf("worker %s after adoption: pid %v url %s user %q adopted_at %v; was pid %d url %s user %q", w.ID, wi.PID, wi.URL, wi.User, wi.AdoptedAt, w.PID, w.URL, w.User)
		}
	}
	if got := testutil.ToFloat64(h.s.m.adopted); got != 3 {
		t.Errorf("adopted %v workers, want 3", got)
	}
	// The lost worker is restarted by its policy (on-failure).
	h.waitFor("lost worker restarted", 20*time.Second, func() bool {
		wi := h.get(victim.ID)
		return wi.State == StateIdle && wi.PID != nil && *wi.PID != victim.PID
	})
	if got := testutil.ToFloat64(h.s.m.exits.WithLabelValues(string(ReasonLost))); got != 1 {
		t.Errorf("exits{lost} = %v", got)
	}
	// The loading one: ready through the new hive's socket, then OOM.
	h.waitState(loader.ID, StateIdle, 20*time.Second)
	wi := h.waitState(loader.ID, StateFailed, 30*time.Second)
	if wi.ExitReason != ReasonOOM || wi.ExitCode != nil {
		t.Errorf("adopted worker's OOM: reason %s code %v", wi.ExitReason, wi.ExitCode)
	}
	// Heartbeats keep the idle ones idle for two thresholds.
	time.Sleep(2 * base.Heartbeat.StaleThreshold.D())
	for _, w := range idle {
		if wi := h.get(w.ID); wi.State != StateIdle {
			t.Errorf("adopted worker %s is %s after two stale thresholds", w.ID, wi.State)
		}
	}
	if code, body := h.do("DELETE", "/v1/workers/"+idle[0].ID, nil); code != 200 {
		t.Fatalf("DELETE adopted worker: %d %s", code, body)
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", idle[0].PID)); err == nil && !zombie(b) {
		t.Errorf("adopted worker %d still running after DELETE", idle[0].PID)
	}
}

func zombie(stat []byte) bool {
	for i := len(stat) - 1; i > 0; i-- {
		if stat[i] == ')' {
			return i+2 < len(stat) && (stat[i+2] == 'Z' || stat[i+2] == 'X')
		}
	}
	return false
}

// adoptRoot is a fresh cgroup tree for a first hive and its successor.
func adoptRoot(t testing.TB) string {
	testkit.RequireRoot(t)
	root := fmt.Sprintf("rbee-adopt-%08x", rand.Uint32())
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		root = "/sys/fs/cgroup/" + root
	}
	return root
}

// sameTree makes the harness's supervisor manage root (removed at the end).
func sameTree(t testing.TB, root string) func(cgroup.Manager) cgroup.Manager {
	return func(cgroup.Manager) cgroup.Manager {
		m, err := cgroup.New(cgroup.Options{Root: root})
		if err != nil {
			t.Fatalf("cgroup.New: %v", err)
		}
		t.Cleanup(func() { removeCgroupTree(t, m, filepath.Base(root)) })
		return m
	}
}

// runKilledHive runs a first hive with cfg on root as another process,
// lets it spawn reqs, SIGKILLs it and returns its workers and how long it
// took to spawn them.
func runKilledHive(t testing.TB, cfg *config.Config, root string, reqs []SpawnRequest) ([]spawned, time.Duration) {
	t.Helper()
	toml, err := cfg.TOML()
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(t.TempDir(), "hive.toml")
	if err := os.WriteFile(cfgPath, toml, 0o600); err != nil {
		t.Fatal(err)
	}
	rb, _ := json.Marshal(reqs)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	first := exec.Command(self)
	first.Env = append(os.Environ(), firstHiveEnv+"="+cfgPath, firstHiveRoot+"="+root, firstHiveSpawns+"="+string(rb),
		"RBEE_SIMWORKER="+filepath.Join(simDir, "rbee-simworker"))
	first.Stderr = io.Discard
	if testing.Verbose() {
		first.Stderr = os.Stderr
	}
	stdout, err := first.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan []string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		var got []string
		for len(got) < 2 && sc.Scan() {
			got = append(got, sc.Text())
		}
		lines <- got
		_, _ = io.Copy(io.Discard, stdout)
	}()
	var ws []spawned
	var took time.Duration
	select {
	case l := <-lines:
		if len(l) != 2 || json.Unmarshal([]byte(l[0]), &ws) != nil || len(ws) != len(reqs) {
			_ = first.Process.Kill()
			t.Fatalf("first hive printed %q", l)
		}
		ns, _ := strconv.ParseInt(l[1], 10, 64)
		took = time.Duration(ns)
	case <-time.After(120 * time.Second):
		_ = first.Process.Kill()
		t.Fatal("first hive did not spawn its workers")
	}
	if err := first.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = first.Wait()
	return ws, took
}
