package admission

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/internal/testkit"
)

func lint(t *testing.T, c prometheus.Collector) {
	t.Helper()
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	// The pedantic registry checks Collect against Describe.
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
}

func TestCollectorWithFakeGPUs(t *testing.T) {
	diskDir := t.TempDir()
	_, mem := newMeminfo(t, 16*1024*1024, 8*1024*1024)
	l, f := fakeLedger(t, []gpu.FakeDevice{{MemoryTotal: 24 * gib, Name: "RTX 4090"}, {MemoryTotal: 80 * gib, MemoryUsed: 10 * gib}},
		Config{Memory: mem, DiskPaths: []string{diskDir}, VRAMRecoveryWait: -1})
	_ = f.SetProcess(0, 1, 4*gib)
	c := mustAdmit(t, l, 0, 2*gib)
	defer c.Release()
	_, _ = l.Admit(context.Background(), Request{WorkerID: "w-no", GPU: ptr(1), VRAMBytes: 100 * gib})

	col := l.Collector()
	lint(t, col)
	expected := `
# HELP rbee_hive_memory_available_bytes Host memory available for new work without swapping (MemAvailable).
# TYPE rbee_hive_memory_available_bytes gauge
rbee_hive_memory_available_bytes 8.589934592e+09
# HELP rbee_hive_memory_total_bytes Host memory size (MemTotal).
# TYPE rbee_hive_memory_total_bytes gauge
rbee_hive_memory_total_bytes 1.7179869184e+10
# HELP rbee_hive_memory_used_bytes Host memory in use: MemTotal minus MemAvailable.
# TYPE rbee_hive_memory_used_bytes gauge
rbee_hive_memory_used_bytes 8.589934592e+09
# HELP rbee_hive_vram_total_bytes GPU memory size.
# TYPE rbee_hive_vram_total_bytes gauge
rbee_hive_vram_total_bytes{gpu="0"} 2.5769803776e+10
rbee_hive_vram_total_bytes{gpu="1"} 8.589934592e+10
# HELP rbee_hive_vram_available_bytes GPU memory free as reported by the driver.
# TYPE rbee_hive_vram_available_bytes gauge
rbee_hive_vram_available_bytes{gpu="0"} 2.147483648e+10
rbee_hive_vram_available_bytes{gpu="1"} 7.516192768e+10
# HELP rbee_hive_vram_claimed_bytes GPU memory claimed by admitted workers and not yet visible in the driver's figures.
# TYPE rbee_hive_vram_claimed_bytes gauge
rbee_hive_vram_claimed_bytes{gpu="0"} 2.147483648e+09
rbee_hive_vram_claimed_bytes{gpu="1"} 0
# HELP rbee_hive_admission_rejections_total Requests refused for lack of a resource.
# TYPE rbee_hive_admission_rejections_total counter
rbee_hive_admission_rejections_total{resource="disk"} 0
rbee_hive_admission_rejections_total{resource="memory"} 0
rbee_hive_admission_rejections_total{resource="vram"} 1
`
	if err := testutil.CollectAndCompare(col, strings.NewReader(expected),
		"rbee_hive_memory_available_bytes", "rbee_hive_memory_total_bytes", "rbee_hive_memory_used_bytes",
		"rbee_hive_vram_total_bytes", "rbee_hive_vram_available_bytes", "rbee_hive_vram_claimed_bytes",
		"rbee_hive_admission_rejections_total"); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int{
		"rbee_hive_gpu_info": 2, "rbee_hive_vram_used_bytes": 2,
		"rbee_hive_disk_available_bytes": 1, "rbee_hive_disk_used_bytes": 1, "rbee_hive_disk_total_bytes": 1,
	} {
		if n := testutil.CollectAndCount(col, name); n != want {
			t.Errorf("%s: %d series, want %d", name, n, want)
		}
	}
}

// No GPU (NVML absent on this host): the vram families are simply absent.
func TestCollectorWithoutGPUs(t *testing.T) {
	g, err := gpu.Open("auto", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if g.Backend() != gpu.DriverNone {
		testkit.Skip(t, "this host has NVIDIA GPUs")
	}
	_, mem := newMeminfo(t, 1024*1024, 512*1024)
	for _, gs := range []gpu.GPUs{g, nil} {
		l, _ := NewLedger(Config{Memory: mem, GPUs: gs, DiskPaths: []string{t.TempDir()}})
		col := l.Collector()
		lint(t, col)
		for _, name := range []string{"rbee_hive_vram_available_bytes", "rbee_hive_vram_used_bytes", "rbee_hive_vram_total_bytes", "rbee_hive_gpu_info"} {
			if n := testutil.CollectAndCount(col, name); n != 0 {
				t.Errorf("%s: %d series without a GPU", name, n)
			}
		}
		if n := testutil.CollectAndCount(col, "rbee_hive_memory_available_bytes"); n != 1 {
			t.Errorf("memory metric missing")
		}
		r := l.Resources(context.Background())
		if len(r.GPUs) != 0 || r.GPUBackend != gpu.DriverNone || len(r.Disks) != 1 || len(r.Errors) != 0 {
			t.Errorf("resources %+v", r)
		}
	}
}

// A failing source is left out and counted, not reported as zero.
func TestCollectorReadErrors(t *testing.T) {
	f, mem := newMeminfo(t, 1024, 512)
	l, _ := NewLedger(Config{Memory: mem, DiskPaths: []string{"relative/\x00bad"}})
	f.set(0, 0)
	writeRaw(t, f, "MemTotal: 1 kB\n") // no MemAvailable
	col := l.Collector()
	lint(t, col)
	if n := testutil.CollectAndCount(col, "rbee_hive_memory_available_bytes"); n != 0 {
		t.Errorf("memory reported despite read error")
	}
	expected := `
# HELP rbee_hive_resource_read_errors_total Failed reads of a resource source during scrapes.
# TYPE rbee_hive_resource_read_errors_total counter
rbee_hive_resource_read_errors_total{source="disk"} 4
rbee_hive_resource_read_errors_total{source="gpu"} 0
rbee_hive_resource_read_errors_total{source="memory"} 4
`
	if err := testutil.CollectAndCompare(col, strings.NewReader(expected), "rbee_hive_resource_read_errors_total"); err != nil {
		t.Fatal(err)
	}
	r := l.Resources(context.Background())
	if len(r.Errors) != 2 {
		t.Fatalf("resources errors %v", r.Errors)
	}
}

func writeRaw(t *testing.T, f *meminfoFixture, body string) {
	t.Helper()
	if err := writeFile(f.dir+"/meminfo", body); err != nil {
		t.Fatal(err)
	}
}
