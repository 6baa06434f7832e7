//go:build nvml && linux && cgo

package gpu

import (
	"context"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// TestNVMLRealDriver runs only on a GPU host, on demand:
//
//	go test -count=1 -v -tags nvml -run NVMLReal ./gpu/
//
// It prints what the real driver reports through this package (devices,
// v1 vs v2 memory, compute processes) and fails if NVML is unusable.
func TestNVMLRealDriver(t *testing.T) {
	ctx := context.Background()
	start := time.Now()
	g, err := Open(DriverNVML, nil)
	if err != nil {
		t.Fatalf("Open(nvml): %v", err)
	}
	defer g.Close()
	t.Logf("init took %v", time.Since(start))
	s, err := Detect(ctx, g)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("detect:\n%s", s)
	n := g.(*NVML)
	for sym, ok := range n.present {
		if !ok {
			t.Logf("symbol missing: %s", sym)
		}
	}
	for _, d := range s.Devices {
		t.Logf("gpu %d: %+v", d.Index, d)
		start := time.Now()
		ps, err := g.Processes(ctx, d.Index)
		t.Logf("gpu %d processes (%v): %+v err=%v", d.Index, time.Since(start), ps, err)
	}
	// Raw v1 vs v2 memory on the whole cards, for the anchors' check 1.
	cnt, ret := n.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		t.Fatalf("count: %v", ret)
	}
	for i := range cnt {
		dev, ret := n.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			t.Fatalf("handle %d: %v", i, ret)
		}
		m1, r1 := dev.GetMemoryInfo()
		t.Logf("card %d v1: total=%d free=%d used=%d ret=%v", i, m1.Total, m1.Free, m1.Used, r1)
		if n.has(symMemV2) {
			m2, r2 := dev.GetMemoryInfo_v2()
			t.Logf("card %d v2: total=%d free=%d used=%d reserved=%d ret=%v", i, m2.Total, m2.Free, m2.Used, m2.Reserved, r2)
		}
	}
	start = time.Now()
	for range 100 {
		if _, err := g.Devices(ctx); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("Devices() mean latency: %v", time.Since(start)/100)
}
