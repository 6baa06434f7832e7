package admission

import (
	"context"
	"fmt"

	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/procfs"
)

// Resources is the host picture for GET /v1/resources.
type Resources struct {
	Memory     MemoryResources    `json:"memory"`
	Disks      []procfs.DiskSpace `json:"disks"`
	GPUBackend string             `json:"gpu_backend"`
	GPUs       []GPUResources     `json:"gpus"`
	Claims     []ClaimInfo        `json:"claims"`
	Rejections map[string]uint64  `json:"rejections"`
	// Errors lists parts that could not be read; the rest is still valid.
	Errors []string `json:"errors,omitempty"`
}

// MemoryResources is host RAM as admission sees it.
type MemoryResources struct {
	procfs.Memory
	ReserveBytes uint64 `json:"reserve_bytes"`
	ClaimedBytes uint64 `json:"claimed_bytes"`
	// Admission is "limits" or "usage" (Config.MemoryMode).
	Admission string `json:"admission"`
	// LimitsBytes is the sum of live workers' memory limits.
	LimitsBytes uint64 `json:"limits_bytes"`
	// AdmissibleBytes is the largest memory limit Admit would accept now.
	AdmissibleBytes uint64 `json:"admissible_bytes"`
}

// GPUResources is one GPU as admission sees it.
type GPUResources struct {
	gpu.Device
	// ClaimedBytes is claimed VRAM not yet visible in the driver's figures.
	ClaimedBytes uint64 `json:"claimed_bytes"`
	// AdmissibleBytes is the largest VRAM need (estimate + margin) Admit
	// would accept now.
	AdmissibleBytes uint64 `json:"admissible_bytes"`
}

// Resources snapshots host RAM, the DiskPaths filesystems, each GPU, the
// live claims and the rejection counts. A part that fails to read is
// reported in Errors rather than failing the whole snapshot.
func (l *Ledger) Resources(ctx context.Context) Resources {
	r := Resources{Disks: []procfs.DiskSpace{}, GPUs: []GPUResources{}, GPUBackend: gpu.DriverNone}
	if m, err := l.cfg.Memory.Memory(); err != nil {
		r.Errors = append(r.Errors, fmt.Sprintf("memory: %v", err))
	} else {
		l.mu.Lock()
		claimed := l.memoryClaimedLocked()
		limits := l.memoryLimitsLocked()
		l.mu.Unlock()
		r.Memory = MemoryResources{
			Memory: m, ReserveBytes: l.cfg.MemoryReserveBytes, ClaimedBytes: claimed,
			Admission: l.cfg.MemoryMode.String(), LimitsBytes: limits,
			AdmissibleBytes: satSub(satSub(m.AvailableBytes, l.cfg.MemoryReserveBytes), claimed),
		}
		if l.cfg.MemoryMode == MemoryLimits {
			r.Memory.AdmissibleBytes = min(r.Memory.AdmissibleBytes, l.admissibleByLimits(m, limits))
		}
	}
	for _, p := range l.cfg.DiskPaths {
		d, err := l.disk.Usage(ctx, p)
		if err != nil {
			r.Errors = append(r.Errors, fmt.Sprintf("disk %s: %v", p, err))
			continue
		}
		r.Disks = append(r.Disks, d)
	}
	if l.cfg.GPUs != nil {
		r.GPUBackend = l.cfg.GPUs.Backend()
		views, err := l.gpuViews(ctx)
		if err != nil {
			r.Errors = append(r.Errors, fmt.Sprintf("gpu: %v", err))
		}
		for _, v := range views {
			r.GPUs = append(r.GPUs, GPUResources{Device: v.dev, ClaimedBytes: v.unseen, AdmissibleBytes: v.admissible})
		}
	}
	r.Claims = l.Claims()
	r.Rejections = l.Rejections()
	return r
}

func (l *Ledger) gpuViews(ctx context.Context) ([]vramView, error) {
	devs, err := l.cfg.GPUs.Devices(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]vramView, 0, len(devs))
	for _, d := range devs {
		v, err := l.foldClaims(ctx, d)
		if err != nil {
			return out, err
		}
		out = append(out, v)
	}
	return out, nil
}
