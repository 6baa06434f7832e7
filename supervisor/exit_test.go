package supervisor

import (
	"context"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/internal/reaper"
)

// stallKill wraps a cgroup manager so that Leaf.Kill waits for a release.
type stallKill struct {
	cgroup.Manager
	gate chan struct{}
}

func (m stallKill) Create(id string, l cgroup.Limits) (cgroup.Leaf, error) {
	leaf, err := m.Manager.Create(id, l)
	if err != nil {
		return nil, err
	}
	return stallLeaf{leaf, m.gate}, nil
}

type stallLeaf struct {
	cgroup.Leaf
	gate chan struct{}
}

func (l stallLeaf) Kill(ctx context.Context) error {
	select {
	case <-l.gate:
	case <-ctx.Done():
	}
	return l.Leaf.Kill(ctx)
}

// Once a worker's main process is reaped its pid may be recycled at once,
// so the pid must already be gone from the main-pid map, even while the
// exit is still being handled (here: a tree kill that takes its time).
func TestMainPIDForgottenBeforeReap(t *testing.T) {
	gate := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	h := newHarnessWrapped(t, func(m cgroup.Manager) cgroup.Manager { return stallKill{m, gate} })
	t.Cleanup(release) // before the harness's Shutdown (cleanups run last-in first)
	res := h.spawn(map[string]any{"backend": "sim", "restart": "never"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	pid := *wi.PID
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.waitFor("the main process to be reaped", 5*time.Second, func() bool {
		_, err := os.Stat("/proc/" + strconv.Itoa(pid))
		return err != nil
	})
	h.s.mu.Lock()
	stale := h.s.mainPID[pid] != nil
	h.s.mu.Unlock()
	if stale {
		t.Errorf("pid %d reaped but still attributed to its worker", pid)
	}
	release()
	h.waitState(res.WorkerID, StateFailed, 10*time.Second)
}

// A datagram a worker sent just before it died, read only after it was
// reaped, is dropped quietly: it is not a stranger's (unknown_sender).
func TestLastWordsAfterReapAreNotUnknownSender(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim", "restart": "never"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	pid := *wi.PID
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.waitState(res.WorkerID, StateFailed, 10*time.Second)
	h.s.HandleDatagram(int32(pid), map[string]string{"STOPPING": "1"})
	if got := counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "unknown_sender"}); got != 0 {
		t.Errorf("unknown_sender = %v for a datagram of a worker just reaped", got)
	}
}

// TestWaitStatusFromReaper: the reaper's report reads back as the kernel's
// wait status word that classify and the API use.
func TestWaitStatusFromReaper(t *testing.T) {
	tests := []struct {
		ex               reaper.Exit
		exited, signaled bool
		code             int
		sig              syscall.Signal
		core             bool
	}{
		{reaper.Exit{Known: true, Exited: true, Code: 0}, true, false, 0, 0, false},
		{reaper.Exit{Known: true, Exited: true, Code: 3}, true, false, 3, 0, false},
		{reaper.Exit{Known: true, Exited: true, Code: 255}, true, false, 255, 0, false},
		{reaper.Exit{Known: true, Signal: syscall.SIGKILL}, false, true, -1, syscall.SIGKILL, false},
		{reaper.Exit{Known: true, Signal: syscall.SIGSEGV, CoreDumped: true}, false, true, -1, syscall.SIGSEGV, true},
	}
	for _, tt := range tests {
		ws := waitStatus(tt.ex)
		if ws.Exited() != tt.exited || ws.Signaled() != tt.signaled || ws.ExitStatus() != tt.code || ws.CoreDump() != tt.core ||
			(tt.signaled && ws.Signal() != tt.sig) {
			t.Errorf("%v: exited %v signaled %v code %d signal %v core %v", tt.ex, ws.Exited(), ws.Signaled(), ws.ExitStatus(), ws.Signal(), ws.CoreDump())
		}
	}
}
