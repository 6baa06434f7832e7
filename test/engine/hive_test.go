package engine

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/internal/testkit"
)

func TestMain(m *testing.M) {
	cgroup.MaybeRunGate()
	os.Exit(m.Run())
}

// llamaServer is the genuine llama-server (scripts/build-llama-server.sh
// prints its path; `make enginetest` passes it as RBEE_LLAMA_SERVER). Without
// it the test skips, except under CI, where it must run.
func llamaServer(t testing.TB) string {
	t.Helper()
	why := ""
	bin := os.Getenv("RBEE_LLAMA_SERVER")
	switch {
	case os.Geteuid() != 0:
		why = "needs root (cgroups)"
	case bin == "":
		why = "RBEE_LLAMA_SERVER is not set (make enginetest builds llama-server and sets it)"
	default:
		if _, err := os.Stat(bin); err != nil {
			why = "RBEE_LLAMA_SERVER: " + err.Error()
		}
	}
	if why == "" {
		return bin
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s (CI must run this test: make enginetest)", why)
	}
	t.Skip(why)
	return ""
}

// hive is a running `rbee-hive daemon` built from this tree.
type hive struct {
	*testkit.Hive
}

func buildHive(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir, "./cmd/rbee-hive")
	cmd.Dir = "../.."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return filepath.Join(dir, "rbee-hive")
}

func startHive(t testing.TB, backends string) *hive {
	t.Helper()
	bin := buildHive(t)
	env := testkit.NewHiveEnv(t, "rbee-engine-")
	cfg := fmt.Sprintf(`listen = "127.0.0.1:%d"
state_dir = %q
runtime_dir = %q
log_format = "json"

# The tests write their GGUF files to their own temp dirs.
[models]
file_roots = [%q]

[cgroup]
root = %q

[workers]
grace_period = "3s"
shutdown_budget = "20s"
port_min = 40000
port_max = 44999

[workers.restart]
backoff_base = "200ms"
backoff_max = "1s"
jitter = 0.0
max_failures = 3
failure_window = "60s"
%s`, env.Port, env.State, env.Runtime, filepath.Clean(os.TempDir()), env.CgroupRoot, backends)
	return &hive{testkit.StartHive(t, env, testkit.HiveOptions{Bin: bin, Config: cfg,
		StartTimeout: 30 * time.Second, StopTimeout: 40 * time.Second})}
}

// workerInfo is the part of GET /v1/workers/{id} the test reads.
type workerInfo struct {
	ID             string `json:"id"`
	URL            string `json:"url"`
	State          string `json:"state"`
	PID            *int   `json:"pid"`
	SlotsTotal     int    `json:"slots_total"`
	SlotsAvailable int    `json:"slots_available"`
	ContextSize    int    `json:"context_size"`
	InFlight       int    `json:"in_flight"`
	RestartCount   int    `json:"restart_count"`
	ExitReason     string `json:"exit_reason"`
	StateReason    string `json:"state_reason"`
}

func (h *hive) worker(id string) (workerInfo, int) {
	h.T.Helper()
	var wi workerInfo
	return wi, h.GetJSON("/v1/workers/"+id, &wi)
}
