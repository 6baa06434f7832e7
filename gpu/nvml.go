//go:build linux && cgo

package gpu

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/rbee/rbee-hive/procfs"
)

// Exact exported names probed once after Init. go-nvml binds one literal
// symbol per wrapper and resolves it lazily: calling a wrapper whose symbol
// the installed driver lacks kills the process with a loader error that
// recover() cannot catch (go-nvml#82), so every call below is gated on its
// symbol (the nvidia_gpu_exporter pattern).
const (
	symCount         = "nvmlDeviceGetCount"
	symCountV2       = "nvmlDeviceGetCount_v2"
	symHandle        = "nvmlDeviceGetHandleByIndex"
	symHandleV2      = "nvmlDeviceGetHandleByIndex_v2"
	symName          = "nvmlDeviceGetName"
	symUUID          = "nvmlDeviceGetUUID"
	symPci           = "nvmlDeviceGetPciInfo"
	symPciV2         = "nvmlDeviceGetPciInfo_v2"
	symPciV3         = "nvmlDeviceGetPciInfo_v3"
	symMem           = "nvmlDeviceGetMemoryInfo"
	symMemV2         = "nvmlDeviceGetMemoryInfo_v2"
	symUtil          = "nvmlDeviceGetUtilizationRates"
	symProcs         = "nvmlDeviceGetComputeRunningProcesses"
	symProcsV2       = "nvmlDeviceGetComputeRunningProcesses_v2"
	symProcsV3       = "nvmlDeviceGetComputeRunningProcesses_v3"
	symMigMode       = "nvmlDeviceGetMigMode"
	symMaxMig        = "nvmlDeviceGetMaxMigDeviceCount"
	symMigByIndex    = "nvmlDeviceGetMigDeviceHandleByIndex"
	symDriverVersion = "nvmlSystemGetDriverVersion"
	symShutdown      = "nvmlShutdown"
)

var probedSymbols = []string{
	symCount, symCountV2, symHandle, symHandleV2, symName, symUUID, symPci, symPciV2, symPciV3,
	symMem, symMemV2, symUtil, symProcs, symProcsV2, symProcsV3, symMigMode, symMaxMig,
	symMigByIndex, symDriverVersion, symShutdown,
}

// HostMemoryFunc returns host MemTotal and MemAvailable in bytes; NVML uses
// it for unified-memory GPUs that report no memory of their own.
type HostMemoryFunc func() (total, available uint64, err error)

// NVML is the GPUs backend on the NVIDIA driver.
type NVML struct {
	lib     nvml.Interface
	present map[string]bool // written once in newNVML, read-only after
	host    HostMemoryFunc
	driver  string

	mu     sync.Mutex // serialises enumeration and Close
	closed bool
}

var _ GPUs = (*NVML)(nil)

func openNVML() (GPUs, error) {
	return NewNVML(nvml.New(), hostMemory)
}

// hostMemory reads /proc/meminfo for unified-memory GPUs.
func hostMemory() (total, available uint64, err error) {
	r, err := procfs.New("")
	if err != nil {
		return 0, 0, err
	}
	m, err := r.Memory()
	if err != nil {
		return 0, 0, err
	}
	return m.TotalBytes, m.AvailableBytes, nil
}

// NewNVML initialises lib (nvml.New(), or a go-nvml mock in tests). An Init
// failure returns an error wrapping ErrUnavailable when the driver library
// or kernel module is missing; no other NVML call is made after a failed
// Init, because that crashes the process. host may be nil.
func NewNVML(lib nvml.Interface, host HostMemoryFunc) (*NVML, error) {
	if ret := lib.Init(); ret != nvml.SUCCESS {
		switch ret {
		case nvml.ERROR_LIBRARY_NOT_FOUND, nvml.ERROR_DRIVER_NOT_LOADED:
			return nil, fmt.Errorf("%w: nvml init: %w", ErrUnavailable, ret)
		default:
			return nil, fmt.Errorf("gpu: nvml init: %w", ret)
		}
	}
	g := &NVML{lib: lib, present: make(map[string]bool, len(probedSymbols)), host: host}
	ext := lib.Extensions()
	for _, s := range probedSymbols {
		g.present[s] = ext.LookupSymbol(s) == nil
	}
	if !g.has(symCount, symCountV2) || !g.has(symHandle, symHandleV2) {
		_ = g.shutdown()
		return nil, fmt.Errorf("%w: driver lacks nvmlDeviceGetCount/GetHandleByIndex", ErrUnavailable)
	}
	if g.has(symDriverVersion) {
		if v, ret := lib.SystemGetDriverVersion(); ret == nvml.SUCCESS {
			g.driver = v
		}
	}
	return g, nil
}

