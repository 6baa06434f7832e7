// Package cgroup gives every worker its own cgroup leaf with hard limits, starts
// processes inside it, reports OOM kills and kills whole process trees. One
// interface covers cgroup v2 (unified) and v1 (hybrid/legacy hosts); callers
// never ask which.
//
// Construct with New. Start places the child without a gate where it can
// (v2: CLONE_INTO_CGROUP; v1: a fork from a spawner thread sitting in the
// leaf; isolated: from a restricted spawner thread). Otherwise (ForceGate,
// old kernels, a thread that cannot be restricted) it starts a spawn gate
// that waits until its pid is in the leaf and then execs the worker: the
// rbee-gate binary when installed beside the executable, else the binary
// itself re-executed, so every binary that starts workers through a Leaf
// must call MaybeRunGate first thing in main() (tests: in TestMain).
package cgroup

import (
	"context"
	"errors"
	"os/exec"
	"time"
)

// Limits are the per-leaf limits. MemoryMax is required (> 0).
type Limits struct {
	MemoryMax int64  // bytes; swap is set to 0 where swap accounting exists
	PidsMax   int64  // 0 means no pids limit
	CPUWeight uint64 // 0 means the kernel default
}

// Stats are the numbers a leaf reports (the API's resources and /metrics).
type Stats struct {
	MemoryCurrent uint64
	MemoryPeak    uint64
	// OOMKills counts OOM kills in the leaf. v2: group kills
	// (memory.events oom_group_kill; one per OOM, as every leaf has
	// memory.oom.group=1), oom_kill on kernels < 5.17. v1: processes killed
	// (memory.oom_control oom_kill). Reliable once the worker's Wait returns.
	OOMKills    uint64
	CPUUsage    time.Duration
	PidsCurrent uint64
}

// OOMEvent reports one or more kernel OOM kills in a leaf.
type OOMEvent struct {
	Leaf  string
	Kills uint64 // the leaf's OOM kill count after this event
	Time  time.Time
}

// ErrNotFound is returned when a leaf or a pid's leaf does not exist.
var ErrNotFound = errors.New("cgroup: not found")

// Manager owns the hive's cgroup tree: <root>/supervisor and <root>/workers/w-<id>.
type Manager interface {
	// Mode is "v2" or "v1".
	Mode() string
	// Root is the tree's root path (v2) or its path relative to each v1 hierarchy.
	Root() string
	// Create makes workers/<id> with the limits; it fails if it already exists.
	Create(id string, l Limits) (Leaf, error)
	// Load opens an existing leaf (e.g. one a previous hive left behind).
	Load(id string) (Leaf, error)
	// List returns the ids of the leaves under workers/.
	List() ([]string, error)
	// LeafOf returns the id of the worker leaf that pid lives in (children of
	// the worker included), or ErrNotFound.
	LeafOf(pid int) (string, error)
}

// Leaf is one worker's cgroup.
type Leaf interface {
	ID() string
	// Start starts cmd so that its first instruction already runs in the
	// leaf; WithIsolation also drops it to an unprivileged identity first.
	Start(cmd *exec.Cmd, opts ...StartOption) error
	// OOMEvents reports each OOM kill until ctx ends or the leaf is deleted.
	OOMEvents(ctx context.Context) (<-chan OOMEvent, error)
	Stats() (Stats, error)
	Pids() ([]int, error)
	// Kill kills every process in the leaf and waits until it is empty.
	Kill(ctx context.Context) error
	// Delete removes the (empty) leaf.
	Delete() error
}
