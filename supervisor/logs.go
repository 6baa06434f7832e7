package supervisor

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The output streams a worker's log lines are tagged with.
const (
	streamStdout = "stdout"
	streamStderr = "stderr"
)

const (
	tailBytes = 64 << 10 // in-memory tail per worker
	maxLine   = 16 << 10 // longer lines are split

	// logRetryAfter is how long a worker's file logging pauses after a
	// write fails (disk full, I/O error) before the next line tries again.
	logRetryAfter = 10 * time.Second
)

// logSink takes a worker's output: a bounded in-memory tail, a size-capped
// rotated file and the optional line sink. Writes never block on anything
// slower than a local file append.
type logSink struct {
	id       string
	path     string
	maxBytes int64
	keep     int
	sink     LineSink
	// log and dropped report a failing log file: one line per episode,
	// every line not written counted. Either may be nil.
	log     *slog.Logger
	dropped prometheus.Counter

	mu sync.Mutex
	// buf is the tail: the last lines as entries "<stream tag><line>\n",
	// oldest first, in one buffer, so a flood of empty lines costs a tag
	// byte each rather than a slice header and a struct (~40 B) each, times
	// the 256 terminal workers that keep their tails.
	buf      []byte
	size     int // output bytes in buf (lines and newlines, tags not counted)
	file     *os.File
	fileSize int64
	// fileErr is the failure of the current episode; file writes pause
	// until retryAt, then the next line tries again.
	fileErr    error
	retryAt    time.Time
	retryAfter time.Duration
	lost       uint64 // lines dropped in this episode
	closed     bool
}

func newLogSink(id, dir string, maxBytes int64, keep int, sink LineSink) *logSink {
	return &logSink{id: id, path: filepath.Join(dir, id+".log"), maxBytes: maxBytes, keep: keep, sink: sink,
		retryAfter: logRetryAfter}
}

// stream tags in the tail buffer; lines never hold '\n' (pump splits on it).
const (
	tagStdout = 'o'
	tagStderr = 'e'
)

func streamTag(stream string) byte {
	if stream == streamStderr {
		return tagStderr
	}
	return tagStdout
}

func (l *logSink) write(stream string, line []byte) {
	if l.sink != nil {
		l.sink.WriteLine(l.id, stream, append([]byte(nil), line...))
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, streamTag(stream))
	l.buf = append(l.buf, line...)
	l.buf = append(l.buf, '\n')
	l.size += len(line) + 1
	for l.size > tailBytes {
		i := bytes.IndexByte(l.buf, '\n')
		if i+1 == len(l.buf) {
			break // keep the newest line whatever its size
		}
		l.size -= i // the tag and the line (i bytes) stand for i output bytes with the newline
		l.buf = l.buf[i+1:]
	}
	if !l.closed {
		l.writeFile(line)
	}
}

// writeFile appends a line, rotating first if it would pass maxBytes. A
// failure (a full disk) is not final: lines are dropped and counted for
// retryAfter, then the next line reopens the file and tries again, so the
// file resumes once space is freed (a rotation or the operator). Caller
// holds l.mu.
func (l *logSink) writeFile(line []byte) {
	if l.fileErr != nil && time.Now().Before(l.retryAt) {
		l.drop()
		return
	}
	if l.file != nil && l.fileSize+int64(len(line))+1 > l.maxBytes {
		l.rotate()
	}
	if l.file == nil {
		f, err := os.OpenFile(l.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			l.fail(err)
			return
		}
		st, err := f.Stat()
		if err == nil {
			l.fileSize = st.Size()
		}
		l.file = f
	}
	// The full slice expression makes append copy: line may be the
	// reader's buffer, which must not be written to.
	n, err := l.file.Write(append(line[:len(line):len(line)], '\n'))
	l.fileSize += int64(n)
	if err != nil {
		l.fail(err)
		return
	}
	if l.fileErr != nil {
		if l.log != nil {
			l.log.Info("worker log file writable again", slog.String("path", l.path), slog.Uint64("lines_dropped", l.lost))
		}
		l.fileErr, l.lost = nil, 0
	}
}

// fail starts or extends a failure episode: the line is dropped, the file
// closed (the retry reopens it), and the first failure of an episode is
// logged. Caller holds l.mu.
func (l *logSink) fail(err error) {
	if l.file != nil {
		_ = l.file.Close()
		l.file = nil
	}
	if l.fileErr == nil && l.log != nil {
		l.log.Error("worker log file write failed; its lines are dropped (still in the tail and the journal) until a retry works",
			slog.String("path", l.path), slog.Duration("retry_after", l.retryAfter), slog.Any("err", err))
	}
	l.fileErr = fmt.Errorf("worker log: %w", err)
	l.retryAt = time.Now().Add(l.retryAfter)
	l.drop()
}

// drop counts a line the file did not get. Caller holds l.mu.
func (l *logSink) drop() {
	l.lost++
	if l.dropped != nil {
		l.dropped.Inc()
	}
}

// rotate shifts id.log → id.log.1 → … → id.log.<keep>. Caller holds l.mu.
func (l *logSink) rotate() {
	_ = l.file.Close()
	l.file = nil
	for i := l.keep - 1; i >= 1; i-- {
		_ = os.Rename(fmt.Sprintf("%s.%d", l.path, i), fmt.Sprintf("%s.%d", l.path, i+1))
	}
	_ = os.Rename(l.path, l.path+".1")
	l.fileSize = 0
}

// tail returns the in-memory tail, optionally one stream only.
func (l *logSink) tail(stream string) []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	if stream == "" {
		b := make([]byte, 0, l.size)
		for rest := l.buf; len(rest) > 0; {
			i := bytes.IndexByte(rest, '\n')
			b = append(b, rest[1:i+1]...)
			rest = rest[i+1:]
		}
		return b
	}
	tag := streamTag(stream)
	var b []byte
	for rest := l.buf; len(rest) > 0; {
		i := bytes.IndexByte(rest, '\n')
		if rest[0] == tag {
			b = append(b, rest[1:i+1]...)
		}
		rest = rest[i+1:]
	}
	return b
}

// close closes the file; the tail stays readable.
func (l *logSink) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	if l.file != nil {
		_ = l.file.Close()
		l.file = nil
	}
}

// workerLogName matches the files of newLogSink's workers: <id>.log and
// its rotations <id>.log.<n>, ids as newWorkerID makes them.
var workerLogName = regexp.MustCompile(`^w-[a-z0-9]+\.log(\.[0-9]+)?$`)

// removeStaleLogs deletes the worker log files in dir, for a supervisor
// that starts with no workers: they belong to workers of an earlier hive
// that no longer exist, and nothing else ever deletes them. A worker's
// files thus live from its spawn to its removal or the hive's next start;
// the journal keeps its output beyond. It returns how many it removed.
func removeStaleLogs(dir string) (int, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("worker log dir: %w", err)
	}
	n := 0
	for _, e := range ents {
		if !e.Type().IsRegular() || !workerLogName.MatchString(e.Name()) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
			return n, fmt.Errorf("remove stale worker log: %w", err)
		}
		n++
	}
	return n, nil
}

// remove closes and deletes the files.
func (l *logSink) remove() {
	l.close()
	_ = os.Remove(l.path)
	for i := 1; i <= l.keep; i++ {
		_ = os.Remove(fmt.Sprintf("%s.%d", l.path, i))
	}
}
