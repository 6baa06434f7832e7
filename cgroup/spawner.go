package cgroup

import (
	"fmt"
	"runtime"
	"sync"

	"github.com/rbee/rbee-hive/cgroup/gate"
)

// spawner is one OS thread of this process made unable to pass a
// capability on (gate.RestrictThread: empty bounding, ambient and
// inheritable sets, no_new_privs, securebits locked), from which v2 starts
// isolated workers without a gate: exec.Cmd forks from the calling thread,
// the child inherits all of that, CLONE_INTO_CGROUP places it, and Go's
// SysProcAttr.Credential and Setsid switch groups, gid, uid and session in
// the child before exec. What the gate does in a process of its own, minus
// the gate's exec: a start costs what a plain exec of the worker costs.
//
// The thread keeps uid 0 and its effective capabilities (the child needs
// them to switch uid) and only ever runs Start calls; it is locked to its
// goroutine and never unlocked, so when the spawner stops the runtime ends
// the thread instead of handing it to other goroutines.
type spawner struct {
	reqs chan spawnReq
	err  error // the thread could not be restricted: use the gate
}

type spawnReq struct {
	fn   func() error
	done chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq)}
	ready := make(chan error, 1)
	go s.loop(ready)
	if err := <-ready; err != nil {
		s.err = err
	}
	return s
}

func (s *spawner) loop(ready chan<- error) {
	runtime.LockOSThread()
	if step, err := gate.RestrictThread(); err != nil {
		ready <- fmt.Errorf("restrict spawner thread: %s: %w", step, err)
		return // locked: the runtime ends this half-restricted thread
	}
	ready <- nil
	for r := range s.reqs {
		r.done <- r.fn()
	}
}

// run calls fn on the restricted thread.
func (s *spawner) run(fn func() error) error {
	done := make(chan error, 1)
	s.reqs <- spawnReq{fn: fn, done: done}
	return <-done
}

// spawnerHandle starts the spawner on first use and stops it once nothing
// (manager or leaf) refers to the handle any more.
type spawnerHandle struct {
	once sync.Once
	s    *spawner
}

func (h *spawnerHandle) get() *spawner {
	h.once.Do(func() {
		h.s = newSpawner()
		if h.s.err == nil {
			runtime.AddCleanup(h, func(s *spawner) { close(s.reqs) }, h.s)
		}
	})
	return h.s
}
