package cgroup

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// oomEventBuffer lets a slow consumer miss no event while the watcher keeps
// reading; each event carries the cumulative count, so even a dropped-late
// reader can tell how many kills happened.
const oomEventBuffer = 8

// send delivers ev unless ctx ends first.
func send(ctx context.Context, ch chan<- OOMEvent, ev OOMEvent) bool {
	select {
	case ch <- ev:
		return true
	case <-ctx.Done():
		return false
	}
}

// watchV2 reports increases of oom_kill in <dir>/memory.events.
//
// The library's EventChan is not used: it has no way to stop (no context, the
// goroutine and its inotify fd live until the cgroup empties), it ends for
// good when the leaf empties once, and its unbuffered hand-off blocks the
// reader. This watcher uses one non-blocking inotify fd (parked in the Go
// netpoller, no thread per leaf) on memory.events, cgroup.events and the leaf
// directory itself. Every wake-up re-reads memory.events, including the one
// for populated→0, so a kill that lands while the leaf empties is never
// missed. It ends when ctx ends or the leaf directory is removed.
func watchV2(ctx context.Context, id, dir string) (<-chan OOMEvent, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("cgroup v2: inotify: %w", err)
	}
	f := os.NewFile(uintptr(fd), "inotify:"+dir)
	// rmdir of a cgroup does not reliably report IN_DELETE_SELF on the
	// directory (the watch pins the kernfs inode), so the parent is watched
	// for IN_DELETE of the leaf's name as well.
	watches := []struct {
		path string
		mask uint32
	}{
		{filepath.Join(dir, "memory.events"), unix.IN_MODIFY},
		{filepath.Join(dir, "cgroup.events"), unix.IN_MODIFY},
		{dir, unix.IN_DELETE_SELF},
		{filepath.Dir(dir), unix.IN_DELETE | unix.IN_ONLYDIR},
	}
	var parentWD int
	for _, w := range watches {
		wd, err := unix.InotifyAddWatch(fd, w.path, w.mask)
		if w.mask&unix.IN_DELETE != 0 {
			parentWD = wd
		}
		if err != nil {
			f.Close()
			if isGone(err) {
				return nil, fmt.Errorf("cgroup v2: leaf %s: %w", id, ErrNotFound)
			}
			return nil, fmt.Errorf("cgroup v2: watch %s: %w", w.path, err)
		}
	}
	last, err := v2OOMKills(dir)
	if err != nil {
		f.Close()
		if isGone(err) {
			return nil, fmt.Errorf("cgroup v2: leaf %s: %w", id, ErrNotFound)
		}
		return nil, fmt.Errorf("cgroup v2: read memory.events of %s: %w", id, err)
	}

	ch := make(chan OOMEvent, oomEventBuffer)
	stop := context.AfterFunc(ctx, func() { f.Close() }) // unblocks Read
	go func() {
		defer close(ch)
		defer stop()
		defer f.Close()
		buf := make([]byte, 16*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
		for {
			n, err := f.Read(buf)
			if err != nil {
				return // closed by ctx, or the fd failed: nothing more to learn
			}
			deleted := false
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				switch {
				case int(ev.Wd) == parentWD:
					if ev.Mask&unix.IN_DELETE != 0 && inotifyName(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]) == id {
						deleted = true
					}
				case ev.Mask&(unix.IN_DELETE_SELF|unix.IN_IGNORED) != 0:
					deleted = true
				}
				off += unix.SizeofInotifyEvent + int(ev.Len)
			}
			cur, err := v2OOMKills(dir)
			if err != nil {
				return // ENOENT/ENODEV: the leaf was removed
			}
			if cur > last {
				if !send(ctx, ch, OOMEvent{Leaf: id, Kills: cur, Time: time.Now()}) {
					return
				}
				last = cur
			}
			if deleted {
				return
			}
		}
	}()
	return ch, nil
}

// inotifyName returns the NUL-padded name that follows an inotify event.
func inotifyName(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// v2OOMKills counts OOM kills of the leaf from memory.events. Every leaf has
// memory.oom.group=1, so one OOM kills the whole leaf and bumps
// oom_group_kill once (kernel >= 5.17). oom_kill is no count of kills there:
// it counts per killed task, and the group kill hits the victim a second
// time (one OOM of a single process reads oom_kill 2 on 6.1). Older kernels
// lack oom_group_kill; oom_kill is the best there is. "oom" is never used: it
// is counted only where the limit fired (containerd#6323).
func v2OOMKills(dir string) (uint64, error) {
	ev, err := readKV(filepath.Join(dir, "memory.events"))
	if err != nil {
		return 0, err
	}
	return v2KillCount(ev), nil
}

func v2KillCount(ev map[string]uint64) uint64 {
	if n, ok := ev["oom_group_kill"]; ok {
		return n
	}
	return ev["oom_kill"]
}
