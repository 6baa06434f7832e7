package cgroup

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// statReader reads the five numbers Stats reports through file descriptors
// it opens once per leaf and keeps: the supervisor's monitor calls Stats for
// every worker every sample_interval, and an os.ReadFile per file per pass
// cost an open, an fstat, a netpoller registration (epoll add and delete)
// and a close each time. The fds here come from unix.Open, so the runtime
// never sees them, and each pass is one pread per file into a reused buffer:
// kernfs regenerates a cgroup file's content on every read at offset 0.
//
// Fds are opened on the first Stats (leaves never sampled hold none) and
// closed by the leaf's Delete, when a read finds the leaf gone, or, for a
// Leaf dropped without Delete, by a runtime cleanup. A later Stats reopens,
// so a failed Delete costs nothing but an open.
type statReader struct {
	mode, id string
	paths    [nStat]string // "" where the hierarchy/kernel lacks the file
	cpuKey   string        // "" → cpu file is one number; else the cpu.stat key
	cpuUnit  time.Duration
	oomKeys  []string // flat-keyed oom file: the first key present wins

	mu     sync.Mutex
	fds    [nStat]int // -1: not open
	absent [nStat]bool
	buf    []byte
}

const (
	statCurrent = iota // required: its absence means the leaf is gone
	statOOM            // required (v1 memory.oom_control, v2 memory.events)
	statPeak           // absent on v2 kernels < 5.19
	statPids           // absent without the pids controller
	statCPU            // absent without cpuacct (v1) / cpu.stat
	nStat
)

// errAbsent marks an optional file that does not exist; it reads as 0.
var errAbsent = errors.New("absent")

func newStatReader(mode, id string, paths [nStat]string, cpuKey string, cpuUnit time.Duration, oomKeys ...string) *statReader {
	r := &statReader{mode: mode, id: id, paths: paths, cpuKey: cpuKey, cpuUnit: cpuUnit, oomKeys: oomKeys}
	for i := range r.fds {
		r.fds[i] = -1
	}
	return r
}

// closeWhenDropped closes r's fds once owner is unreachable (a Leaf dropped
// without Delete). r must not point back to owner.
func closeWhenDropped[T any](owner *T, r *statReader) {
	runtime.AddCleanup(owner, func(r *statReader) { r.close() }, r)
}

// close closes every open fd; the next read reopens.
func (r *statReader) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closeLocked()
}

func (r *statReader) closeLocked() {
	for i, fd := range r.fds {
		if fd >= 0 {
			_ = unix.Close(fd)
			r.fds[i] = -1
		}
	}
	r.absent = [nStat]bool{}
}

// open returns the number of open fds (for tests).
func (r *statReader) open() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, fd := range r.fds {
		if fd >= 0 {
			n++
		}
	}
	return n
}

// stats reads every file. A missing optional file reads as 0; a leaf
// removed under us is ErrNotFound (and its fds are closed).
func (r *statReader) stats() (Stats, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var s Stats
	fail := func(slot int, err error) (Stats, error) {
		if isGone(err) || errors.Is(err, errAbsent) {
			r.closeLocked()
			return Stats{}, fmt.Errorf("cgroup %s: leaf %s: %w", r.mode, r.id, ErrNotFound)
		}
		return Stats{}, fmt.Errorf("cgroup %s: stats of leaf %s: read %s: %w", r.mode, r.id, r.paths[slot], err)
	}
	b, err := r.read(statCurrent)
	if err != nil {
		return fail(statCurrent, err)
	}
	if s.MemoryCurrent, err = parseUint(b); err != nil {
		return fail(statCurrent, err)
	}
	// Not the library's MemoryEvents (v2): it reports a missing
	// oom_group_kill as 0, which cannot be told from "no group kill".
	if b, err = r.read(statOOM); err != nil {
		return fail(statOOM, err)
	}
	for _, k := range r.oomKeys {
		if v, ok := lookupKV(b, k); ok {
			s.OOMKills = v
			break
		}
	}
	if s.MemoryPeak, err = r.optional(statPeak, ""); err != nil {
		return fail(statPeak, err)
	}
	if s.PidsCurrent, err = r.optional(statPids, ""); err != nil {
		return fail(statPids, err)
	}
	cpu, err := r.optional(statCPU, r.cpuKey)
	if err != nil && !isGone(err) {
		return fail(statCPU, err)
	}
	s.CPUUsage = time.Duration(cpu) * r.cpuUnit
	return s, nil
}

// optional reads a number (key == "") or a key of a flat-keyed file that
// may not exist: absent reads as 0.
func (r *statReader) optional(slot int, key string) (uint64, error) {
	b, err := r.read(slot)
	if errors.Is(err, errAbsent) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	if key == "" {
		return parseUint(b)
	}
	v, _ := lookupKV(b, key)
	return v, nil
}

// read returns the whole content of one file, opening it on first use. The
// slice is valid until the next read.
func (r *statReader) read(slot int) ([]byte, error) {
	if r.paths[slot] == "" || r.absent[slot] {
		return nil, errAbsent
	}
	if r.fds[slot] < 0 {
		fd, err := unix.Open(r.paths[slot], unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			if err == unix.ENOENT && slot != statCurrent && r.fds[statCurrent] >= 0 {
				// The leaf exists (its required file is open): this file
				// never will. A leaf that vanished fails its next read.
				r.absent[slot] = true
				return nil, errAbsent
			}
			return nil, &fsError{op: "open", path: r.paths[slot], err: err}
		}
		r.fds[slot] = fd
	}
	if r.buf == nil {
		r.buf = make([]byte, 1024)
	}
	for {
		n, err := unix.Pread(r.fds[slot], r.buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n < len(r.buf) {
			return r.buf[:n], nil
		}
		r.buf = make([]byte, 2*len(r.buf)) // content may be longer: read again
	}
}

// fsError is an open error that keeps the errno for isGone.
type fsError struct {
	op, path string
	err      error
}

func (e *fsError) Error() string { return e.op + " " + e.path + ": " + e.err.Error() }
func (e *fsError) Unwrap() error { return e.err }

// parseUint parses one decimal number with optional surrounding whitespace;
// "max" reads as 0 (as readUint does). No allocation.
func parseUint(b []byte) (uint64, error) {
	for len(b) > 0 && isSpace(b[len(b)-1]) {
		b = b[:len(b)-1]
	}
	for len(b) > 0 && isSpace(b[0]) {
		b = b[1:]
	}
	if string(b) == "max" {
		return 0, nil
	}
	if len(b) == 0 {
		return 0, errSyntax
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, errSyntax
		}
		d := uint64(c - '0')
		if v > (1<<64-1-d)/10 {
			return 0, errSyntax
		}
		v = v*10 + d
	}
	return v, nil
}

var errSyntax = fmt.Errorf("not a number: %w", syscall.EINVAL)

func isSpace(c byte) bool { return c == ' ' || c == '\n' || c == '\t' }

// lookupKV finds "key value" in a flat-keyed file (one pair per line) and
// parses value; a non-numeric value counts as absent (as readKV does).
func lookupKV(b []byte, key string) (uint64, bool) {
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		for len(line) > 0 && isSpace(line[0]) {
			line = line[1:]
		}
		sp := bytes.IndexByte(line, ' ')
		if sp < 0 || string(line[:sp]) != key {
			continue
		}
		v, err := parseUint(line[sp+1:])
		return v, err == nil
	}
	return 0, false
}
