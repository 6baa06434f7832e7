package supervisor

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A worker's stdout and stderr are files in the hive's output directory,
// opened by the hive and given to the process as fd 1 and 2 (see
// docs/adoption.md, section 2). The worker needs no hive to write them: a
// hive that crashed, was killed or is being upgraded never makes a worker
// block on a full pipe or die of SIGPIPE. The hive tails the files
// (outputTailer) into the worker's log sink and remembers how far it has
// shipped each one, so a restarted hive resumes where the last one stopped.

// outputFileName matches the files outputPaths makes.
var outputFileName = regexp.MustCompile(`^w-[a-z0-9]+\.std(out|err)$`)

// outputPaths are worker id's stdout and stderr files in dir.
func outputPaths(dir, id string) [2]string {
	return [2]string{filepath.Join(dir, id+".stdout"), filepath.Join(dir, id+".stderr")}
}

// outputFiles is one run's pair of output files: the append-only write
// ends the child gets, and the hive's read ends (read-write, which hole
// punching needs; the hive never writes).
type outputFiles struct {
	w [2]*os.File
	r [2]*os.File
}

// openOutputFiles opens id's output files in dir and makes them cmd's
// stdout and stderr. On error nothing stays open.
func openOutputFiles(dir, id string, cmd *exec.Cmd) (*outputFiles, error) {
	of := &outputFiles{}
	for i, p := range outputPaths(dir, id) {
		w, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			of.close()
			return nil, fmt.Errorf("worker output file: %w", err)
		}
		of.w[i] = w
		r, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			of.close()
			return nil, fmt.Errorf("worker output file: %w", err)
		}
		of.r[i] = r
	}
	cmd.Stdout, cmd.Stderr = of.w[0], of.w[1]
	return of, nil
}

// closeWriteEnds drops the hive's copies of the child's ends once it has
// them.
func (of *outputFiles) closeWriteEnds() {
	for i, f := range of.w {
		if f != nil {
			f.Close()
			of.w[i] = nil
		}
	}
}

// close closes every end: the process did not start.
func (of *outputFiles) close() {
	of.closeWriteEnds()
	for i, f := range of.r {
		if f != nil {
			f.Close()
			of.r[i] = nil
		}
	}
}

// removeOutputFiles deletes id's output files.
func removeOutputFiles(dir, id string) {
	for _, p := range outputPaths(dir, id) {
		_ = os.Remove(p)
	}
}

// removeStaleOutput deletes the output files in dir whose worker keep does
// not want (nil: all of them). It returns how many it removed.
func removeStaleOutput(dir string, keep func(id string) bool) (int, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("worker output dir: %w", err)
	}
	n := 0
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() || !outputFileName.MatchString(name) {
			continue
		}
		if keep != nil && keep(name[:len(name)-len(filepath.Ext(name))]) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			return n, fmt.Errorf("remove stale worker output: %w", err)
		}
		n++
	}
	return n, nil
}

// outputOffsets is how far the hive has shipped a worker's stdout and
// stderr files (bytes; a line not yet ended is not shipped). The tailer
// writes it, the registry persists it.
type outputOffsets struct {
	out, err atomic.Int64
}

func (o *outputOffsets) get() (int64, int64) { return o.out.Load(), o.err.Load() }

// tailedFile is one output file being tailed.
type tailedFile struct {
	mu      sync.Mutex
	f       *os.File
	wd      int32 // inotify watch; -1: none
	off     int64 // read so far (shipped plus the partial line)
	punched int64 // bytes below this are a hole
	out     outStream
	shipped *atomic.Int64
	notify  func() // after shipped moved (may be nil)
	ended   bool
}

// shippedOffset is what the sink has been given. Caller holds t.mu.
func (t *tailedFile) shippedOffset() int64 { return t.off - int64(len(t.out.partial)) }

// outputTailer reads every worker's output files on one goroutine,
// woken by one inotify instance (IN_MODIFY on each file); the inotify fd is
// parked in Go's netpoller, so no thread waits for it. A chatty file is
// read at most tailChunk per round so it cannot starve the others.
type outputTailer struct {
	log *slog.Logger
	// punchEvery bounds a file's disk use: once this much has been shipped
	// past the last hole, the shipped part becomes a hole too (0: never).
	punchEvery int64

	mu       sync.Mutex
	ino      *os.File // nil until the first add; closed by close
	inofd    int
	byWD     map[int32]*tailedFile
	closed   bool
	noPunch  atomic.Bool // the file system cannot punch holes (logged once)
	loopDone chan struct{}
}

const tailChunk = 1 << 20

