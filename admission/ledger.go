package admission

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/procfs"
)

// Resources named in rejections (the metric's resource label).
const (
	ResourceMemory = "memory"
	ResourceVRAM   = "vram"
	ResourceDisk   = "disk"
)

var resources = [...]string{ResourceMemory, ResourceVRAM, ResourceDisk}

// Defaults for Config's zero values.
const (
	DefaultVRAMSettle       = 30 * time.Second
	DefaultVRAMRecoveryWait = 5 * time.Second
	DefaultVRAMPoll         = 250 * time.Millisecond
)

// MemorySource reads host memory; *procfs.Reader implements it.
type MemorySource interface {
	Memory() (procfs.Memory, error)
}

// MemoryMode is how RAM admission counts workers that are running.
type MemoryMode int

const (
	// MemoryUsage counts a ready worker by its use (it shows in
	// MemAvailable); only loading workers hold a claim of their limit.
	MemoryUsage MemoryMode = iota
	// MemoryLimits also holds every live worker's limit until Release:
	// Σ limits + the new one ≤ MemTotal − reserve, like Kubernetes
	// requests against allocatable, so the host is never overcommitted.
	// The usage check still applies: memory held outside the hive is not
	// admissible either.
	MemoryLimits
)

func (m MemoryMode) String() string {
	if m == MemoryLimits {
		return "limits"
	}
	return "usage"
}

// Config configures a Ledger.
type Config struct {
	// Memory is required.
	Memory MemorySource
	// GPUs may be nil (no GPUs).
	GPUs gpu.GPUs
	// MemoryReserveBytes of MemAvailable are never handed to workers.
	MemoryReserveBytes uint64
	// MemoryMode is MemoryUsage (the zero value) or MemoryLimits.
	MemoryMode MemoryMode
	// VRAMMarginBytes is added to every VRAM request: estimates run low
	// (llama.cpp's --fit keeps 1 GiB per device).
	VRAMMarginBytes uint64
	// VRAMReserveBytes per GPU are never handed to workers.
	VRAMReserveBytes uint64
	// VRAMSettle bounds how long a loaded worker's claim waits to show up
	// in NVML's per-process figures before it is dropped (some setups never
	// list processes: MIG without privileges, containers).
	VRAMSettle time.Duration
	// VRAMRecoveryWait is how long an admission that does not fit waits for
	// free VRAM to recover after a worker on that GPU went away: CUDA's
	// free memory lags a kill (Ollama waits up to 5 s, polling 250 ms).
	VRAMRecoveryWait time.Duration
	// VRAMPoll is the polling interval during that wait.
	VRAMPoll time.Duration
	// DiskPaths are the filesystems reported by Resources and the metrics
	// (the model directory).
	DiskPaths []string
	// Now replaces time.Now in tests.
	Now func() time.Time
}

// Ledger admits workers against host RAM and GPU memory and keeps claims for
// workers that are still loading. It is safe for concurrent use.
//
// RAM: requested ≤ MemAvailable − reserve − Σ claims of loading workers. A
// claim ends when the worker is Loaded (its memory now shows in
// MemAvailable) or Released. With MemoryLimits, also requested + Σ limits
// of all live workers ≤ MemTotal − reserve, each limit held until Release.
//
// VRAM on GPU g: requested + margin ≤ min(free − Σ unseen, total − driver-reserved − Σ loading
// claims) − reserve, where unseen is the part of each claim not yet visible
// in NVML (claim − the worker's per-process usage), held until the worker's
// usage is seen or VRAMSettle after Loaded. Subtracting unseen from free
// (rather than only min(free, total − claims)) stays correct when processes
// outside the hive hold memory. Admissions on one GPU are serialised.
type Ledger struct {
	cfg Config

	gpuLocks sync.Map // int → chan struct{} (cap 1): ctx-aware per-GPU lock

	mu          sync.Mutex // guards the fields below and every RAM decision
	claims      map[uint64]*claimState
	nextID      uint64
	lastRelease map[int]time.Time // per GPU: when a VRAM claim was last released

	// disk keeps one statfs per path in flight: scrapes, GET /v1/resources
	// and admissions against a hung mount must not pile up blocked threads.
	disk procfs.DiskReader

	rejections [len(resources)]atomic.Uint64
	scrapeErrs [3]atomic.Uint64 // memory, gpu, disk read failures at scrape
}

