// Package gpu discovers GPUs and reads their memory and per-process use.
// Everything above this package talks to the GPUs interface; the NVML
// implementation (cgo, dlopens libnvidia-ml at run time) is the only code that
// touches the driver, and a pure-Go Fake stands in for it in tests and demos.
package gpu

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Device is one schedulable GPU: a whole card, or one MIG instance when the
// card is in MIG mode (a model cannot span MIG instances, so each instance is
// its own device and the parent card is not listed).
type Device struct {
	// Index is the device's position in Devices(); on hosts without MIG it
	// equals the NVML index. It is the "gpu" label and the spawn API's device
	// number. NVML order is not promised stable across reboots: hand workers
	// the UUID (CUDA_VISIBLE_DEVICES), never the index.
	Index int    `json:"index"`
	UUID  string `json:"uuid"` // GPU-… or MIG-…
	Name  string `json:"name"`
	// PCIBusID is empty where the driver does not say (MIG instances).
	PCIBusID string `json:"pci_bus_id,omitempty"`

	// Memory in bytes. Total = Free + Used + Reserved. Reserved is memory the
	// driver/firmware keeps (NVML v2 memory info); it is 0 on drivers with
	// only v1, where Used includes it.
	MemoryTotal    uint64 `json:"memory_total_bytes"`
	MemoryFree     uint64 `json:"memory_free_bytes"`
	MemoryUsed     uint64 `json:"memory_used_bytes"`
	MemoryReserved uint64 `json:"memory_reserved_bytes"`

	// UtilizationPct is the GPU busy percentage (0–100) over the driver's
	// last sample period; nil where unsupported (MIG instances).
	UtilizationPct *uint32 `json:"utilization_pct,omitempty"`

	// MIG marks a MIG instance; ParentUUID is its card.
	MIG        bool   `json:"mig,omitempty"`
	ParentUUID string `json:"parent_uuid,omitempty"`
	// UnifiedMemory marks a GPU sharing host RAM (GB10-class) where NVML has
	// no memory figures; memory is then host MemTotal/MemAvailable.
	UnifiedMemory bool `json:"unified_memory,omitempty"`
}

// Process is one process holding a compute context on a device.
type Process struct {
	// PID is a host pid: the driver does not know pid namespaces.
	PID int `json:"pid"`
	// UsedMemory is the process's device memory in bytes; 0 where the
	// driver cannot tell.
	UsedMemory uint64 `json:"used_memory_bytes"`
}

// GPUs is the GPU backend. Implementations are safe for concurrent use. The
// context bounds waiting between driver calls; a single driver call cannot be
// cancelled.
type GPUs interface {
	// Backend names the implementation: "nvml", "fake" or "none".
	Backend() string
	// Devices lists the schedulable devices with fresh memory figures.
	Devices(ctx context.Context) ([]Device, error)
	// Processes lists the compute processes on device index.
	Processes(ctx context.Context, index int) ([]Process, error)
	// Close releases the driver. Calls after Close return ErrClosed.
	Close() error
}

var (
	// ErrNoDevice means the index names no device.
	ErrNoDevice = errors.New("gpu: no such device")
	// ErrClosed means the backend was closed.
	ErrClosed = errors.New("gpu: closed")
	// ErrUnavailable means the NVML backend cannot run here: no driver
	// library, no kernel module, or a binary built without cgo.
	ErrUnavailable = errors.New("gpu: NVML unavailable")
)

// Driver names accepted by Open.
const (
	DriverAuto = "auto"
	DriverNVML = "nvml"
	DriverFake = "fake"
	DriverNone = "none"
)

// Open returns the backend named by driver:
//   - "auto" (or ""): NVML if it initialises, otherwise None whose Reason
//     says why — a host without a driver simply has no GPUs;
//   - "nvml": NVML, or an error wrapping ErrUnavailable;
//   - "fake": a Fake built from fake (tests, demos);
//   - "none": no GPUs.
func Open(driver string, fake []FakeDevice) (GPUs, error) {
	switch strings.ToLower(driver) {
	case "", DriverAuto:
		g, err := openNVML()
		if err != nil {
			return None{Reason: err.Error()}, nil
		}
		return g, nil
	case DriverNVML:
		return openNVML()
	case DriverFake:
		return NewFake(fake)
	case DriverNone:
		return None{Reason: "disabled by configuration"}, nil
	default:
		return nil, fmt.Errorf("gpu: unknown driver %q (want auto, nvml, fake or none)", driver)
	}
}

