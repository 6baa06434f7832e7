package supervisor

import (
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// outputPoller reads the stdout and stderr pipes of every run on one
// goroutine. The read ends are non-blocking fds in one epoll instance, and
// that epoll fd is itself parked in Go's netpoller, so an idle worker's
// output costs no goroutine, no thread and no read buffer: the poller reads
// into its one buffer and each stream keeps only a line waiting for its
// newline. The goroutine exists while some stream is open.
type outputPoller struct {
	mu      sync.Mutex
	ep      *os.File // nil: no poller goroutine
	epfd    int
	streams map[int32]*polledStream // by the id in the epoll event
	nextID  int32
}

type polledStream struct {
	out  outStream
	fd   int
	done func() // the run's output readers: this stream ended
}

// add registers the non-blocking read end fd (the poller owns it from
// here: it closes it at EOF) and calls done when the stream ends.
func (p *outputPoller) add(fd int, sink *logSink, stream string, done func()) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ep == nil {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			return fmt.Errorf("output poller: epoll_create1: %w", err)
		}
		if err := unix.SetNonblock(epfd, true); err != nil {
			unix.Close(epfd)
			return fmt.Errorf("output poller: %w", err)
		}
		// A non-blocking epoll fd is pollable: os.NewFile puts it in the
		// netpoller, which wakes us when any registered pipe is readable.
		ep := os.NewFile(uintptr(epfd), "output-epoll")
		rc, err := ep.SyscallConn()
		if err != nil {
			ep.Close()
			return fmt.Errorf("output poller: %w", err)
		}
		if p.streams == nil {
			p.streams = make(map[int32]*polledStream)
		}
		p.ep, p.epfd = ep, epfd
		go p.loop(ep, rc, epfd)
	}
	p.nextID++
	if p.nextID <= 0 {
		p.nextID = 1
	}
	id := p.nextID
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: id}
	if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("output poller: epoll_ctl: %w", err)
	}
	p.streams[id] = &polledStream{out: outStream{sink: sink, stream: stream}, fd: fd, done: done}
	return nil
}

// loop serves one epoll instance until its last stream ends.
func (p *outputPoller) loop(ep *os.File, rc syscall.RawConn, epfd int) {
	var (
		events [64]unix.EpollEvent
		buf    [32 << 10]byte
		n      int
		werr   error
	)
	wait := func(fd uintptr) bool {
		n, werr = unix.EpollWait(int(fd), events[:], 0)
		return n != 0 || (werr != nil && werr != unix.EAGAIN)
	}
	for {
		if err := rc.Read(wait); err != nil {
			return // the epoll file was closed: not expected while streams are open
		}
		if werr == unix.EINTR {
			continue
		}
		if werr != nil {
			return
		}
		for _, ev := range events[:n] {
			p.mu.Lock()
			st := p.streams[ev.Fd]
			p.mu.Unlock()
			if st == nil || !p.read(st, buf[:]) {
				continue
			}
			// The stream ended.
			p.mu.Lock()
			delete(p.streams, ev.Fd)
			_ = unix.EpollCtl(epfd, unix.EPOLL_CTL_DEL, st.fd, nil)
			unix.Close(st.fd)
			last := len(p.streams) == 0
			if last {
				p.ep = nil
			}
			p.mu.Unlock()
			st.done()
			if last {
				ep.Close()
				return
			}
		}
	}
}

// read drains what st's pipe holds now, a bounded amount per wake-up so one
// chatty worker cannot starve the others (epoll is level-triggered: the
// rest is read on the next round). It reports whether the stream ended.
func (p *outputPoller) read(st *polledStream, buf []byte) bool {
	for range 4 {
		n, err := unix.Read(st.fd, buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false
		case err != nil || n == 0: // EOF: every writer is gone
			st.out.end()
			return true
		}
		st.out.feed(buf[:n])
	}
	return false
}
