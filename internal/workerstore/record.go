// Package workerstore keeps every worker's spec and state in SQLite in the
// hive's state directory, so that a restarted hive can adopt the workers that
// are still alive. Writes leave the caller at once (Put, SetState, Delete
// only enqueue); one goroutine writes the latest state per worker in batches.
// Load reads everything back at start and drops rows it cannot trust.
package workerstore

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Worker is one persisted worker: what a restarted hive needs to adopt its
// process (pid, start time, leaf) and to carry on as before (spec, restart
// history, token hash).
type Worker struct {
	ID      string
	Backend string
	Model   string
	Argv    []string // as started; treated as read-only once handed to the store
	UID     int      // the uid the worker runs as
	Port    int
	URL     string
	// CgroupPath is the worker's leaf as the cgroup manager names it
	// (<Root()>/workers/<id>); it must lie under the store's cgroup root and
	// end in the worker's id, so a tampered row cannot point the hive at
	// another worker's leaf or outside its tree.
	CgroupPath string
	// PID is the main process; 0 while none runs (downloading, restarting).
	PID int
	// PIDStart is the main process's start time in clock ticks since boot
	// (/proc/<pid>/stat field 22). pid + start time name one process: a
	// recycled pid has another start time.
	PIDStart uint64
	// RestartPolicy is the supervisor's policy name ("on-failure", ...).
	RestartPolicy string
	RestartCount  int
	// Failures are the times of recent failed runs, for the breaker window.
	Failures    []time.Time
	MemoryLimit int64  // bytes, 0 = none
	VRAMClaim   int64  // bytes claimed on GPU, 0 = none
	GPU         string // the claimed GPU's UUID, "" = none
	// TokenHash is SHA-256 of the worker's token. The clear token exists
	// only in the hive's memory and in the worker's environment; a restarted
	// hive checks the worker's callbacks by hashing the presented token
	// (TokenMatches), so the worker keeps using the token it was started with.
	TokenHash []byte
	State     string
	// AdoptedAt is when a restarted hive took the worker over; zero if the
	// running hive started it.
	AdoptedAt time.Time
	CreatedAt time.Time
	// StdoutOffset and StderrOffset are how far the hive has shipped the
	// worker's output files (docs/adoption.md); a restarted hive resumes there.
	StdoutOffset, StderrOffset int64
}

// HashToken returns the digest stored in Worker.TokenHash. Tokens are random
// 256-bit values, so an unsalted hash cannot be reversed by guessing.
func HashToken(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

// TokenMatches reports whether token is the worker's token, in constant time.
func (w *Worker) TokenMatches(token string) bool {
	if len(w.TokenHash) != sha256.Size {
		return false
	}
	return subtle.ConstantTimeCompare(HashToken(token), w.TokenHash) == 1
}

// States the store accepts; they are the supervisor's lifecycle states. A row
// with any other state was not written by this hive.
const (
	StateDownloading = "downloading"
	StateLoading     = "loading"
	StateIdle        = "idle"
	StateBusy        = "busy"
	StateStale       = "stale"
	StateStopping    = "stopping"
	StateStopped     = "stopped"
	StateFailed      = "failed"
	StateRestarting  = "restarting"
)

// ValidState reports whether s is one of the supervisor's lifecycle states.
func ValidState(s string) bool {
	switch s {
	case StateDownloading, StateLoading, StateIdle, StateBusy, StateStale,
		StateStopping, StateStopped, StateFailed, StateRestarting:
		return true
	}
	return false
}

var idPattern = regexp.MustCompile(`^w-[a-z0-9]{1,64}$`)

// ErrInvalid marks a record the store refuses to write or to load.
var ErrInvalid = errors.New("workerstore: invalid record")

// validate checks what adoption relies on: a well-formed id, a pid that can
// name a process, a leaf inside the hive's tree (a tampered path must never
// make the hive kill or adopt processes elsewhere), a known state.
func (w *Worker) validate(cgroupRoot string) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: worker %q: %s", ErrInvalid, w.ID, fmt.Sprintf(format, a...))
	}
	switch {
	case !idPattern.MatchString(w.ID):
		return bad("id does not match %s", idPattern)
	case w.PID < 0:
		return bad("negative pid %d", w.PID)
	case w.PID > 0 && w.PIDStart == 0:
		return bad("pid %d without a start time", w.PID)
	case w.UID < 0:
		return bad("negative uid %d", w.UID)
	case w.Port < 0 || w.Port > 65535:
		return bad("port %d out of range", w.Port)
	case w.MemoryLimit < 0 || w.VRAMClaim < 0:
		return bad("negative memory limit or VRAM claim")
	case w.RestartCount < 0:
		return bad("negative restart count")
	case w.StdoutOffset < 0 || w.StderrOffset < 0:
		return bad("negative output offset")
	case len(w.TokenHash) != 0 && len(w.TokenHash) != sha256.Size:
		return bad("token hash of %d bytes", len(w.TokenHash))
	case !ValidState(w.State):
		return bad("unknown state %q", w.State)
	}
	if w.CgroupPath != "" || w.PID > 0 {
		if err := under(cgroupRoot, w.CgroupPath); err != nil {
			return bad("cgroup path: %v", err)
		}
		if filepath.Base(w.CgroupPath) != w.ID {
			return bad("cgroup path %q is not the worker's leaf", w.CgroupPath)
		}
	}
	return nil
}

// under checks that p is a clean absolute path strictly below root.
func under(root, p string) error {
	if root == "" {
		return errors.New("no cgroup root configured")
	}
	if !filepath.IsAbs(p) || filepath.Clean(p) != p {
		return fmt.Errorf("%q is not a clean absolute path", p)
	}
	root = filepath.Clean(root)
	if !strings.HasPrefix(p, root+string(filepath.Separator)) {
		return fmt.Errorf("%q is outside %q", p, root)
	}
	return nil
}
