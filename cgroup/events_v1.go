package cgroup

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/cgroups/v3/cgroup1"
	"golang.org/x/sys/unix"
)

// v1KillSettle bounds how long a v1 OOM wake-up waits for oom_kill to move.
// The eventfd is signalled when the memcg enters OOM, before the victim is
// chosen and the counter bumped.
const v1KillSettle = time.Second

// watchV1 reports increases of oom_kill in memory.oom_control, woken by the
// memcg OOM eventfd (registered once per call through the library's
// OOMEventFD; closing it unregisters it). The eventfd is made non-blocking so
// reads park in the netpoller and ctx can stop them by closing it. The
// eventfd also fires when the cgroup is removed; such wake-ups are dropped
// (containerd pkg/oom/v1 checks State() == Deleted the same way).
func watchV1(ctx context.Context, id string, cg cgroup1.Cgroup, memDir string) (<-chan OOMEvent, error) {
	ocPath := filepath.Join(memDir, "memory.oom_control")
	if dirGone(memDir) {
		return nil, fmt.Errorf("cgroup v1: leaf %s: %w", id, ErrNotFound)
	}
	efd, err := cg.OOMEventFD()
	if err != nil {
		return nil, fmt.Errorf("cgroup v1: OOM eventfd for leaf %s: %w", id, err)
	}
	if err := unix.SetNonblock(int(efd), true); err != nil {
		unix.Close(int(efd))
		return nil, fmt.Errorf("cgroup v1: OOM eventfd for leaf %s: %w", id, err)
	}
	f := os.NewFile(efd, "oom-eventfd:"+memDir)
	// The baseline is read after registering, so no kill falls between the two.
	last, err := v1OOMKills(ocPath)
	if err != nil {
		f.Close()
		if isGone(err) {
			return nil, fmt.Errorf("cgroup v1: leaf %s: %w", id, ErrNotFound)
		}
		return nil, fmt.Errorf("cgroup v1: read %s: %w", ocPath, err)
	}

	ch := make(chan OOMEvent, oomEventBuffer)
	stop := context.AfterFunc(ctx, func() { f.Close() })
	go func() {
		defer close(ch)
		defer stop()
		defer f.Close()
		var buf [8]byte
		for {
			if _, err := f.Read(buf[:]); err != nil {
				return
			}
			if dirGone(memDir) {
				return // the wake-up that rmdir causes
			}
			var cur uint64
			pctx, cancel := context.WithTimeout(ctx, v1KillSettle)
			err := pollUntil(pctx, func() (bool, error) {
				var err error
				cur, err = v1OOMKills(ocPath)
				return cur > last, err
			})
			cancel()
			if err != nil && isGone(err) {
				return
			}
			if cur > last {
				if !send(ctx, ch, OOMEvent{Leaf: id, Kills: cur, Time: time.Now()}) {
					return
				}
				last = cur
			}
			if ctx.Err() != nil {
				return
			}
		}
	}()
	return ch, nil
}

// v1OOMKills reads the oom_kill line of memory.oom_control (kernel >= 4.13).
// failcnt is not an OOM signal: it counts every allocation that hit the
// limit and was satisfied by reclaim.
func v1OOMKills(path string) (uint64, error) {
	kv, err := readKV(path)
	if err != nil {
		return 0, err
	}
	return kv["oom_kill"], nil
}