type claimState struct {
	workerID string
	memory   uint64 // RAM claim; 0 once loaded
	limit    uint64 // the worker's memory limit, held until Release
	gpu      int    // -1: none
	vram     uint64 // VRAM claim including margin
	created  time.Time
	loadedAt time.Time // zero while loading
	pids     []int
}

// NewLedger returns a Ledger. cfg.Memory is required.
func NewLedger(cfg Config) (*Ledger, error) {
	if cfg.Memory == nil {
		return nil, errors.New("admission: Config.Memory is required")
	}
	if cfg.VRAMSettle <= 0 {
		cfg.VRAMSettle = DefaultVRAMSettle
	}
	if cfg.VRAMRecoveryWait < 0 {
		cfg.VRAMRecoveryWait = 0
	} else if cfg.VRAMRecoveryWait == 0 {
		cfg.VRAMRecoveryWait = DefaultVRAMRecoveryWait
	}
	if cfg.VRAMPoll <= 0 {
		cfg.VRAMPoll = DefaultVRAMPoll
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Ledger{cfg: cfg, claims: map[uint64]*claimState{}, lastRelease: map[int]time.Time{}}, nil
}

// Request asks to admit one worker.
type Request struct {
	WorkerID string
	// MemoryBytes is the worker's memory limit (its cgroup memory.max);
	// 0 skips the RAM check.
	MemoryBytes uint64
	// GPU is the device index (gpu.Device.Index); nil for a CPU worker.
	GPU *int
	// VRAMBytes is the model's VRAM estimate; the ledger adds the margin.
	VRAMBytes uint64
}

// Claim is an admitted worker's hold on resources. Call Loaded when the
// worker is ready and Release when it dies or its spawn fails; both are
// idempotent, safe from any goroutine, and no-ops on a nil *Claim.
type Claim struct {
	l        *Ledger
	id       uint64
	workerID string
}

// WorkerID is the worker this claim is for.
func (c *Claim) WorkerID() string {
	if c == nil {
		return ""
	}
	return c.workerID
}

// Track records the worker's host pids (its main pid, or every pid in its
// cgroup) so its VRAM use can be matched in NVML's process list while it
// loads and after. It may be called repeatedly; pids accumulate.
func (c *Claim) Track(pids ...int) {
	if c == nil {
		return
	}
	c.l.mu.Lock()
	defer c.l.mu.Unlock()
	if s, ok := c.l.claims[c.id]; ok {
		s.pids = append(s.pids, pids...)
	}
}

// Loaded marks the worker ready: its RAM claim ends at once (its memory now
// shows in MemAvailable) and its VRAM claim ends once NVML shows its usage
// (matched by pids, see Track) or VRAMSettle passes.
func (c *Claim) Loaded(pids ...int) {
	if c == nil {
		return
	}
	c.l.mu.Lock()
	defer c.l.mu.Unlock()
	if s, ok := c.l.claims[c.id]; ok && s.loadedAt.IsZero() {
		s.memory = 0
		s.loadedAt = c.l.cfg.Now()
		s.pids = append(s.pids, pids...)
	}
}

// Release ends the claim: the worker died, was stopped, or never started.
func (c *Claim) Release() {
	if c == nil {
		return
	}
	c.l.mu.Lock()
	defer c.l.mu.Unlock()
	s, ok := c.l.claims[c.id]
	if !ok {
		return
	}
	delete(c.l.claims, c.id)
	if s.gpu >= 0 && s.vram > 0 {
		c.l.lastRelease[s.gpu] = c.l.cfg.Now()
	}
}

// Admit reserves req's memory and VRAM, or returns an *api.Error: 507
// INSUFFICIENT_MEMORY / INSUFFICIENT_VRAM, 400 for an unknown GPU, 503 when
// the GPU backend fails. It may wait up to VRAMRecoveryWait (bounded by ctx)
// for free VRAM to recover after a recent release on the same GPU.
func (l *Ledger) Admit(ctx context.Context, req Request) (*Claim, error) {
	gpuIdx := -1
	var vramNeed uint64
	if req.GPU != nil {
		gpuIdx = *req.GPU
		if gpuIdx < 0 || l.cfg.GPUs == nil {
			return nil, api.Errorf(http.StatusBadRequest, api.CodeValidation, "no GPU %d on this host", gpuIdx).
				WithDetails(map[string]any{"gpu": gpuIdx})
		}
		vramNeed = satAdd(req.VRAMBytes, l.cfg.VRAMMarginBytes)
		unlock, err := l.lockGPU(ctx, gpuIdx)
		if err != nil {
			return nil, err
		}
		defer unlock()
		if err := l.admitVRAM(ctx, gpuIdx, req.VRAMBytes, vramNeed); err != nil {
			return nil, err
		}
	}

	l.mu.Lock()
	defer l.mu.Unlock()
	if req.MemoryBytes > 0 {
		if err := l.admitMemoryLocked(req.MemoryBytes); err != nil {
			return nil, err
		}
	}
	l.nextID++
	l.claims[l.nextID] = &claimState{
		workerID: req.WorkerID, memory: req.MemoryBytes, limit: req.MemoryBytes, gpu: gpuIdx, vram: vramNeed, created: l.cfg.Now(),
	}
	return &Claim{l: l, id: l.nextID, workerID: req.WorkerID}, nil
}

func (l *Ledger) lockGPU(ctx context.Context, idx int) (func(), error) {
	v, _ := l.gpuLocks.LoadOrStore(idx, make(chan struct{}, 1))
	ch := v.(chan struct{})
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("admission: waiting for GPU %d: %w", idx, ctx.Err())
	}
}

