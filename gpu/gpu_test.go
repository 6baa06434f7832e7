package gpu

import (
	"context"
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"time"
)

const gib = 1 << 30

func TestOpenDrivers(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		driver  string
		backend string // "" = Open must fail
		devices int
	}{
		{"none", "none", 0},
		{"fake", "fake", 2},
		{"FAKE", "fake", 2},
		{"bogus", "", 0},
	}
	fake := []FakeDevice{{MemoryTotal: 24 * gib}, {MemoryTotal: 80 * gib, Name: "H100"}}
	for _, tc := range tests {
		t.Run(tc.driver, func(t *testing.T) {
			g, err := Open(tc.driver, fake)
			if tc.backend == "" {
				if err == nil {
					t.Fatal("Open succeeded, want error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			if g.Backend() != tc.backend {
				t.Fatalf("backend %q, want %q", g.Backend(), tc.backend)
			}
			devs, err := g.Devices(ctx)
			if err != nil || len(devs) != tc.devices {
				t.Fatalf("Devices = %d, %v; want %d", len(devs), err, tc.devices)
			}
		})
	}
}

// This host has no NVIDIA driver: "auto" must mean "no GPUs", not a crash,
// and "nvml" must say why. On a GPU host the same test reports the cards.
func TestOpenAutoWithoutDriver(t *testing.T) {
	g, err := Open("auto", nil)
	if err != nil {
		t.Fatalf("Open(auto) = %v", err)
	}
	defer g.Close()
	s, err := Detect(context.Background(), g)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("detect:\n%s", s)
	if g.Backend() == DriverNVML {
		t.Logf("NVML present: %d device(s)", len(s.Devices))
		return
	}
	if len(s.Devices) != 0 || s.Reason == "" || !strings.Contains(s.String(), "no GPUs") {
		t.Fatalf("summary = %+v", s)
	}
	if _, err := g.Processes(context.Background(), 0); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("Processes on none = %v", err)
	}
	if _, err := Open("nvml", nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Open(nvml) without driver = %v, want ErrUnavailable", err)
	}
}

func TestFakeMemoryAndProcesses(t *testing.T) {
	ctx := context.Background()
	f, err := NewFake([]FakeDevice{
		{MemoryTotal: 24 * gib, MemoryReserved: gib / 2},
		{MemoryTotal: 80 * gib, MemoryUsed: 10 * gib, Processes: []FakeProcess{{PID: 7, UsedMemory: 5 * gib}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	devs, _ := f.Devices(ctx)
	if d := devs[0]; d.MemoryFree != 24*gib-gib/2 || d.MemoryUsed != 0 || d.MemoryReserved != gib/2 {
		t.Fatalf("dev0 = %+v", d)
	}
	if d := devs[1]; d.MemoryFree != 65*gib || d.MemoryUsed != 15*gib {
		t.Fatalf("dev1 = %+v", d)
	}
	if devs[0].UUID == devs[1].UUID {
		t.Fatal("fake UUIDs collide")
	}
	if err := f.SetProcess(0, 100, 3*gib); err != nil {
		t.Fatal(err)
	}
	if err := f.SetProcess(0, 101, 1*gib); err != nil {
		t.Fatal(err)
	}
	ps, _ := f.Processes(ctx, 0)
	if len(ps) != 2 || ps[0].PID != 100 || UsedBy(ps, []int{100, 101, 5}) != 4*gib || UsedBy(ps, nil) != 0 {
		t.Fatalf("procs = %+v", ps)
	}
	if _, err := f.Processes(ctx, 2); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("Processes(2) = %v", err)
	}
	if err := f.SetUsed(5, 1); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("SetUsed(5) = %v", err)
	}
	_ = f.Close()
	if _, err := f.Devices(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
	if _, err := NewFake([]FakeDevice{{}}); err == nil {
		t.Fatal("zero total accepted")
	}
	if f, err := NewFake([]FakeDevice{{MemoryTotal: 1 << 30, MemoryReserved: math.MaxUint64, MemoryUsed: 1}}); err == nil {
		d, _ := f.Devices(context.Background())
		t.Errorf("reserved > total accepted (reserved+used wraps): %+v", d)
	}
	if _, err := NewFake([]FakeDevice{{MemoryTotal: 1, MemoryUsed: 2}}); err == nil {
		t.Fatal("used > total accepted")
	}
}

func TestFakeFreeLag(t *testing.T) {
	ctx := context.Background()
	var mu sync.Mutex
	now := time.Unix(1000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }

	f, err := NewFake([]FakeDevice{{MemoryTotal: 16 * gib}}, WithFreeLag(2*time.Second), WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	_ = f.SetProcess(0, 42, 10*gib)
	_ = f.ExitProcess(0, 42)
	ps, _ := f.Processes(ctx, 0)
	devs, _ := f.Devices(ctx)
	if len(ps) != 0 || devs[0].MemoryFree != 6*gib {
		t.Fatalf("right after exit: procs %v free %d, want none and 6 GiB (lagging)", ps, devs[0].MemoryFree)
	}
	advance(2 * time.Second)
	devs, _ = f.Devices(ctx)
	if devs[0].MemoryFree != 16*gib {
		t.Fatalf("after lag: free %d", devs[0].MemoryFree)
	}
}

func TestFormatBytes(t *testing.T) {
	for in, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.00 KiB", 85520809984: "79.65 GiB"} {
		if got := FormatBytes(in); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", in, got, want)
		}
	}
}
