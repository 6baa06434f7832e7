package bench

import (
	"context"
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/admission"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/procfs"
)

// Resource benchmarks: scrape latency of the admission collector, the cost
// of the reads admission makes (statfs, /proc/meminfo), and Admit
// throughput. Run: go test -run '^$' -bench Resources -benchmem ./bench/

func hostLedger(b *testing.B, gpus int) *admission.Ledger {
	b.Helper()
	r, err := procfs.New("")
	if err != nil {
		b.Fatal(err)
	}
	cfg := admission.Config{Memory: r, DiskPaths: []string{b.TempDir()}, VRAMRecoveryWait: -1}
	if gpus > 0 {
		devs := make([]gpu.FakeDevice, gpus)
		for i := range devs {
			devs[i] = gpu.FakeDevice{MemoryTotal: 80 << 30}
		}
		f, err := gpu.NewFake(devs)
		if err != nil {
			b.Fatal(err)
		}
		cfg.GPUs = f
	}
	l, err := admission.NewLedger(cfg)
	if err != nil {
		b.Fatal(err)
	}
	return l
}

func BenchmarkResourcesCollectorScrape(b *testing.B) {
	for _, gpus := range []int{0, 8} {
		b.Run(fmt.Sprintf("gpus=%d", gpus), func(b *testing.B) {
			reg := prometheus.NewRegistry()
			reg.MustRegister(hostLedger(b, gpus).Collector())
			b.ReportAllocs()
			for b.Loop() {
				if _, err := reg.Gather(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkResourcesCheckDisk(b *testing.B) {
	dir := b.TempDir()
	b.ReportAllocs()
	for b.Loop() {
		if err := admission.CheckDisk(dir, 1, 0); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkResourcesMemAvailable(b *testing.B) {
	r, err := procfs.New("")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.MemAvailable(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkResourcesAdmit(b *testing.B) {
	ctx := context.Background()
	b.Run("ram", func(b *testing.B) {
		l := hostLedger(b, 0)
		b.ReportAllocs()
		for b.Loop() {
			c, err := l.Admit(ctx, admission.Request{WorkerID: "w-b", MemoryBytes: 1 << 20})
			if err != nil {
				b.Fatal(err)
			}
			c.Release()
		}
	})
	b.Run("ram+vram", func(b *testing.B) {
		l := hostLedger(b, 4)
		g := 1
		b.ReportAllocs()
		for b.Loop() {
			c, err := l.Admit(ctx, admission.Request{WorkerID: "w-b", MemoryBytes: 1 << 20, GPU: &g, VRAMBytes: 1 << 30})
			if err != nil {
				b.Fatal(err)
			}
			c.Release()
		}
	})
	b.Run("ram+vram/parallel", func(b *testing.B) {
		l := hostLedger(b, 4)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			g := 0
			for pb.Next() {
				g = (g + 1) % 4
				c, err := l.Admit(ctx, admission.Request{WorkerID: "w-b", MemoryBytes: 1 << 20, GPU: &g, VRAMBytes: 1 << 30})
				if err != nil {
					b.Error(err)
					return
				}
				c.Release()
			}
		})
	})
}