func (l *Ledger) admitMemoryLocked(requested uint64) error {
	m, err := l.cfg.Memory.Memory()
	if err != nil {
		return fmt.Errorf("admission: %w", err)
	}
	claimed := l.memoryClaimedLocked()
	have := satSub(satSub(m.AvailableBytes, l.cfg.MemoryReserveBytes), claimed)
	limits := l.memoryLimitsLocked()
	byLimits := l.admissibleByLimits(m, limits)
	if requested <= have && (l.cfg.MemoryMode != MemoryLimits || requested <= byLimits) {
		return nil
	}
	l.rejections[0].Add(1)
	details := map[string]any{
		"requested_bytes":  requested,
		"available_bytes":  m.AvailableBytes,
		"reserve_bytes":    l.cfg.MemoryReserveBytes,
		"claimed_bytes":    claimed,
		"admissible_bytes": have,
		"memory_admission": l.cfg.MemoryMode.String(),
	}
	msg := fmt.Sprintf("not enough memory: requested %d bytes, %d admissible (%d available − %d reserve − %d claimed by loading workers)",
		requested, have, m.AvailableBytes, l.cfg.MemoryReserveBytes, claimed)
	if l.cfg.MemoryMode == MemoryLimits {
		details["total_bytes"] = m.TotalBytes
		details["limits_bytes"] = limits
		if requested > byLimits {
			details["admissible_bytes"] = byLimits
			msg = fmt.Sprintf("not enough memory: requested limit %d bytes, %d admissible (%d total − %d reserve − %d limits of live workers; memory_admission = limits)",
				requested, byLimits, m.TotalBytes, l.cfg.MemoryReserveBytes, limits)
		}
	}
	return &api.Error{
		Status:  http.StatusInsufficientStorage,
		Code:    api.CodeInsufficientMemory,
		Message: msg,
		Details: details,
	}
}

