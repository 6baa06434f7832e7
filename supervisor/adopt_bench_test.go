package supervisor

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rbee/rbee-hive/config"
)

// BenchmarkAdopt100: a hive (another process) spawns 100 workers and is
// SIGKILLed; a new supervisor on the same state directory and tree adopts
// them. Reported: the adoption (New and Adopt, registry load, identity and
// leaf checks, output files, exit watches) against the first hive's spawn
// of the same 100 workers in the same run, the cost a restart without
// adoption would at least pay again before any model load. One round per
// b.N (run with -benchtime 1x).
func BenchmarkAdopt100(b *testing.B) {
	const n = 100
	for range b.N {
		base := testConfig(b)
		base.Workers.PortMin, base.Workers.PortMax = 40000, 40000+4*n
		base.Backends["sleeper"] = config.Backend{Command: []string{"/bin/sleep", "3600"}, Health: "callback",
			LoadTimeout: config.Duration(time.Hour), MemoryLimit: 64 << 20}
		dev := int64(0)
		reqs := make([]SpawnRequest, n)
		for i := range reqs {
			reqs[i] = SpawnRequest{ModelRef: "file:/models/tiny.gguf", Backend: "sleeper", Device: &dev}
		}
		root := adoptRoot(b)
		ws, spawnTook := runKilledHive(b, base, root, reqs)
		start := time.Now()
		h := newHarnessWrapped(b, sameTree(b, root), func(c *config.Config) { *c = *base })
		total := time.Since(start)
		adoptTook := time.Duration(testutil.ToFloat64(h.s.m.adoptSeconds) * float64(time.Second))
		adopted := 0
		for _, w := range ws {
			if wi := h.get(w.ID); wi.PID != nil && *wi.PID == w.PID {
				adopted++
			}
		}
		if adopted != n {
			b.Fatalf("%d of %d workers adopted", adopted, n)
		}
		b.ReportMetric(float64(adoptTook.Milliseconds()), "adopt-ms")
		b.ReportMetric(float64(total.Milliseconds()), "new+adopt-ms")
		b.ReportMetric(float64(spawnTook.Milliseconds()), "spawn-ms")
		b.ReportMetric(float64(adoptTook)/float64(spawnTook), "adopt/spawn")
	}
}
