package procfs

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// StatfsTimeout bounds one statfs(2) call: a hung NFS mount must not hang an
// admission or a scrape (cadvisor uses the same guard).
const StatfsTimeout = 2 * time.Second

// DiskSpace describes the filesystem holding a path, in bytes.
type DiskSpace struct {
	// Path is the path asked about; StatPath the existing ancestor actually
	// statted (a download target directory may not exist yet).
	Path     string `json:"path"`
	StatPath string `json:"stat_path"`
	// TotalBytes is the filesystem size (f_blocks).
	TotalBytes uint64 `json:"total_bytes"`
	// AvailableBytes is what an unprivileged user may still write
	// (f_bavail); root-reserved blocks are excluded, as df(1) does.
	AvailableBytes uint64 `json:"available_bytes"`
	// FreeBytes includes root-reserved blocks (f_bfree).
	FreeBytes uint64 `json:"free_bytes"`
	// UsedBytes is Total − Free, as df(1) reports it.
	UsedBytes  uint64 `json:"used_bytes"`
	Inodes     uint64 `json:"inodes"`
	InodesFree uint64 `json:"inodes_free"`
}

// DiskUsage statfs()s the filesystem that holds path, walking up to the first
// existing ancestor, with StatfsTimeout as the bound.
func DiskUsage(path string) (DiskSpace, error) {
	ctx, cancel := context.WithTimeout(context.Background(), StatfsTimeout)
	defer cancel()
	return DiskUsageContext(ctx, path)
}

// DiskUsageContext is DiskUsage bounded by ctx. On timeout the statfs call is
// abandoned in its goroutine (a syscall cannot be cancelled); it ends when the
// filesystem answers.
func DiskUsageContext(ctx context.Context, path string) (DiskSpace, error) {
	type result struct {
		d   DiskSpace
		err error
	}
	ch := make(chan result, 1) // buffered: an abandoned goroutine must not block
	go func() {
		d, err := diskUsage(path)
		ch <- result{d, err}
	}()
	select {
	case r := <-ch:
		return r.d, r.err
	case <-ctx.Done():
		return DiskSpace{}, fmt.Errorf("procfs: statfs %s: %w", path, ctx.Err())
	}
}

// DiskReader is DiskUsageContext with at most one statfs in flight per
// path: a caller that finds one running waits for its answer (bounded by its
// own ctx) instead of starting another. DiskUsageContext alone leaves one
// more goroutine, and one more OS thread, blocked in statfs per scrape and
// per admission while a mount hangs, until the process hits Go's thread
// limit. The zero value is ready to use; safe for concurrent use.
type DiskReader struct {
	mu       sync.Mutex
	inflight map[string]*statfsCall
	statfs   func(path string) (DiskSpace, error) // nil: diskUsage (tests replace it)
}

type statfsCall struct {
	done chan struct{}
	d    DiskSpace
	err  error
}

// Usage statfs()s the filesystem holding path like DiskUsageContext.
func (r *DiskReader) Usage(ctx context.Context, path string) (DiskSpace, error) {
	r.mu.Lock()
	c, ok := r.inflight[path]
	if !ok {
		if r.inflight == nil {
			r.inflight = make(map[string]*statfsCall)
		}
		c = &statfsCall{done: make(chan struct{})}
		r.inflight[path] = c
		statfs := r.statfs
		if statfs == nil {
			statfs = diskUsage
		}
		go func() {
			c.d, c.err = statfs(path)
			r.mu.Lock()
			delete(r.inflight, path)
			r.mu.Unlock()
			close(c.done)
		}()
	}
	r.mu.Unlock()
	select {
	case <-c.done:
		return c.d, c.err
	case <-ctx.Done():
		return DiskSpace{}, fmt.Errorf("procfs: statfs %s: %w", path, ctx.Err())
	}
}

func diskUsage(path string) (DiskSpace, error) {
	if path == "" {
		return DiskSpace{}, errors.New("procfs: statfs: empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return DiskSpace{}, fmt.Errorf("procfs: statfs %s: %w", path, err)
	}
	p := abs
	var st unix.Statfs_t
	for {
		err = unix.Statfs(p, &st)
		if err == nil {
			break
		}
		parent := filepath.Dir(p)
		if !errors.Is(err, unix.ENOENT) || parent == p {
			return DiskSpace{}, fmt.Errorf("procfs: statfs %s: %w", p, err)
		}
		p = parent
	}
	// f_frsize is the unit of the block counts; f_bsize is only the
	// preferred I/O size. They are equal on common Linux filesystems.
	unit := uint64(st.Frsize) //nolint:gosec // non-negative by the kernel ABI
	if unit == 0 {
		unit = uint64(st.Bsize) //nolint:gosec
	}
	d := DiskSpace{
		Path:           path,
		StatPath:       p,
		TotalBytes:     st.Blocks * unit,
		AvailableBytes: st.Bavail * unit,
		FreeBytes:      st.Bfree * unit,
		Inodes:         st.Files,
		InodesFree:     st.Ffree,
	}
	if st.Blocks >= st.Bfree {
		d.UsedBytes = (st.Blocks - st.Bfree) * unit
	}
	return d, nil
}