// admissibleByLimits is MemTotal − reserve − Σ limits of live workers.
func (l *Ledger) admissibleByLimits(m procfs.Memory, limits uint64) uint64 {
	return satSub(satSub(m.TotalBytes, l.cfg.MemoryReserveBytes), limits)
}

func (l *Ledger) memoryLimitsLocked() uint64 {
	var sum uint64
	for _, s := range l.claims {
		sum = satAdd(sum, s.limit)
	}
	return sum
}

func (l *Ledger) memoryClaimedLocked() uint64 {
	var sum uint64
	for _, s := range l.claims {
		sum = satAdd(sum, s.memory)
	}
	return sum
}

// vramView is one GPU's figures as the ledger sees them.
type vramView struct {
	dev        gpu.Device
	unseen     uint64 // claims not yet visible in NVML
	loading    uint64 // claims of workers not yet loaded
	admissible uint64
}

func (l *Ledger) admitVRAM(ctx context.Context, idx int, estimate, need uint64) error {
	var last *vramView
	for {
		v, err := l.viewGPU(ctx, idx)
		if err != nil {
			if last != nil && ctx.Err() != nil {
				// ctx ended while waiting for recovery: the answer is
				// still "does not fit", not a GPU failure.
				l.rejections[1].Add(1)
				return l.vramError(idx, *last, estimate, need)
			}
			return err
		}
		last = &v
		if need <= v.admissible {
			return nil
		}
		// Free memory lags a kill: if a worker left this GPU recently,
		// poll until its memory is back or the recovery window closes.
		l.mu.Lock()
		last, ok := l.lastRelease[idx]
		l.mu.Unlock()
		now := l.cfg.Now()
		if !ok || now.Sub(last) >= l.cfg.VRAMRecoveryWait {
			l.rejections[1].Add(1)
			return l.vramError(idx, v, estimate, need)
		}
		t := time.NewTimer(min(l.cfg.VRAMPoll, l.cfg.VRAMRecoveryWait-now.Sub(last)))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			l.rejections[1].Add(1)
			return l.vramError(idx, v, estimate, need)
		}
	}
}

func (l *Ledger) vramError(idx int, v vramView, estimate, need uint64) error {
	return &api.Error{
		Status: http.StatusInsufficientStorage,
		Code:   api.CodeInsufficientVRAM,
		Message: fmt.Sprintf("not enough GPU memory on gpu %d (%s): need %d bytes (estimate %d + margin %d), %d admissible",
			idx, v.dev.UUID, need, estimate, l.cfg.VRAMMarginBytes, v.admissible),
		Details: map[string]any{
			"gpu":             idx,
			"gpu_uuid":        v.dev.UUID,
			"requested_bytes": need,
			"estimate_bytes":  estimate,
			"margin_bytes":    l.cfg.VRAMMarginBytes,
			"available_bytes": v.admissible,
			"free_bytes":      v.dev.MemoryFree,
			"total_bytes":     v.dev.MemoryTotal,
			"claimed_bytes":   v.unseen,
			"reserve_bytes":   l.cfg.VRAMReserveBytes,
			"loading_bytes":   v.loading,
			"memory_reserved": v.dev.MemoryReserved,
			"unified_memory":  v.dev.UnifiedMemory,
		},
	}
}

// viewGPU reads device idx and folds in the ledger's claims on it.
func (l *Ledger) viewGPU(ctx context.Context, idx int) (vramView, error) {
	devs, err := l.cfg.GPUs.Devices(ctx)
	if err != nil {
		return vramView{}, gpuUnavailable(err)
	}
	if idx >= len(devs) {
		return vramView{}, api.Errorf(http.StatusBadRequest, api.CodeValidation, "no GPU %d on this host (%d GPUs)", idx, len(devs)).
			WithDetails(map[string]any{"gpu": idx, "gpus": len(devs)})
	}
	return l.foldClaims(ctx, devs[idx])
}