func (g *NVML) has(names ...string) bool {
	for _, n := range names {
		if g.present[n] {
			return true
		}
	}
	return false
}

// Backend implements GPUs.
func (g *NVML) Backend() string { return DriverNVML }

// DriverVersion is the NVIDIA driver version ("" if unknown).
func (g *NVML) DriverVersion() string { return g.driver }

// handle is one schedulable device: a card, or a MIG instance of one.
type handle struct {
	dev        nvml.Device
	mig        bool
	parentUUID string
}

// enumerate lists schedulable handles in a stable order: cards by NVML
// index; a card in MIG mode is replaced by its MIG instances.
func (g *NVML) enumerate(ctx context.Context) ([]handle, error) {
	n, ret := g.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("gpu: nvml device count: %w", ret)
	}
	out := make([]handle, 0, n)
	for i := 0; i < n; i++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		dev, ret := g.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("gpu: nvml handle %d: %w", i, ret)
		}
		migs, err := g.migHandles(dev)
		if err != nil {
			return nil, fmt.Errorf("gpu: nvml device %d: %w", i, err)
		}
		if len(migs) == 0 {
			out = append(out, handle{dev: dev})
			continue
		}
		out = append(out, migs...)
	}
	return out, nil
}

func (g *NVML) migHandles(dev nvml.Device) ([]handle, error) {
	if !g.has(symMigMode) || !g.has(symMaxMig) || !g.has(symMigByIndex) {
		return nil, nil
	}
	cur, _, ret := dev.GetMigMode()
	if ret != nvml.SUCCESS || cur != nvml.DEVICE_MIG_ENABLE {
		return nil, nil // NOT_SUPPORTED on cards without MIG
	}
	maxN, ret := dev.GetMaxMigDeviceCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("mig device count: %w", ret)
	}
	parent := ""
	if g.has(symUUID) {
		parent, _ = dev.GetUUID()
	}
	var out []handle
	for j := 0; j < maxN; j++ {
		m, ret := dev.GetMigDeviceHandleByIndex(j)
		if ret == nvml.ERROR_NOT_FOUND || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue // slot without an instance
		}
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("mig handle %d: %w", j, ret)
		}
		out = append(out, handle{dev: m, mig: true, parentUUID: parent})
	}
	return out, nil
}

// Devices implements GPUs.
func (g *NVML) Devices(ctx context.Context) ([]Device, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, ErrClosed
	}
	hs, err := g.enumerate(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Device, 0, len(hs))
	for i, h := range hs {
		d, err := g.describe(i, h)
		if err != nil {
			return nil, fmt.Errorf("gpu %d: %w", i, err)
		}
		out = append(out, d)
	}
	return out, nil
}

func (g *NVML) describe(index int, h handle) (Device, error) {
	d := Device{Index: index, MIG: h.mig, ParentUUID: h.parentUUID}
	if g.has(symUUID) {
		if v, ret := h.dev.GetUUID(); ret == nvml.SUCCESS {
			d.UUID = v
		}
	}
	if g.has(symName) {
		if v, ret := h.dev.GetName(); ret == nvml.SUCCESS {
			d.Name = v
		}
	}
	if !h.mig && g.has(symPci, symPciV2, symPciV3) {
		if p, ret := h.dev.GetPciInfo(); ret == nvml.SUCCESS {
			d.PCIBusID = cString(p.BusId[:])
		}
	}
	if err := g.memory(h.dev, &d); err != nil {
		return d, err
	}
	// Utilization is NOT_SUPPORTED on MIG: leave it absent, not 0.
	if !h.mig && g.has(symUtil) {
		if u, ret := h.dev.GetUtilizationRates(); ret == nvml.SUCCESS {
			v := u.Gpu
			d.UtilizationPct = &v
		}
	}
	return d, nil
}

