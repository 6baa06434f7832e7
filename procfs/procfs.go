// Package procfs reads host and process resource figures (memory, per-process
// RSS and CPU time, filesystem space) for admission control and metrics. It
// wraps github.com/prometheus/procfs for /proc and statfs(2) for filesystems.
package procfs

import (
	"errors"
	"fmt"
	"os"

	"github.com/prometheus/procfs"
)

// DefaultRoot is where the kernel's proc filesystem is normally mounted.
const DefaultRoot = "/proc"

// ErrMissingField means /proc/meminfo lacks a line we need (MemAvailable
// appeared in Linux 3.14; a fixture may omit it).
var ErrMissingField = errors.New("procfs: field missing")

// Reader reads one proc filesystem. It holds no mutable state and is safe for
// concurrent use; tests point it at a fixture directory.
type Reader struct {
	fs   procfs.FS
	root string
}

// New returns a Reader for the proc filesystem mounted at root ("" means
// DefaultRoot). root may be a fixture directory containing e.g. "meminfo".
func New(root string) (*Reader, error) {
	if root == "" {
		root = DefaultRoot
	}
	fs, err := procfs.NewFS(root)
	if err != nil {
		return nil, fmt.Errorf("procfs: open %s: %w", root, err)
	}
	return &Reader{fs: fs, root: root}, nil
}

// Root is the proc mount point this Reader reads.
func (r *Reader) Root() string { return r.root }

// Memory is the host memory picture in bytes.
type Memory struct {
	TotalBytes uint64 `json:"total_bytes"`
	// AvailableBytes is the kernel's estimate of memory usable by new work
	// without swapping (MemAvailable): free plus reclaimable cache.
	AvailableBytes uint64 `json:"available_bytes"`
	FreeBytes      uint64 `json:"free_bytes"`
	// UsedBytes is Total − Available, i.e. what cannot be handed out now
	// (the "used" notion of free(1)'s "available" column).
	UsedBytes uint64 `json:"used_bytes"`
}

// Memory reads /proc/meminfo.
func (r *Reader) Memory() (Memory, error) {
	mi, err := r.fs.Meminfo()
	if err != nil {
		return Memory{}, fmt.Errorf("procfs: read meminfo: %w", err)
	}
	if mi.MemTotalBytes == nil {
		return Memory{}, fmt.Errorf("procfs: meminfo MemTotal: %w", ErrMissingField)
	}
	if mi.MemAvailableBytes == nil {
		return Memory{}, fmt.Errorf("procfs: meminfo MemAvailable: %w", ErrMissingField)
	}
	m := Memory{TotalBytes: *mi.MemTotalBytes, AvailableBytes: *mi.MemAvailableBytes}
	if mi.MemFreeBytes != nil {
		m.FreeBytes = *mi.MemFreeBytes
	}
	if m.AvailableBytes < m.TotalBytes {
		m.UsedBytes = m.TotalBytes - m.AvailableBytes
	}
	return m, nil
}

// MemAvailable returns MemAvailable in bytes.
func (r *Reader) MemAvailable() (uint64, error) {
	m, err := r.Memory()
	if err != nil {
		return 0, err
	}
	return m.AvailableBytes, nil
}

// ProcessStats are the per-process figures from /proc/<pid>/stat. They cover
// one pid only: a worker that forks is better measured by its cgroup.
type ProcessStats struct {
	PID      int    `json:"pid"`
	RSSBytes uint64 `json:"rss_bytes"`
	// CPUSeconds is user+system time (USER_HZ is 100 on every Linux ABI).
	CPUSeconds float64 `json:"cpu_seconds"`
	// StartTicks is the start time in clock ticks since boot; with the pid it
	// fingerprints a process against pid reuse.
	StartTicks uint64 `json:"start_ticks"`
	Threads    int    `json:"threads"`
}

// Process reads /proc/<pid>/stat. A vanished process yields an error that
// wraps os.ErrNotExist.
func (r *Reader) Process(pid int) (ProcessStats, error) {
	p, err := r.fs.Proc(pid)
	if err != nil {
		return ProcessStats{}, fmt.Errorf("procfs: pid %d: %w", pid, err)
	}
	st, err := p.Stat()
	if err != nil {
		return ProcessStats{}, fmt.Errorf("procfs: pid %d stat: %w", pid, err)
	}
	rss := st.ResidentMemory()
	if rss < 0 {
		rss = 0
	}
	return ProcessStats{
		PID:        pid,
		RSSBytes:   uint64(rss),
		CPUSeconds: st.CPUTime(),
		StartTicks: st.Starttime,
		Threads:    st.NumThreads,
	}, nil
}

// IsNotExist reports whether err means the process (or file) is gone.
func IsNotExist(err error) bool { return errors.Is(err, os.ErrNotExist) }