// None is the backend of a host without usable GPUs.
type None struct {
	// Reason says why there are no GPUs (for `rbee-hive detect` and logs).
	Reason string
}

// Backend implements GPUs.
func (None) Backend() string { return DriverNone }

// Devices implements GPUs: always empty.
func (None) Devices(context.Context) ([]Device, error) { return nil, nil }

// Processes implements GPUs: there is no device to ask.
func (None) Processes(_ context.Context, index int) ([]Process, error) {
	return nil, fmt.Errorf("gpu %d: %w", index, ErrNoDevice)
}

// Close implements GPUs.
func (None) Close() error { return nil }

// Summary is what `rbee-hive detect` prints.
type Summary struct {
	Backend string `json:"backend"`
	// Reason is set when there are no GPUs and the backend knows why.
	Reason        string   `json:"reason,omitempty"`
	DriverVersion string   `json:"driver_version,omitempty"`
	Devices       []Device `json:"devices"`
	// MemoryTotal/Free sum over Devices, in bytes.
	MemoryTotal uint64 `json:"memory_total_bytes"`
	MemoryFree  uint64 `json:"memory_free_bytes"`
}

// Detect summarises g.
func Detect(ctx context.Context, g GPUs) (Summary, error) {
	s := Summary{Backend: g.Backend(), Devices: []Device{}}
	if n, ok := g.(None); ok {
		s.Reason = n.Reason
	}
	if v, ok := g.(interface{ DriverVersion() string }); ok {
		s.DriverVersion = v.DriverVersion()
	}
	devs, err := g.Devices(ctx)
	if err != nil {
		return s, fmt.Errorf("gpu: detect: %w", err)
	}
	if devs != nil {
		s.Devices = devs
	}
	for _, d := range devs {
		s.MemoryTotal += d.MemoryTotal
		s.MemoryFree += d.MemoryFree
	}
	return s, nil
}

// String renders s for a terminal.
func (s Summary) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "backend: %s", s.Backend)
	if s.DriverVersion != "" {
		fmt.Fprintf(&b, " (driver %s)", s.DriverVersion)
	}
	b.WriteByte('\n')
	if len(s.Devices) == 0 {
		b.WriteString("no GPUs")
		if s.Reason != "" {
			fmt.Fprintf(&b, ": %s", s.Reason)
		}
		b.WriteByte('\n')
		return b.String()
	}
	for _, d := range s.Devices {
		fmt.Fprintf(&b, "gpu %d: %s %s  total %s  free %s  used %s", d.Index, d.Name, d.UUID,
			FormatBytes(d.MemoryTotal), FormatBytes(d.MemoryFree), FormatBytes(d.MemoryUsed))
		if d.MIG {
			fmt.Fprintf(&b, "  (MIG of %s)", d.ParentUUID)
		}
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "total: %d GPU(s), %s, %s free\n", len(s.Devices), FormatBytes(s.MemoryTotal), FormatBytes(s.MemoryFree))
	return b.String()
}

// FormatBytes renders n in binary units (e.g. "79.65 GiB").
func FormatBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.2f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// UsedBy sums the device memory of procs whose pid is in pids (a worker's
// pid and its descendants, or its cgroup's pids: engines that fork hold VRAM
// in a child).
func UsedBy(procs []Process, pids []int) uint64 {
	if len(pids) == 0 {
		return 0
	}
	set := make(map[int]struct{}, len(pids))
	for _, p := range pids {
		set[p] = struct{}{}
	}
	var sum uint64
	for _, p := range procs {
		if _, ok := set[p.PID]; ok {
			sum += p.UsedMemory
		}
	}
	return sum
}

func sortProcs(ps []Process) {
	sort.Slice(ps, func(i, j int) bool { return ps[i].PID < ps[j].PID })
}
