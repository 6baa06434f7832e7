package supervisor

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/config"
)

// bufioLines is how the output was cut before the poller: a 16 KiB
// bufio.Reader's ReadSlice, each piece without its newline.
func bufioLines(in []byte) []string {
	br := bufio.NewReaderSize(bytes.NewReader(in), maxLine)
	var out []string
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			out = append(out, string(bytes.TrimSuffix(line, []byte("\n"))))
		}
		if err != nil && err != bufio.ErrBufferFull {
			return out
		}
	}
}

// TestOutStreamCutsLikeBufio: whatever the read sizes, outStream cuts a
// stream into the same lines as the bufio reader it replaces: newlines,
// long lines split every maxLine bytes (a line of exactly maxLine bytes
// then ends with an empty one), a last line without a newline.
func TestOutStreamCutsLikeBufio(t *testing.T) {
	inputs := map[string]string{
		"lines":          "a\nbb\n\nccc\n",
		"no newline":     "tail without newline",
		"exact maxLine":  strings.Repeat("x", maxLine) + "\nnext\n",
		"maxLine-1":      strings.Repeat("x", maxLine-1) + "\n",
		"long line":      strings.Repeat("y", 3*maxLine+17) + "\nz",
		"long, no end":   strings.Repeat("q", 2*maxLine),
		"mixed":          strings.Repeat("ab\n", 5000) + strings.Repeat("c", 20000) + "\n" + "d",
		"only newlines":  "\n\n\n",
		"utf8 at border": strings.Repeat("é", maxLine) + "\n",
	}
	for name, in := range inputs {
		t.Run(name, func(t *testing.T) {
			want := bufioLines([]byte(in))
			for _, chunk := range []int{1, 7, 4096, maxLine, 1 << 20, -1} {
				dir := t.TempDir()
				sink := newLogSink("w-cut", dir, 1<<30, 1, nil)
				o := &outStream{sink: sink, stream: streamStdout}
				rest := []byte(in)
				rng := rand.New(rand.NewPCG(1, uint64(len(in))))
				for len(rest) > 0 {
					n := chunk
					if n < 0 {
						n = 1 + rng.IntN(3*maxLine)
					}
					n = min(n, len(rest))
					o.feed(rest[:n])
					rest = rest[n:]
				}
				o.end()
				sink.close()
				data, err := os.ReadFile(sink.path)
				if err != nil && len(want) > 0 {
					t.Fatal(err)
				}
				got := strings.Split(string(data), "\n")
				got = got[:len(got)-1] // the file ends with a newline
				if fmt.Sprint(got) != fmt.Sprint(want) {
					t.Fatalf("chunk %d: %d lines (%.60q), want %d (%.60q)", chunk, len(got), got, len(want), want)
				}
				if cap(o.partial) > keepPartial {
					t.Fatalf("chunk %d: %d bytes of partial line kept after the end", chunk, cap(o.partial))
				}
			}
		})
	}
}

// TestOutputPollerManyStreams: one poller serves many pipes at once, each
// stream's lines arrive whole and in order, done is called once per
// stream at EOF, and the poller's goroutine ends with the last stream.
func TestOutputPollerManyStreams(t *testing.T) {
	const streams, lines = 50, 200
	var p outputPoller
	dir := t.TempDir()
	var done sync.WaitGroup
	sinks := make([]*logSink, streams)
	writers := make([]*os.File, streams)
	for i := range streams {
		r, w, err := readerPipe()
		if err != nil {
			t.Fatal(err)
		}
		sinks[i] = newLogSink(fmt.Sprintf("w-p%d", i), dir, 1<<30, 1, nil)
		done.Add(1)
		if err := p.add(r, sinks[i], streamStderr, done.Done); err != nil {
			t.Fatal(err)
		}
		writers[i] = w
	}
	var wg sync.WaitGroup
	for i, w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer w.Close()
			for j := range lines {
				fmt.Fprintf(w, "stream %d line %d %s\n", i, j, strings.Repeat("p", j*7))
			}
		}()
	}
	wg.Wait()
	finished := make(chan struct{})
	go func() { done.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(30 * time.Second):
		t.Fatal("streams not ended after their writers closed")
	}
	for i, sink := range sinks {
		sink.close()
		data, err := os.ReadFile(sink.path)
		if err != nil {
			t.Fatal(err)
		}
		tail := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
		if len(tail) != lines {
			t.Fatalf("stream %d: %d lines, want %d", i, len(tail), lines)
		}
		for j, line := range tail {
			if want := fmt.Sprintf("stream %d line %d %s", i, j, strings.Repeat("p", j*7)); line != want {
				t.Fatalf("stream %d line %d: %.80q", i, j, line)
			}
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ep != nil || len(p.streams) != 0 {
		t.Fatalf("poller still open with %d streams", len(p.streams))
	}
}

// TestIdleWorkerGoroutines: an idle worker costs the hive at most two
// goroutines (today one: its exit watcher, parked on the reaper's report;
// its output is on the shared poller, its OOM kills are read from the
// leaf's counter at exit) and no OS thread of its own.
func TestIdleWorkerGoroutines(t *testing.T) {
	const n = 40
	h := newHarness(t, func(c *config.Config) {
		c.Backends["sleeper"] = config.Backend{Command: []string{"/bin/sleep", "3600"}, Health: "callback",
			LoadTimeout: config.Duration(time.Hour), MemoryLimit: 64 << 20}
	})
	h.spawn(map[string]any{"backend": "sleeper"}) // the reaper and the poller start with the first
	settle := func() int { time.Sleep(50 * time.Millisecond); return runtime.NumGoroutine() }
	before, threads0 := settle(), threadCount(t)
	for range n {
		h.spawn(map[string]any{"backend": "sleeper"})
	}
	var after int
	h.waitFor("goroutines of finished requests to end", 10*time.Second, func() bool {
		after = settle()
		return after-before <= 2*n
	})
	// Threads the runtime started for the spawns stay parked; one per
	// worker (a waitid each) would be n more.
	if th := threadCount(t) - threads0; th >= n/2 {
		t.Errorf("%d workers added %d OS threads", n, th)
	}
	t.Logf("%d workers: %d goroutines more (%.2f each), %d threads more", n, after-before, float64(after-before)/n, threadCount(t)-threads0)
}

// threadCount is this process's number of OS threads.
func threadCount(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads line in /proc/self/status")
	return 0
}