// add starts tailing f from offset off into stream, updating shipped as it
// goes. The tailer owns f from here; finish ends it. On an error the file
// is still returned, unwatched: finish reads it whole at the run's end.
func (t *outputTailer) add(f *os.File, off int64, out outStream, shipped *atomic.Int64, notify func()) (*tailedFile, error) {
	tf := &tailedFile{f: f, wd: -1, off: off, out: out, shipped: shipped, notify: notify}
	shipped.Store(off)
	if err := t.watch(tf); err != nil {
		return tf, err
	}
	// Whatever is already there (written before the watch, or while no
	// hive read) is read at once: no event will come for it.
	go t.catchUp(tf)
	return tf, nil
}

func (t *outputTailer) watch(tf *tailedFile) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return errors.New("output tailer closed")
	}
	if t.ino == nil {
		fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
		if err != nil {
			return fmt.Errorf("output tailer: inotify_init1: %w", err)
		}
		ino := os.NewFile(uintptr(fd), "output-inotify")
		rc, err := ino.SyscallConn()
		if err != nil {
			ino.Close()
			return fmt.Errorf("output tailer: %w", err)
		}
		t.ino, t.inofd = ino, fd
		t.byWD = make(map[int32]*tailedFile)
		t.loopDone = make(chan struct{})
		go t.loop(rc, fd, t.loopDone)
	}
	// /proc/self/fd/N names the open file whatever became of its path.
	wd, err := unix.InotifyAddWatch(t.inofd, fmt.Sprintf("/proc/self/fd/%d", tf.f.Fd()), unix.IN_MODIFY)
	if err != nil {
		return fmt.Errorf("output tailer: inotify_add_watch: %w", err)
	}
	tf.wd = int32(wd)
	t.byWD[tf.wd] = tf
	return nil
}

// catchUp reads what tf already holds.
func (t *outputTailer) catchUp(tf *tailedFile) {
	buf := make([]byte, 32<<10)
	for t.drain(tf, buf, tailChunk) {
	}
}

// loop reads inotify events and the files they name until the tailer is
// closed.
func (t *outputTailer) loop(rc interface {
	Read(func(uintptr) bool) error
}, fd int, done chan struct{}) {
	defer close(done)
	var (
		evbuf   [64 * (unix.SizeofInotifyEvent + unix.NAME_MAX + 1)]byte
		buf     = make([]byte, 32<<10)
		n       int
		rerr    error
		pending []*tailedFile
		inSet   = map[*tailedFile]bool{}
	)
	for {
		if len(pending) == 0 {
			err := rc.Read(func(uintptr) bool {
				n, rerr = unix.Read(fd, evbuf[:])
				return rerr != unix.EAGAIN
			})
			if err != nil {
				return // closed
			}
		} else {
			n, rerr = unix.Read(fd, evbuf[:])
		}
		switch {
		case rerr == unix.EAGAIN || rerr == unix.EINTR:
			n = 0
		case rerr != nil:
			return
		}
		overflow := false
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			wd := int32(binary.NativeEndian.Uint32(evbuf[off:]))
			mask := binary.NativeEndian.Uint32(evbuf[off+4:])
			off += unix.SizeofInotifyEvent + int(binary.NativeEndian.Uint32(evbuf[off+12:]))
			if mask&unix.IN_Q_OVERFLOW != 0 {
				overflow = true
				continue
			}
			t.mu.Lock()
			tf := t.byWD[wd]
			t.mu.Unlock()
			if tf != nil && !inSet[tf] {
				inSet[tf] = true
				pending = append(pending, tf)
			}
		}
		if overflow { // events were lost: read every file
			t.mu.Lock()
			for _, tf := range t.byWD {
				if !inSet[tf] {
					inSet[tf] = true
					pending = append(pending, tf)
				}
			}
			t.mu.Unlock()
		}
		next := pending[:0]
		for _, tf := range pending {
			if t.drain(tf, buf, tailChunk) {
				next = append(next, tf)
			} else {
				delete(inSet, tf)
			}
		}
		for i := len(next); i < len(pending); i++ {
			pending[i] = nil
		}
		pending = next
	}
}

// drain reads tf from its offset to the end of the file, at most limit
// bytes (0: no limit), feeding the lines to its sink. It reports whether
// it stopped at the limit with more to read.
func (t *outputTailer) drain(tf *tailedFile, buf []byte, limit int) bool {
	tf.mu.Lock()
	defer tf.mu.Unlock()
	if tf.ended {
		return false
	}
	read := 0
	for limit == 0 || read < limit {
		n, err := unix.Pread(int(tf.f.Fd()), buf, tf.off)
		if err == unix.EINTR {
			continue
		}
		if n <= 0 {
			break
		}
		tf.out.feed(buf[:n])
		tf.off += int64(n)
		read += n
	}
	shipped := tf.shippedOffset()
	if tf.shipped.Swap(shipped) != shipped && tf.notify != nil {
		tf.notify()
	}
	t.punch(tf, shipped)
	return limit != 0 && read >= limit
}

