//go:build linux && (amd64 || arm64 || ppc64le || riscv64 || s390x || loong64)

// Package reaper reports process exits for any number of processes with one
// goroutine and one OS thread: every watched process is a pidfd registered
// in one epoll instance, and a single loop blocks in epoll_wait. It replaces
// a goroutine (and an OS thread blocked in waitid) per process.
//
// For a child of this process the exit status is collected with
// waitid(P_PIDFD); for a process that is not our child (a worker adopted
// after a hive restart, now a child of init or of a subreaper) the kernel
// still signals the pidfd when it exits, and the Exit says the status is
// unknown.
//
// # Use from the supervisor
//
// The supervisor owns one Reaper (New at start, Close after the drain).
// Whoever starts a worker calls Watch right after Start returns:
//
//   - for a process it started, pass a pidfd obtained at clone time
//     (syscall.SysProcAttr.PidFD; race-free against pid reuse) to WatchPidFD,
//     or call Watch(pid), which opens one (safe for our own children: a
//     child's pid cannot be reused before we reap it);
//   - for a leftover adopted after a restart, Watch(pid) after checking the
//     pid is in the worker's cgroup (a non-child's pid can be reused between
//     that check and pidfd_open; the window is the same as today's).
//
// The caller must not also call cmd.Wait (or os.Process.Wait) for a watched
// child: the reaper reaps it, and a second waiter would get ECHILD. After
// the Exit arrives, cmd.Process.Release frees the os.Process handle.
//
// The Exit arrives once on the channel Watch returns (buffered: the loop
// never blocks on a slow receiver), then the channel is closed. With
// Hold, a child's zombie is kept (status read with WNOWAIT) until
// Exit.Release, so its pid cannot be reused while the caller still maps
// that pid to the worker (the supervisor forgets the main pid, then
// releases, as it does today with waitid WNOWAIT before cmd.Wait). Unwatch
// stops watching; Close (or the context of New ending) stops the loop and
// closes every channel that has not delivered.
package reaper

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Exit is one process's end.
type Exit struct {
	Pid  int
	Time time.Time // when the reaper saw the exit
	// Known is false when the process was not our child (adopted): it has
	// exited, but its parent collects the status.
	Known bool
	// Exited with Code, or killed by Signal (CoreDumped when it dumped).
	Exited     bool
	Code       int
	Signal     syscall.Signal
	CoreDumped bool

	release func() error
}

// Release reaps a zombie kept by Hold; without Hold it does nothing. Safe
// to call more than once.
func (e Exit) Release() error {
	if e.release == nil {
		return nil
	}
	return e.release()
}

func (e Exit) String() string {
	switch {
	case !e.Known:
		return fmt.Sprintf("pid %d exited, status unknown (not our child)", e.Pid)
	case e.Exited:
		return fmt.Sprintf("pid %d exited with code %d", e.Pid, e.Code)
	default:
		return fmt.Sprintf("pid %d killed by %s", e.Pid, e.Signal)
	}
}

// ErrClosed is returned by Watch after Close.
var ErrClosed = errors.New("reaper: closed")

// Reaper watches processes for their exit.
type Reaper struct {
	epfd, wake int

	mu      sync.Mutex
	closed  bool
	next    uint64
	watches map[uint64]*watch // by token, the epoll event's data
	byPid   map[int]uint64

	done chan struct{}
	stop func() bool
}

type watch struct {
	pid  int
	fd   int
	hold bool
	ch   chan Exit
}

const wakeToken = 0

// New starts the loop; it ends when ctx ends or on Close.
func New(ctx context.Context) (*Reaper, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("reaper: epoll_create1: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("reaper: eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, fmt.Errorf("reaper: epoll_ctl wake: %w", err)
	}
	r := &Reaper{epfd: epfd, wake: wake, next: wakeToken + 1, watches: make(map[uint64]*watch), byPid: make(map[int]uint64), done: make(chan struct{})}
	r.stop = context.AfterFunc(ctx, func() { _ = r.Close() })
	go r.loop()
	return r, nil
}

// Watch opens a pidfd for pid and reports its exit. hold keeps a child's
// zombie until Exit.Release.
func (r *Reaper) Watch(pid int, hold bool) (<-chan Exit, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("reaper: pidfd_open %d: %w", pid, err)
	}
	ch, err := r.add(pid, fd, hold)
	if err != nil {
		unix.Close(fd)
	}
	return ch, err
}

// WatchPidFD is Watch with a pidfd the caller already has (for example from
// SysProcAttr.PidFD); the reaper owns it from now on, also on error.
func (r *Reaper) WatchPidFD(pidfd, pid int, hold bool) (<-chan Exit, error) {
	ch, err := r.add(pid, pidfd, hold)
	if err != nil {
		unix.Close(pidfd)
	}
	return ch, err
}