// memory fills d's memory figures: v2 (used excludes driver-reserved memory)
// where the driver exports it, v1 otherwise, host RAM on unified-memory GPUs.
func (g *NVML) memory(dev nvml.Device, d *Device) error {
	if g.has(symMemV2) {
		m, ret := dev.GetMemoryInfo_v2()
		if ret == nvml.SUCCESS {
			d.MemoryTotal, d.MemoryFree, d.MemoryUsed, d.MemoryReserved = m.Total, m.Free, m.Used, m.Reserved
			return nil
		}
		if ret != nvml.ERROR_NOT_SUPPORTED && ret != nvml.ERROR_FUNCTION_NOT_FOUND {
			return fmt.Errorf("memory info v2: %w", ret)
		}
	}
	if g.has(symMem) {
		m, ret := dev.GetMemoryInfo()
		if ret == nvml.SUCCESS {
			d.MemoryTotal, d.MemoryFree, d.MemoryUsed = m.Total, m.Free, m.Used
			return nil
		}
		if ret != nvml.ERROR_NOT_SUPPORTED {
			return fmt.Errorf("memory info: %w", ret)
		}
	}
	// Unified memory (GB10/DGX-Spark class): NVML has no framebuffer
	// figures; the GPU allocates from host RAM.
	if g.host == nil {
		return errors.New("memory info not supported and no host memory fallback")
	}
	total, avail, err := g.host()
	if err != nil {
		return fmt.Errorf("unified memory fallback: %w", err)
	}
	d.UnifiedMemory = true
	d.MemoryTotal, d.MemoryFree = total, avail
	if avail < total {
		d.MemoryUsed = total - avail
	}
	return nil
}

// Processes implements GPUs.
func (g *NVML) Processes(ctx context.Context, index int) ([]Process, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, ErrClosed
	}
	if !g.has(symProcs, symProcsV2, symProcsV3) {
		return nil, fmt.Errorf("gpu %d: driver lacks nvmlDeviceGetComputeRunningProcesses", index)
	}
	hs, err := g.enumerate(ctx)
	if err != nil {
		return nil, err
	}
	if index < 0 || index >= len(hs) {
		return nil, fmt.Errorf("gpu %d: %w", index, ErrNoDevice)
	}
	infos, ret := hs[index].dev.GetComputeRunningProcesses()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("gpu %d: compute processes: %w", index, ret)
	}
	var total uint64
	if g.has(symMem) {
		if m, ret := hs[index].dev.GetMemoryInfo(); ret == nvml.SUCCESS {
			total = m.Total
		}
	}
	return sanitizeProcs(infos, total), nil
}

// sanitizeProcs guards against the struct/ABI mismatches seen in the wild
// (go-nvml#75): pid 0 is dropped, and an impossible used figure (the
// NOT_AVAILABLE sentinel, or more than the card holds) becomes 0, unknown.
func sanitizeProcs(infos []nvml.ProcessInfo, total uint64) []Process {
	out := make([]Process, 0, len(infos))
	for _, p := range infos {
		if p.Pid == 0 {
			continue
		}
		used := p.UsedGpuMemory
		if used == ^uint64(0) || (total > 0 && used > total) {
			used = 0
		}
		out = append(out, Process{PID: int(p.Pid), UsedMemory: used})
	}
	sortProcs(out)
	return out
}

// Close implements GPUs: one Shutdown for the one Init.
func (g *NVML) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	return g.shutdown()
}

func (g *NVML) shutdown() error {
	if !g.has(symShutdown) {
		return nil
	}
	if ret := g.lib.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("gpu: nvml shutdown: %w", ret)
	}
	return nil
}

func cString(b []int8) string {
	buf := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		buf = append(buf, byte(c))
	}
	return string(buf)
}