// punch turns the shipped part of tf into a hole once punchEvery more has
// been shipped: the file's size (and the worker's O_APPEND offset) stay,
// its blocks go. Caller holds tf.mu.
func (t *outputTailer) punch(tf *tailedFile, shipped int64) {
	if t.punchEvery <= 0 || shipped-tf.punched < t.punchEvery || t.noPunch.Load() {
		return
	}
	end := shipped &^ 4095
	err := unix.Fallocate(int(tf.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, end)
	if err != nil {
		if t.noPunch.CompareAndSwap(false, true) && t.log != nil {
			t.log.Warn("cannot punch holes in worker output files; their disk use is not bounded while workers run",
				slog.String("path", tf.f.Name()), slog.Any("err", err))
		}
		return
	}
	tf.punched = end
}

// finish reads what is left of tf (the run has ended and its tree is
// gone), ends its last line, stops watching it and closes it. It returns
// the shipped offset.
func (t *outputTailer) finish(tf *tailedFile) int64 {
	t.drain(tf, make([]byte, 32<<10), 0)
	tf.mu.Lock()
	tf.out.end()
	tf.ended = true
	shipped := tf.off
	if tf.shipped.Swap(shipped) != shipped && tf.notify != nil {
		tf.notify()
	}
	tf.mu.Unlock()
	t.mu.Lock()
	if tf.wd >= 0 && t.byWD[tf.wd] == tf {
		delete(t.byWD, tf.wd)
		if t.ino != nil {
			_, _ = unix.InotifyRmWatch(t.inofd, uint32(tf.wd))
		}
	}
	t.mu.Unlock()
	tf.f.Close()
	return shipped
}

// close stops the loop. Files still being tailed stay open until finish.
func (t *outputTailer) close() {
	t.mu.Lock()
	t.closed = true
	ino, done := t.ino, t.loopDone
	t.mu.Unlock()
	if ino != nil {
		ino.Close()
		<-done
	}
}

// runOutput is one run's output as it is being set up: files, or pipes
// when the files cannot be opened.
type runOutput struct {
	files *outputFiles
	pipes *outputPipes
}

func (o runOutput) close() {
	if o.files != nil {
		o.files.close()
	} else {
		o.pipes.close()
	}
}

func (o runOutput) closeWriteEnds() {
	if o.files != nil {
		o.files.closeWriteEnds()
	} else {
		o.pipes.closeWriteEnds()
	}
}

// openOutput gives cmd w's output files as stdout and stderr; pipes if
// the files cannot be opened (then the worker's output needs a live hive).
func (s *Supervisor) openOutput(w *worker, cmd *exec.Cmd) (runOutput, error) {
	files, ferr := openOutputFiles(s.outDir, w.id, cmd)
	if ferr == nil {
		return runOutput{files: files}, nil
	}
	w.log.Warn("worker output files unavailable; using pipes, which a hive restart breaks", slog.Any("err", ferr))
	pipes, err := openOutputPipes(cmd)
	if err != nil {
		return runOutput{}, err
	}
	return runOutput{pipes: pipes}, nil
}

// pumpOutput starts shipping r's output into w's log sink. Files are
// tailed from how far w's earlier runs (or an earlier hive) shipped them.
func (s *Supervisor) pumpOutput(w *worker, r *run, o runOutput) {
	if o.pipes != nil {
		o.pipes.pump(&s.out, w.logs, &r.output, w.log)
		return
	}
	shipped := [2]*atomic.Int64{&w.outShipped.out, &w.outShipped.err}
	for i, stream := range [2]string{streamStdout, streamStderr} {
		f := o.files.r[i]
		o.files.r[i] = nil
		off := shipped[i].Load()
		if st, err := f.Stat(); err == nil && st.Size() < off {
			off = 0 // the file was replaced: read the new one whole
		}
		tf, err := s.tail.add(f, off, outStream{sink: w.logs, stream: stream}, shipped[i], func() { s.persistOffsets(w) })
		if err != nil {
			w.log.Warn("worker output is read at its exit only", slog.String("stream", stream), slog.Any("err", err))
		}
		r.tailed[i] = tf
	}
}
