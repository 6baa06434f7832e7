package supervisor

import (
	"context"
	"log/slog"
	"net/http"
	"net/url"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/internal/workeruser"
)

// Deps are the supervisor's collaborators. Cgroups is required; every
// interface left nil is simply not used.
type Deps struct {
	Logger   *slog.Logger
	Cgroups  cgroup.Manager
	Registry *prometheus.Registry // nil: metrics are not registered
	// SelfDir replaces {self_dir} in backend commands (where rbee-simworker lives).
	SelfDir string
	// HiveURL is given to workers as RBEE_HIVE_URL for the HTTP fallback.
	HiveURL string

	Admitter Admitter
	Models   ModelStore
	GPUs     GPUs
	Proxy    Proxy
	LineSink LineSink
	// NotifyDrops reports datagrams the notify socket dropped before they
	// reached the supervisor, by reason (oversize, no_credentials,
	// malformed); they are exported in rbee_hive_heartbeats_rejected_total.
	NotifyDrops func() map[string]uint64
	// HostFiles are the account files workers.uid_range is checked against
	// at start; nil: the system's (workeruser.DefaultHostFiles).
	HostFiles *workeruser.HostFiles
	// Ports checks who holds a worker's listening port; nil: procfs on /proc.
	Ports PortChecker
}

// PortChecker tells whether a worker's port is held by the worker
// (procfs.Reader). Both return nil, an error wrapping procfs.ErrNoListener,
// or one wrapping procfs.ErrSquatter.
type PortChecker interface {
	PortHeldBy(port int, uid uint32) error
	PortOwner(port int, pids []int) (int, error)
}

// Admitter reserves host resources for a worker before it is spawned. A
// rejection is returned as is (an *api.Error 507 from the admission package).
type Admitter interface {
	Admit(ctx context.Context, req AdmitRequest) (Claim, error)
}

// AdmitRequest describes the worker asking for resources.
type AdmitRequest struct {
	WorkerID    string
	Backend     string
	Device      int
	GPUUUID     string // empty for non-cuda backends
	CUDA        bool
	MemoryBytes int64  // the worker's memory limit
	VRAMBytes   uint64 // 0: the admitter estimates from the model
	ModelRef    string
	ModelPath   string // empty while the model still has to be downloaded
	ContextSize int
	Parallel    int // the backend's parallel slots, for the estimate
}

// Claim is an admitted reservation. Loaded is called once the worker is
// ready (its memory is now visible in the host's figures); Release when the
// worker is gone for good. Both may be called more than once.
type Claim interface {
	// Loaded receives the worker's main pid so that GPU memory can be
	// matched to it.
	Loaded(pids ...int)
	Release()
	// VRAMBytes is the VRAM the worker was admitted for: the request's
	// vram_bytes or the admitter's estimate from the model, without the
	// margin; 0 when unknown. The monitor's VRAM limit is this × factor.
	VRAMBytes() uint64
}

// ModelStore resolves model references to local paths (model.Store).
type ModelStore interface {
	// Acquire marks ref in use until release is called: a model in use is
	// neither evicted nor deletable. Called before Ensure.
	Acquire(ref string) (release func())
	// Ensure returns the path of a model already on disk (wait nil), or
	// starts or joins its download and returns a channel that delivers the
	// outcome once. Refusals known at once (a bad reference, 507
	// INSUFFICIENT_DISK) are returned as the error, so a spawn fails right
	// away instead of after a download that cannot fit.
	Ensure(ctx context.Context, ref string) (path string, wait <-chan ModelResult, err error)
}

// ModelResult is the outcome of a model download.
type ModelResult struct {
	Path string
	Err  error
}

// GPUDevice is one GPU as the spawn API sees it.
type GPUDevice struct {
	Index int
	UUID  string
}

// GPUProcess is one process's memory on a GPU, as the driver reports it.
type GPUProcess struct {
	PID       int // host pid
	UsedBytes uint64
}

// GPUs lists the host's GPUs and their processes (adapts gpu.GPUs.Devices
// and gpu.GPUs.Processes).
type GPUs interface {
	GPUDevices(ctx context.Context) ([]GPUDevice, error)
	// GPUProcesses lists the processes using GPU index and their memory.
	GPUProcesses(ctx context.Context, index int) ([]GPUProcess, error)
}

// ProxyTarget is the worker an inference request goes to.
type ProxyTarget struct {
	WorkerID string
	URL      *url.URL
	Backend  string
	Model    string
	Served   string // the worker's served model, "" if none: the metrics' model label then
	Token    string // the worker's own token, for the outbound Authorization header
	API      string // the backend's api: "rbee" or "openai"
	Route    string // the engine path, e.g. /v1/chat/completions (engine.go)
	// OnStart and OnEnd must be called exactly once each; they keep the
	// worker busy while requests are in flight.
	OnStart func()
	OnEnd   func()
}

// Proxy streams an inference request to a worker (cmd/rbee-hive adapts
// proxy.Proxy.Serve).
type Proxy interface {
	Forward(w http.ResponseWriter, r *http.Request, t ProxyTarget)
}

// LineSink receives every line of worker output (the journald sink). It must
// not block.
type LineSink interface {
	WriteLine(workerID, stream string, line []byte)
}
