package cgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// freezer freezes and thaws one cgroup, bounded by ctx. The library's
// Freeze/Thaw (v1 and v2) poll forever without a context; a task stuck in D
// state would hang the hive's stop path, so this code owns the loop.
type freezer interface {
	freeze(ctx context.Context) error
	thaw(ctx context.Context) error
}

// fileFreezer is the freezer of either cgroup version: write a value to one
// file, then poll until reached says the kernel got there.
type fileFreezer struct {
	dir, file      string
	frozen, thawed string
	reached        func(want string) (bool, error)
}

func (f fileFreezer) set(ctx context.Context, v string) error {
	if err := writeFile(f.dir, f.file, v); err != nil {
		return err
	}
	return pollUntil(ctx, func() (bool, error) { return f.reached(v) })
}

func (f fileFreezer) freeze(ctx context.Context) error { return f.set(ctx, f.frozen) }
func (f fileFreezer) thaw(ctx context.Context) error   { return f.set(ctx, f.thawed) }

// freezeTimeout bounds one round's freeze; a leaf that does not freeze in
// time is signalled unfrozen.
const freezeTimeout = time.Second

// thawTimeout bounds one thaw; thawing takes effect at once on a healthy
// kernel.
const thawTimeout = 5 * time.Second

// freezeKillLoop kills every process in a cgroup without cgroup.kill: freeze
// (so nothing can fork or exit while the pid list is read, which also makes
// signalling by pid safe: a frozen task cannot die and have its pid reused),
// SIGKILL each pid, thaw (a frozen task does not act on SIGKILL until thawed,
// runc#2105), and repeat until the cgroup is empty. fz may be nil when no
// freezer is available; the loop then relies on repetition alone.
func freezeKillLoop(ctx context.Context, fz freezer, list func() ([]int, error)) error {
	// Thaw even when ctx has ended (a leaf left frozen holds its SIGKILLed
	// tasks forever), but bounded: the state may never be reached.
	thaw := func() error {
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), thawTimeout)
		defer cancel()
		return fz.thaw(tctx)
	}
	self := os.Getpid()
	for {
		pids, err := list()
		if err != nil {
			if isGone(err) {
				return nil
			}
			return fmt.Errorf("list pids: %w", err)
		}
		if len(pids) == 0 {
			return nil
		}
		if fz != nil {
			fctx, cancel := context.WithTimeout(ctx, freezeTimeout)
			err := fz.freeze(fctx)
			cancel()
			switch {
			case err != nil && ctx.Err() != nil:
				// Thaw in any case: a half-frozen leaf must not be left behind.
				_ = thaw()
				return fmt.Errorf("freeze: %w", err)
			case err != nil:
				// A task in uninterruptible sleep (a driver call, NFS)
				// keeps the leaf FREEZING; it still must get its SIGKILL,
				// which a killable sleep acts on at once. This round
				// signals unfrozen, from a fresh list (the old one is a
				// second stale: its pids may have exited and been reused).
				fallthrough
			default:
				if pids, err = list(); err != nil && !isGone(err) {
					_ = thaw()
					return fmt.Errorf("list pids: %w", err)
				}
			}
		}
		for _, p := range pids {
			if p == self {
				// A spawner thread of ours forking in the leaf: it moves
				// out by itself; the loop waits for that.
				continue
			}
			if err := unix.Kill(p, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
				if fz != nil {
					_ = thaw()
				}
				return fmt.Errorf("kill pid %d: %w", p, err)
			}
		}
		if fz != nil {
			if err := thaw(); err != nil {
				return fmt.Errorf("thaw: %w", err)
			}
		}
		// Give the kills a moment to land before the next round.
		wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		err = pollUntil(wctx, func() (bool, error) {
			p, err := list()
			if isGone(err) {
				return true, nil
			}
			return len(p) == 0, err
		})
		cancel()
		if err != nil && ctx.Err() != nil {
			return ctx.Err()
		}
	}
}
