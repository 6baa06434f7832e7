package supervisor

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"sync"

	"golang.org/x/sys/unix"
)

// outputPipes is one run's stdout/stderr pipe pair. The write ends go to
// the child as *os.File outputs (so cmd.Wait does not wait for our readers,
// and a grandchild holding a pipe cannot delay exit handling); the read
// ends, non-blocking, go to the supervisor's output poller.
type outputPipes struct {
	outR, errR int // read ends; -1 once handed on or closed
	outW, errW *os.File
}

// openOutputPipes opens both pipes and makes them cmd's stdout and stderr.
// On error nothing stays open.
func openOutputPipes(cmd *exec.Cmd) (*outputPipes, error) {
	outR, outW, err := readerPipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	errR, errW, err := readerPipe()
	if err != nil {
		unix.Close(outR)
		outW.Close()
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	return &outputPipes{outR: outR, outW: outW, errR: errR, errW: errW}, nil
}

// readerPipe makes a pipe whose read end alone is non-blocking: the child
// writes to a plain blocking pipe.
func readerPipe() (int, *os.File, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return -1, nil, err
	}
	if err := unix.SetNonblock(p[0], true); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return -1, nil, err
	}
	return p[0], os.NewFile(uintptr(p[1]), "|1"), nil
}

// close closes all four ends: the process did not start.
func (p *outputPipes) close() {
	p.closeWriteEnds()
	for _, fd := range []*int{&p.outR, &p.errR} {
		if *fd >= 0 {
			unix.Close(*fd)
			*fd = -1
		}
	}
}

// closeWriteEnds drops our copies of the child's ends once it has them, so
// the readers see EOF when the last process holding them exits.
func (p *outputPipes) closeWriteEnds() {
	p.outW.Close()
	p.errW.Close()
}

// pump copies both streams into sink until EOF; readers is done when both
// have ended. The poller takes them; should it fail (no epoll instance can
// be made), each stream gets a goroutine of its own.
func (p *outputPipes) pump(poller *outputPoller, sink *logSink, readers *sync.WaitGroup, log *slog.Logger) {
	readers.Add(2)
	for _, s := range []struct {
		fd     *int
		stream string
	}{{&p.outR, streamStdout}, {&p.errR, streamStderr}} {
		fd := *s.fd
		*s.fd = -1
		if err := poller.add(fd, sink, s.stream, readers.Done); err != nil {
			log.Warn("worker output poller unavailable; reading with a goroutine", slog.Any("err", err))
			f := os.NewFile(uintptr(fd), "|0") // non-blocking: parked in the netpoller
			go func(stream string) { defer readers.Done(); sink.pump(stream, f) }(s.stream)
		}
	}
}
