package supervisor

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
)

// The output streams a worker's log lines are tagged with.
const (
	streamStdout = "stdout"
	streamStderr = "stderr"
)

const (
	tailBytes = 64 << 10 // in-memory tail per worker
	maxLine   = 16 << 10 // longer lines are split
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

	mu sync.Mutex
	// buf is the tail: the last lines as entries "<stream tag><line>\n",
	// oldest first, in one buffer, so a flood of empty lines costs a tag
	// byte each rather than a slice header and a struct (~40 B) each, times
	// the 256 terminal workers that keep their tails.
	buf      []byte
	size     int // output bytes in buf (lines and newlines, tags not counted)
	file     *os.File
	fileSize int64
	fileErr  error
	closed   bool
}

func newLogSink(id, dir string, maxBytes int64, keep int, sink LineSink) *logSink {
	return &logSink{id: id, path: filepath.Join(dir, id+".log"), maxBytes: maxBytes, keep: keep, sink: sink}
}

// pump reads one stream until EOF (every writer gone) and closes it.
func (l *logSink) pump(stream string, r io.ReadCloser) {
	defer r.Close()
	br := bufio.NewReaderSize(r, maxLine)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			l.write(stream, bytes.TrimSuffix(line, []byte("\n")))
		}
		if err != nil && err != bufio.ErrBufferFull {
			return
		}
	}
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

// writeFile appends a line, rotating first if it would pass maxBytes.
// Caller holds l.mu.
func (l *logSink) writeFile(line []byte) {
	if l.fileErr != nil {
		return
	}
	if l.file != nil && l.fileSize+int64(len(line))+1 > l.maxBytes {
		l.rotate()
	}
	if l.file == nil {
		f, err := os.OpenFile(l.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			l.fileErr = fmt.Errorf("worker log: %w", err)
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
		l.fileErr = fmt.Errorf("worker log: %w", err)
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

// remove closes and deletes the files.
func (l *logSink) remove() {
	l.close()
	_ = os.Remove(l.path)
	for i := 1; i <= l.keep; i++ {
		_ = os.Remove(fmt.Sprintf("%s.%d", l.path, i))
	}
}
