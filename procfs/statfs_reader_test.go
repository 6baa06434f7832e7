package procfs

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A hung mount: callers time out, but only one statfs is ever blocked per
// path, and the next call after it answers runs a fresh one.
func TestDiskReaderOneStatfsInFlight(t *testing.T) {
	var calls atomic.Int32
	release := make(chan struct{})
	r := &DiskReader{statfs: func(path string) (DiskSpace, error) {
		calls.Add(1)
		<-release
		return DiskSpace{Path: path, TotalBytes: 1}, nil
	}}
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
			defer cancel()
			if _, err := r.Usage(ctx, "/models"); !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Usage on a hung mount = %v, want a deadline error", err)
			}
		}()
	}
	wg.Wait()
	if n := calls.Load(); n != 1 {
		t.Errorf("%d statfs calls blocked on one hung path, want 1", n)
	}
	close(release)
	deadline := time.Now().Add(5 * time.Second)
	for {
		d, err := r.Usage(context.Background(), "/models")
		if err != nil {
			t.Fatal(err)
		}
		if d.TotalBytes == 1 && calls.Load() == 2 {
			break // a fresh call after the hung one finished
		}
		if time.Now().After(deadline) {
			t.Fatalf("calls = %d after the mount answered, want a second, fresh statfs", calls.Load())
		}
		time.Sleep(time.Millisecond)
	}
}

func TestDiskReaderReal(t *testing.T) {
	var r DiskReader
	d, err := r.Usage(context.Background(), t.TempDir()+"/not/yet")
	if err != nil || d.TotalBytes == 0 || d.AvailableBytes > d.TotalBytes {
		t.Fatalf("Usage = %+v, %v", d, err)
	}
}
