//go:build linux && cgo

package gpu

import (
	"context"
	"errors"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/gpus"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

// The go-nvml mock server stands in for the driver: these tests exercise the
// real NVML code path (symbol gating, v2/v1 memory, MIG, process sanity).
// Unset mock funcs panic, so a call the guards should have prevented fails
// the test loudly.

func h100Server(t *testing.T, n int) *server.Server {
	t.Helper()
	s, err := server.New(server.WithGPUs(gpus.Multiple(n, gpus.H100_SXM5_80GB)...), server.WithDriverVersion("590.48.01"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func missing(names ...string) func(string) error {
	set := map[string]bool{}
	for _, n := range names {
		set[n] = true
	}
	return func(s string) error {
		if set[s] {
			return errors.New("undefined symbol " + s)
		}
		return nil
	}
}

func TestNVMLMemoryV2AndProcesses(t *testing.T) {
	ctx := context.Background()
	s := h100Server(t, 2)
	d0 := s.Devices[0].(*server.Device)
	d0.GetMemoryInfo_v2Func = func() (nvml.Memory_v2, nvml.Return) {
		return nvml.Memory_v2{Total: 85520809984, Reserved: 502267904, Free: 75019590656, Used: 10 << 30}, nvml.SUCCESS
	}
	d0.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) { return nvml.Utilization{Gpu: 37}, nvml.SUCCESS }
	d0.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) {
		return []nvml.ProcessInfo{
			{Pid: 300, UsedGpuMemory: 6 << 30},
			{Pid: 200, UsedGpuMemory: 4 << 30},
			{Pid: 0, UsedGpuMemory: 1},            // garbage entry
			{Pid: 400, UsedGpuMemory: ^uint64(0)}, // NOT_AVAILABLE
			{Pid: 500, UsedGpuMemory: 1 << 50},    // more than the card
		}, nvml.SUCCESS
	}
	d1 := s.Devices[1].(*server.Device)
	d1.GetMemoryInfo_v2Func = func() (nvml.Memory_v2, nvml.Return) { return nvml.Memory_v2{}, nvml.ERROR_NOT_SUPPORTED }
	d1.MemoryInfo = nvml.Memory{Total: 80 << 30, Free: 70 << 30, Used: 10 << 30}
	d1.GetUtilizationRatesFunc = d0.GetUtilizationRatesFunc

	g, err := NewNVML(s, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if g.DriverVersion() != "590.48.01" {
		t.Errorf("driver %q", g.DriverVersion())
	}
	devs, err := g.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 2 {
		t.Fatalf("%d devices", len(devs))
	}
	if d := devs[0]; d.MemoryTotal != 85520809984 || d.MemoryReserved != 502267904 || d.MemoryUsed != 10<<30 ||
		d.UUID == "" || d.Name == "" || d.UtilizationPct == nil || *d.UtilizationPct != 37 {
		t.Fatalf("dev0 = %+v", d)
	}
	if d := devs[1]; d.MemoryTotal != 80<<30 || d.MemoryFree != 70<<30 || d.MemoryReserved != 0 {
		t.Fatalf("dev1 (v1 fallback) = %+v", d)
	}
	ps, err := g.Processes(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []Process{{200, 4 << 30}, {300, 6 << 30}, {400, 0}, {500, 0}}
	if len(ps) != len(want) {
		t.Fatalf("procs = %+v", ps)
	}
	for i := range want {
		if ps[i] != want[i] {
			t.Fatalf("procs = %+v, want %+v", ps, want)
		}
	}
	if _, err := g.Processes(ctx, 9); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("Processes(9) = %v", err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Devices(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close = %v", err)
	}
}

// An old driver without the v2 memory or utilization symbols: the wrappers
// must not be entered (their mock funcs are unset and would panic).
func TestNVMLMissingSymbolsAreNotCalled(t *testing.T) {
	s := h100Server(t, 1)
	s.Devices[0].(*server.Device).MemoryInfo = nvml.Memory{Total: 80 << 30, Free: 80 << 30}
	s.LookupSymbolFunc = missing(symMemV2, symUtil, symProcs, symProcsV2, symProcsV3, symMigMode)
	g, err := NewNVML(s, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	devs, err := g.Devices(context.Background())
	if err != nil || len(devs) != 1 || devs[0].MemoryFree != 80<<30 || devs[0].UtilizationPct != nil {
		t.Fatalf("devs = %+v, %v", devs, err)
	}
	if _, err := g.Processes(context.Background(), 0); err == nil {
		t.Fatal("Processes without the symbol succeeded")
	}
}

func TestNVMLInitFailures(t *testing.T) {
	tests := []struct {
		ret         nvml.Return
		unavailable bool
	}{
		{nvml.ERROR_LIBRARY_NOT_FOUND, true},
		{nvml.ERROR_DRIVER_NOT_LOADED, true},
		{nvml.ERROR_NO_PERMISSION, false},
		{nvml.ERROR_LIB_RM_VERSION_MISMATCH, false},
	}
	for _, tc := range tests {
		t.Run(tc.ret.String(), func(t *testing.T) {
			// Only Init is set: any further call would panic.
			lib := &mock.Interface{InitFunc: func() nvml.Return { return tc.ret }}
			_, err := NewNVML(lib, nil)
			if err == nil {
				t.Fatal("NewNVML succeeded")
			}
			if errors.Is(err, ErrUnavailable) != tc.unavailable || !errors.Is(err, tc.ret) {
				t.Fatalf("err = %v", err)
			}
		})
	}
	// A library without even DeviceGetCount is unusable, and is shut down.
	s := h100Server(t, 1)
	s.LookupSymbolFunc = missing(symCount, symCountV2)
	if _, err := NewNVML(s, nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("no DeviceGetCount: %v", err)
	}
	if len(s.ShutdownCalls()) != 1 {
		t.Fatalf("Shutdown calls = %d", len(s.ShutdownCalls()))
	}
}

func TestNVMLMIGAndUnifiedMemory(t *testing.T) {
	ctx := context.Background()
	s := h100Server(t, 2)
	card := s.Devices[0].(*server.Device)
	card.MigMode = nvml.DEVICE_MIG_ENABLE
	card.GetMaxMigDeviceCountFunc = func() (int, nvml.Return) { return 3, nvml.SUCCESS }
	mig := func(uuid string, total uint64) *mock.Device {
		return &mock.Device{
			GetUUIDFunc: func() (string, nvml.Return) { return uuid, nvml.SUCCESS },
			GetNameFunc: func() (string, nvml.Return) { return "NVIDIA H100 80GB HBM3 MIG 3g.40gb", nvml.SUCCESS },
			GetMemoryInfo_v2Func: func() (nvml.Memory_v2, nvml.Return) {
				return nvml.Memory_v2{Total: total, Free: total}, nvml.SUCCESS
			},
			GetComputeRunningProcessesFunc: func() ([]nvml.ProcessInfo, nvml.Return) {
				return []nvml.ProcessInfo{{Pid: 77, UsedGpuMemory: 1 << 30}}, nvml.SUCCESS
			},
			GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) { return nvml.Memory{Total: total}, nvml.SUCCESS },
		}
	}
	migs := []nvml.Device{mig("MIG-a", 40<<30), nil, mig("MIG-b", 40<<30)}
	card.GetMigDeviceHandleByIndexFunc = func(i int) (nvml.Device, nvml.Return) {
		if migs[i] == nil {
			return nil, nvml.ERROR_NOT_FOUND
		}
		return migs[i], nvml.SUCCESS
	}
	// Card 1 is unified memory: NVML has no figures, host RAM stands in.
	uni := s.Devices[1].(*server.Device)
	uni.GetMemoryInfo_v2Func = func() (nvml.Memory_v2, nvml.Return) { return nvml.Memory_v2{}, nvml.ERROR_NOT_SUPPORTED }
	uni.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) { return nvml.Memory{}, nvml.ERROR_NOT_SUPPORTED }
	uni.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) { return nvml.Utilization{}, nvml.ERROR_NOT_SUPPORTED }

	g, err := NewNVML(s, func() (uint64, uint64, error) { return 128 << 30, 100 << 30, nil })
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	devs, err := g.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 3 {
		t.Fatalf("devices = %+v", devs)
	}
	for i, uuid := range []string{"MIG-a", "MIG-b"} {
		d := devs[i]
		if d.Index != i || d.UUID != uuid || !d.MIG || d.ParentUUID != card.UUID || d.MemoryTotal != 40<<30 ||
			d.UtilizationPct != nil || d.PCIBusID != "" {
			t.Fatalf("mig %d = %+v", i, d)
		}
	}
	if d := devs[2]; !d.UnifiedMemory || d.MemoryTotal != 128<<30 || d.MemoryFree != 100<<30 || d.MemoryUsed != 28<<30 {
		t.Fatalf("unified = %+v", d)
	}
	ps, err := g.Processes(ctx, 1)
	if err != nil || len(ps) != 1 || ps[0].PID != 77 {
		t.Fatalf("mig procs = %+v, %v", ps, err)
	}
}