func (r *Reaper) add(pid, fd int, hold bool) (<-chan Exit, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("reaper: bad pid %d", pid)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	if _, dup := r.byPid[pid]; dup {
		return nil, fmt.Errorf("reaper: pid %d is already watched", pid)
	}
	tok := r.next
	r.next++
	w := &watch{pid: pid, fd: fd, hold: hold, ch: make(chan Exit, 1)}
	// Registered under the lock, so the loop finds the entry for any event.
	// One-shot: an exited process stays readable, and one event is enough.
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLONESHOT}
	*(*uint64)(unsafe.Pointer(&ev.Fd)) = tok
	if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return nil, fmt.Errorf("reaper: epoll_ctl add pid %d: %w", pid, err)
	}
	r.watches[tok] = w
	r.byPid[pid] = tok
	return w.ch, nil
}

// Unwatch stops watching pid and closes its channel without an Exit. It
// reports whether pid was watched (false once its Exit was sent).
func (r *Reaper) Unwatch(pid int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	tok, ok := r.byPid[pid]
	if !ok {
		return false
	}
	w := r.watches[tok]
	r.dropLocked(tok, w)
	close(w.ch)
	return true
}

// Watched is how many processes are being watched.
func (r *Reaper) Watched() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.watches)
}

func (r *Reaper) dropLocked(tok uint64, w *watch) {
	_ = unix.EpollCtl(r.epfd, unix.EPOLL_CTL_DEL, w.fd, nil)
	unix.Close(w.fd)
	delete(r.watches, tok)
	delete(r.byPid, w.pid)
}

// Close stops the loop and closes the channels of processes that have not
// exited (their zombies, if any, are left to whoever waits next). It waits
// for the loop to end.
func (r *Reaper) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		<-r.done
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.stop()
	var one = [8]byte{1}
	if _, err := unix.Write(r.wake, one[:]); err != nil && err != unix.EAGAIN {
		return fmt.Errorf("reaper: wake: %w", err)
	}
	<-r.done
	return nil
}

func (r *Reaper) loop() {
	defer close(r.done)
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(r.epfd, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			// Only EBADF/EFAULT/EINVAL: nothing to recover; fail loudly by
			// closing everything, as Close would.
			r.shutdown()
			return
		}
		for i := range events[:n] {
			tok := *(*uint64)(unsafe.Pointer(&events[i].Fd))
			if tok == wakeToken {
				r.mu.Lock()
				closed := r.closed
				r.mu.Unlock()
				if closed {
					r.shutdown()
					return
				}
				continue
			}
			r.exited(tok)
		}
	}
}

// exited collects the status of the process behind tok and sends its Exit.
func (r *Reaper) exited(tok uint64) {
	r.mu.Lock()
	w, ok := r.watches[tok]
	if !ok {
		r.mu.Unlock()
		return // unwatched after the event was queued
	}
	delete(r.watches, tok)
	delete(r.byPid, w.pid)
	_ = unix.EpollCtl(r.epfd, unix.EPOLL_CTL_DEL, w.fd, nil)
	r.mu.Unlock()

	e := Exit{Pid: w.pid, Time: time.Now()}
	opts := unix.WEXITED | unix.WNOHANG
	if w.hold {
		opts |= unix.WNOWAIT
	}
	var info unix.Siginfo
	err := waitid(w.fd, &info, opts)
	if err == nil && childPid(&info) == w.pid {
		e.Known = true
		decode(&info, &e)
	}
	if e.Known && w.hold {
		var once sync.Once
		var rerr error
		fd := w.fd
		e.release = func() error {
			once.Do(func() {
				var info unix.Siginfo
				if err := waitid(fd, &info, unix.WEXITED); err != nil {
					rerr = fmt.Errorf("reaper: reap pid %d: %w", e.Pid, err)
				}
				unix.Close(fd)
			})
			return rerr
		}
	} else {
		unix.Close(w.fd)
	}
	w.ch <- e // buffered, one send per watch
	close(w.ch)
}

func waitid(pidfd int, info *unix.Siginfo, opts int) error {
	for {
		err := unix.Waitid(unix.P_PIDFD, pidfd, info, opts, nil)
		if err != unix.EINTR {
			return err
		}
	}
}

// sigchld is siginfo_t with its SIGCHLD member as 64-bit Linux lays it out
// (three ints, padding to the union's 8-byte alignment, then pid, uid,
// status); the build constraint keeps 32-bit targets out.
type sigchld struct {
	signo, errno, code int32
	_                  int32
	pid                int32
	uid                uint32
	status             int32
}

func childPid(info *unix.Siginfo) int {
	return int((*sigchld)(unsafe.Pointer(info)).pid)
}

// si_code values for SIGCHLD (asm-generic/siginfo.h).
const (
	cldExited = 1
	cldKilled = 2
	cldDumped = 3
)

func decode(info *unix.Siginfo, e *Exit) {
	s := (*sigchld)(unsafe.Pointer(info))
	switch s.code {
	case cldExited:
		e.Exited, e.Code = true, int(s.status)
	case cldKilled:
		e.Signal = syscall.Signal(s.status)
	case cldDumped:
		e.Signal, e.CoreDumped = syscall.Signal(s.status), true
	}
}

// shutdown closes every pidfd and channel and the reaper's own fds.
func (r *Reaper) shutdown() {
	r.mu.Lock()
	r.closed = true
	for tok, w := range r.watches {
		r.dropLocked(tok, w)
		close(w.ch)
	}
	r.mu.Unlock()
	unix.Close(r.wake)
	unix.Close(r.epfd)
}