func (l *Ledger) foldClaims(ctx context.Context, d gpu.Device) (vramView, error) {
	v := vramView{dev: d}
	type pending struct {
		vram   uint64
		pids   []int
		loaded bool
	}
	var ps []pending
	needProcs := false
	l.mu.Lock()
	now := l.cfg.Now()
	for _, s := range l.claims {
		if s.gpu != d.Index || s.vram == 0 {
			continue
		}
		if !s.loadedAt.IsZero() && now.Sub(s.loadedAt) >= l.cfg.VRAMSettle {
			continue // settled: NVML free carries it now
		}
		p := pending{vram: s.vram, pids: append([]int(nil), s.pids...), loaded: !s.loadedAt.IsZero()}
		needProcs = needProcs || len(p.pids) > 0
		ps = append(ps, p)
	}
	l.mu.Unlock()

	var procs []gpu.Process
	if needProcs {
		// Without per-process figures every claim stays fully unseen:
		// conservative, and it settles after VRAMSettle.
		procs, _ = l.cfg.GPUs.Processes(ctx, d.Index)
	}
	for _, p := range ps {
		if !p.loaded {
			v.loading = satAdd(v.loading, p.vram)
		}
		v.unseen = satAdd(v.unseen, satSub(p.vram, gpu.UsedBy(procs, p.pids)))
	}
	have := min(satSub(d.MemoryFree, v.unseen), satSub(d.MemoryTotal, satAdd(d.MemoryReserved, v.loading)))
	v.admissible = satSub(have, l.cfg.VRAMReserveBytes)
	return v, nil
}

func gpuUnavailable(err error) error {
	return api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "GPU query failed: %v", err)
}

// CheckDisk is the package CheckDisk that also counts a rejection.
func (l *Ledger) CheckDisk(dir string, needBytes, reserveBytes uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), procfs.StatfsTimeout)
	defer cancel()
	var err error
	if d, derr := l.disk.Usage(ctx, dir); derr != nil {
		err = fmt.Errorf("admission: disk check: %w", derr)
	} else {
		err = checkDisk(dir, needBytes, reserveBytes, d.AvailableBytes)
	}
	var ae *api.Error
	if errors.As(err, &ae) && ae.Code == api.CodeInsufficientDisk {
		l.rejections[2].Add(1)
	}
	return err
}

// Rejections returns the refusals so far per resource.
func (l *Ledger) Rejections() map[string]uint64 {
	out := make(map[string]uint64, len(resources))
	for i, r := range resources {
		out[r] = l.rejections[i].Load()
	}
	return out
}

// ClaimInfo describes one live claim.
type ClaimInfo struct {
	WorkerID    string    `json:"worker_id"`
	State       string    `json:"state"` // loading | loaded
	MemoryBytes uint64    `json:"memory_bytes"`
	GPU         *int      `json:"gpu,omitempty"`
	VRAMBytes   uint64    `json:"vram_bytes,omitempty"`
	Since       time.Time `json:"since"`
}

// Claims lists live claims, oldest first.
func (l *Ledger) Claims() []ClaimInfo {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]ClaimInfo, 0, len(l.claims))
	ids := make([]uint64, 0, len(l.claims))
	for id := range l.claims {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		s := l.claims[id]
		ci := ClaimInfo{WorkerID: s.workerID, State: "loading", MemoryBytes: s.memory, VRAMBytes: s.vram, Since: s.created}
		if !s.loadedAt.IsZero() {
			ci.State, ci.Since = "loaded", s.loadedAt
		}
		if s.gpu >= 0 {
			g := s.gpu
			ci.GPU = &g
		}
		out = append(out, ci)
	}
	return out
}

func satAdd(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return ^uint64(0)
}

func satSub(a, b uint64) uint64 {
	if a > b {
		return a - b
	}
	return 0
}
