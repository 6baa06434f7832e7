package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/cgroup/gate"
)

// spawner is one OS thread of this process, locked to its goroutine, that
// starts workers without a gate: exec.Cmd forks from the calling thread, so
// the child inherits what that thread carries.
//
//   - v1 (threads may move on their own): the thread writes its tid into the
//     leaf's tasks files, forks the worker there, and moves back; the
//     child's first instruction already runs in the leaf.
//   - restricted (for WithIsolation): the thread has an empty bounding,
//     ambient and inheritable set, no_new_privs and locked securebits
//     (gate.RestrictThread), all inherited by the fork; Go's
//     SysProcAttr.Credential and Setsid switch groups, gid, uid and session
//     in the child before exec. What the gate does in a process of its own,
//     minus the gate's exec.
//
// The thread keeps uid 0 and its effective capabilities (the child needs
// them to switch uid) and only ever runs Start calls. It is never unlocked:
// when the spawner stops (its handle dropped, or a move back failed) the
// runtime ends the thread instead of handing a restricted or misplaced
// thread to other goroutines.
type spawner struct {
	reqs chan spawnReq
	err  error // the thread could not be prepared: use the gate
	// home maps each v1 hierarchy to the thread's own cgroup directory
	// there (where it returns after a fork in a leaf).
	home map[string]string
	// stranded is set on the thread when it could not move back home; the
	// loop then ends the thread.
	stranded atomic.Bool
}

type spawnReq struct {
	fn   func() error
	done chan error
}

func newSpawner(restrict bool) *spawner {
	s := &spawner{reqs: make(chan spawnReq)}
	ready := make(chan error, 1)
	go s.loop(restrict, ready)
	s.err = <-ready
	return s
}

func (s *spawner) loop(restrict bool, ready chan<- error) {
	runtime.LockOSThread()
	if restrict {
		if step, err := gate.RestrictThread(); err != nil {
			ready <- fmt.Errorf("restrict spawner thread: %s: %w", step, err)
			return // locked: the runtime ends this half-restricted thread
		}
	}
	home, err := threadV1Cgroups()
	if err != nil {
		ready <- err
		return
	}
	s.home = home
	ready <- nil
	for r := range s.reqs {
		r.done <- r.fn()
		if s.stranded.Load() {
			// Misplaced: end the thread (locked, so the runtime does), which
			// takes it out of the leaf. Callers that already hold this
			// spawner get an error instead of blocking.
			go func() {
				for r := range s.reqs {
					r.done <- errSpawnerGone
				}
			}()
			return
		}
	}
}

var errSpawnerGone = errors.New("cgroup: spawner thread ended")

// run calls fn on the spawner's thread.
func (s *spawner) run(fn func() error) error {
	done := make(chan error, 1)
	s.reqs <- spawnReq{fn: fn, done: done}
	return <-done
}

// threadV1Cgroups reads the calling thread's v1 cgroups: hierarchy (each
// controller of a joint mount on its own) → directory.
func threadV1Cgroups() (map[string]string, error) {
	b, err := os.ReadFile("/proc/thread-self/cgroup")
	if err != nil {
		return nil, fmt.Errorf("cgroup: read own cgroups: %w", err)
	}
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.SplitN(sc.Text(), ":", 3)
		if len(f) != 3 || f[1] == "" {
			continue
		}
		for _, c := range strings.Split(f[1], ",") {
			out[c] = filepath.Join(v1Mount, c, f[2])
		}
	}
	return out, nil
}

// spawnerHandle starts its spawner on first use, starts a new one after a
// stranded thread ended, and stops it once nothing (manager or leaf) refers
// to the handle any more.
type spawnerHandle struct {
	restrict bool
	mu       sync.Mutex
	s        *spawner
	failed   error
}

func (h *spawnerHandle) get() (*spawner, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.failed != nil {
		return nil, h.failed
	}
	if h.s == nil || h.s.stranded.Load() {
		s := newSpawner(h.restrict)
		if s.err != nil {
			// Not retried: the same missing capability would fail again.
			h.failed = s.err
			return nil, s.err
		}
		runtime.AddCleanup(h, func(s *spawner) { close(s.reqs) }, s)
		h.s = s
	}
	return h.s, nil
}

// forkIn starts cmd from the spawner's thread while that thread sits in
// dirs (hierarchy → leaf directory; v1 tasks files move single threads),
// then moves the thread back home. The child is created in the leaf, like
// CLONE_INTO_CGROUP on v2. Must run on the spawner's thread (run).
func (s *spawner) forkIn(dirs map[string]string, start func() error) error {
	tid := strconv.Itoa(unix.Gettid())
	names := make([]string, 0, len(dirs))
	for n := range dirs {
		if _, ok := s.home[n]; !ok {
			return fmt.Errorf("cgroup: spawner thread has no cgroup in the %s hierarchy", n)
		}
		names = append(names, n)
	}
	sort.Strings(names)
	var moved []string
	back := func() error {
		for _, n := range moved {
			if err := writeFile(s.home[n], "tasks", tid); err != nil {
				s.stranded.Store(true)
				return fmt.Errorf("cgroup: move spawner thread back to %s: %w", s.home[n], err)
			}
		}
		return nil
	}
	for _, n := range names {
		if err := writeFile(dirs[n], "tasks", tid); err != nil {
			if berr := back(); berr != nil {
				return errors.Join(err, berr)
			}
			if isGone(err) {
				return fmt.Errorf("%w: %v", ErrNotFound, err)
			}
			return err
		}
		moved = append(moved, n)
	}
	err := start()
	if berr := back(); berr != nil {
		// The worker (if it started) is fine where it is; only this thread
		// must not fork again.
		if err == nil {
			return nil
		}
		return errors.Join(err, berr)
	}
	return err
}

// startFromSpawner runs cmd.Start on sp's thread inside place (which puts
// the fork in the leaf), with iso's identity and a session of its own set
// through a copy of cmd.SysProcAttr; cmd's own SysProcAttr is restored.
func startFromSpawner(sp *spawner, cmd *exec.Cmd, iso *Isolation, place func(start func() error) error, mode, id string) error {
	orig := cmd.SysProcAttr
	var spa syscall.SysProcAttr
	if orig != nil {
		spa = *orig
	}
	if iso != nil {
		spa.Credential = &syscall.Credential{Uid: iso.UID, Gid: iso.GID, Groups: iso.Groups}
		spa.Setsid = true
	}
	cmd.SysProcAttr = &spa
	err := sp.run(func() error { return place(cmd.Start) })
	cmd.SysProcAttr = orig
	switch {
	case err == nil:
		return nil
	case iso != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, ErrNotFound):
		// Go's child does not say which step failed.
		return fmt.Errorf("%s: start %s in leaf %s: switch to uid %d gid %d (setgroups, setresgid, setresuid) or exec: %w", mode, cmd.Path, id, iso.UID, iso.GID, err)
	default:
		return fmt.Errorf("%s: start %s in leaf %s: %w", mode, cmd.Path, id, err)
	}
}
