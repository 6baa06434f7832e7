package cgroup

import (
	"fmt"
	"path/filepath"
	"time"
)

// statFiles are the few interface files one Stats read takes. The library's
// Stat reads every file of every controller (memory.stat, PSI, io, memsw,
// kmem: about 20 files on v1) although Stats reports five numbers, and the
// supervisor's monitor calls Stats for every worker every sample_interval.
type statFiles struct {
	current string // bytes in use; required: its absence means the leaf is gone
	peak    string // high-water mark; absent on v2 kernels < 5.19
	pids    string // pids.current; absent without the pids controller
	cpu     func() (time.Duration, error)
	oom     func() (uint64, error)
}

// readStats reads f. A missing optional file reads as 0, as the library's
// readers do; a leaf removed under us is ErrNotFound.
func readStats(mode, id string, f statFiles) (Stats, error) {
	var s Stats
	fail := func(err error) (Stats, error) {
		if isGone(err) {
			return Stats{}, fmt.Errorf("cgroup %s: leaf %s: %w", mode, id, ErrNotFound)
		}
		return Stats{}, fmt.Errorf("cgroup %s: stats of leaf %s: %w", mode, id, err)
	}
	var err error
	if s.MemoryCurrent, _, err = readUint(f.current); err != nil {
		return fail(err)
	}
	// Not the library's MemoryEvents (v2): it reports a missing
	// oom_group_kill as 0, which cannot be told from "no group kill".
	if s.OOMKills, err = f.oom(); err != nil {
		return fail(err)
	}
	if s.MemoryPeak, err = optionalUint(f.peak); err != nil {
		return fail(err)
	}
	if s.PidsCurrent, err = optionalUint(f.pids); err != nil {
		return fail(err)
	}
	if s.CPUUsage, err = f.cpu(); err != nil && !isGone(err) {
		return fail(err)
	}
	return s, nil
}

// optionalUint reads a single-number file that may not exist ("" or ENOENT
// read as 0).
func optionalUint(path string) (uint64, error) {
	if path == "" {
		return 0, nil
	}
	v, _, err := readUint(path)
	if isGone(err) {
		return 0, nil
	}
	return v, err
}

func (l *v2Leaf) statFiles() statFiles {
	return statFiles{
		current: filepath.Join(l.dir, "memory.current"),
		peak:    filepath.Join(l.dir, "memory.peak"),
		pids:    filepath.Join(l.dir, "pids.current"),
		cpu: func() (time.Duration, error) {
			kv, err := readKV(filepath.Join(l.dir, "cpu.stat"))
			return time.Duration(kv["usage_usec"]) * time.Microsecond, err
		},
		oom: func() (uint64, error) { return v2OOMKills(l.dir) },
	}
}
