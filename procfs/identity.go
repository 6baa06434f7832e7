package procfs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Identity is what names one process across a hive restart: a pid alone is
// recycled by the kernel, a pid with its start time is not (two processes
// with the same pid cannot start in the same clock tick).
type Identity struct {
	PID int
	// StartTicks is the start time in clock ticks since boot, field 22 of
	// /proc/<pid>/stat.
	StartTicks uint64
	// State is field 3 ('R', 'S', 'D', 'Z', ...).
	State byte
}

// ErrNoProcess means the pid names no process (it exited and was reaped).
var ErrNoProcess = errors.New("procfs: no such process")

// Identity reads pid's start time and state from /proc/<pid>/stat.
func (r *Reader) Identity(pid int) (Identity, error) {
	if pid <= 0 {
		return Identity{}, fmt.Errorf("procfs: pid %d: %w", pid, ErrNoProcess)
	}
	b, err := os.ReadFile(filepath.Join(r.root, strconv.Itoa(pid), "stat"))
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
		return Identity{}, fmt.Errorf("procfs: pid %d: %w", pid, ErrNoProcess)
	}
	if err != nil {
		return Identity{}, fmt.Errorf("procfs: pid %d stat: %w", pid, err)
	}
	id, err := parseStat(b)
	if err != nil {
		return Identity{}, fmt.Errorf("procfs: pid %d stat: %w", pid, err)
	}
	id.PID = pid
	return id, nil
}

// StartTime returns pid's start time in clock ticks since boot.
func (r *Reader) StartTime(pid int) (uint64, error) {
	id, err := r.Identity(pid)
	return id.StartTicks, err
}

// SameProcess reports whether pid is still the live process that had
// startTicks: false when the pid is gone, was reused by another process, or
// is a zombie (it has exited; only its parent's wait is pending).
func (r *Reader) SameProcess(pid int, startTicks uint64) (bool, error) {
	id, err := r.Identity(pid)
	if errors.Is(err, ErrNoProcess) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return id.StartTicks == startTicks && id.State != 'Z' && id.State != 'X', nil
}

// parseStat reads fields 3 and 22. The command name (field 2) is in
// parentheses and may itself hold spaces and ')', so fields are counted from
// the last ')'.
func parseStat(b []byte) (Identity, error) {
	end := bytes.LastIndexByte(b, ')')
	if end < 0 {
		return Identity{}, errors.New("no command name")
	}
	fields := bytes.Fields(b[end+1:])
	// fields[0] is field 3 (state); field 22 is fields[19].
	if len(fields) < 20 || len(fields[0]) != 1 {
		return Identity{}, fmt.Errorf("%d fields after the command name", len(fields))
	}
	start, err := strconv.ParseUint(string(fields[19]), 10, 64)
	if err != nil {
		return Identity{}, fmt.Errorf("start time: %w", err)
	}
	return Identity{StartTicks: start, State: fields[0][0]}, nil
}

// LeafHolds reports whether pid is listed in the cgroup directory leaf's
// cgroup.procs (the leaf itself, not its descendants). A leaf that no longer
// exists holds nothing.
func LeafHolds(leaf string, pid int) (bool, error) {
	f, err := os.Open(filepath.Join(leaf, "cgroup.procs"))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("procfs: leaf %s: %w", leaf, err)
	}
	defer f.Close()
	want := strconv.Itoa(pid)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if sc.Text() == want {
			return true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("procfs: leaf %s: %w", leaf, err)
	}
	return false, nil
}
