package cgroup

import (
	"context"
	"errors"
	"testing"
	"time"
)

// stuckFreezer never reaches a state: freeze and thaw wait for their ctx.
type stuckFreezer struct{ thaws int }

func (f *stuckFreezer) freeze(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
func (f *stuckFreezer) thaw(ctx context.Context) error {
	f.thaws++
	<-ctx.Done()
	return ctx.Err()
}

// A freeze that does not finish within ctx must not leave freezeKillLoop
// stuck in the thaw that follows it: the stop path has to return.
func TestFreezeKillLoopBoundedThaw(t *testing.T) {
	fz := &stuckFreezer{}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- freezeKillLoop(ctx, fz, func() ([]int, error) { return []int{1 << 30}, nil })
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("freezeKillLoop = %v, want the freeze's deadline error", err)
		}
		if fz.thaws != 1 {
			t.Errorf("thaw called %d times, want 1", fz.thaws)
		}
	case <-time.After(thawTimeout + 5*time.Second):
		t.Fatal("freezeKillLoop still running: the thaw after a failed freeze is unbounded")
	}
}

// freezeNeverFreezer never reaches FROZEN (a task in uninterruptible sleep
// keeps a v1 leaf FREEZING) but thaws at once.
type freezeNeverFreezer struct{}

func (freezeNeverFreezer) freeze(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
func (freezeNeverFreezer) thaw(context.Context) error       { return nil }

// A leaf that cannot be frozen must still have its processes SIGKILLed:
// giving up at the freeze left the worker running.
func TestFreezeKillLoopUnfreezableLeaf(t *testing.T) {
	cmd := helperCmd("sleep")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	defer func() { _ = cmd.Process.Kill(); <-waited }()
	list := func() ([]int, error) {
		if alive(pid) {
			return []int{pid}, nil
		}
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*freezeTimeout)
	defer cancel()
	if err := freezeKillLoop(ctx, freezeNeverFreezer{}, list); err != nil {
		t.Fatalf("freezeKillLoop = %v, want the unfreezable process killed", err)
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("process still running after freezeKillLoop returned")
	}
}
