package sim

import (
	"context"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

const mib = 1 << 20

// touch writes one byte per page so the kernel really backs the memory:
// a fresh Go allocation of this size is an untouched mmap that adds no RSS.
func touch(b []byte) {
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
}

// allocate returns n MiB, touched, in 1 MiB chunks (one huge slice would
// need contiguous address space and pin the GC's largest span class).
func allocate(n int) [][]byte {
	chunks := make([][]byte, 0, n)
	for range n {
		c := make([]byte, mib)
		touch(c)
		chunks = append(chunks, c)
	}
	return chunks
}

// leak grows memory at rate MiB/s until ctx ends, keeping every chunk
// reachable so the GC cannot take it back.
func leak(ctx context.Context, rate float64, grown func(total int64)) {
	const tick = 100 * time.Millisecond
	t := time.NewTicker(tick)
	defer t.Stop()
	var held [][]byte
	var owed float64 // bytes due but not yet allocated, so low rates work
	var total int64
	for {
		select {
		case <-ctx.Done():
			runtime.KeepAlive(held)
			return
		case <-t.C:
		}
		owed += rate * mib * tick.Seconds()
		if owed < 4096 {
			continue
		}
		c := make([]byte, int(owed))
		owed -= float64(len(c))
		touch(c)
		held = append(held, c)
		total += int64(len(c))
		if grown != nil {
			grown(total)
		}
	}
}

// rssBytes reads VmRSS of the current process; 0 if unavailable.
func rssBytes() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				return 0
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0
			}
			return kb * 1024
		}
	}
	return 0
}
