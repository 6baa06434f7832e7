package model

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// benchFileMiB is the size fetched per iteration; RBEE_BENCH_MIB overrides it.
func benchFileMiB() int {
	var n int
	if _, err := fmt.Sscan(os.Getenv("RBEE_BENCH_MIB"), &n); err == nil && n > 0 {
		return n
	}
	return 256
}

// BenchmarkDownloadVsCurl fetches the same file from the same loopback
// server with the Store (redirect, stream to .incomplete, sha256, fsync,
// rename, catalog insert) and with curl -L -o, in the same run, and reports
// both throughputs and their ratio.
func BenchmarkDownloadVsCurl(b *testing.B) {
	curl := testkit.RequireCommand(b, "curl")
	size := benchFileMiB() * mib
	block := randomBytes(mib, 99)
	content := bytes.Repeat(block, size/mib)
	f := newFakeHub(b)
	f.add("org/bench@main", testFile{path: "m.gguf", content: content, lfs: true})
	url := f.hub.URL + "/org/bench/resolve/main/m.gguf"
	work := b.TempDir()

	var storeDur, curlDur, curlSyncDur time.Duration
	b.SetBytes(int64(size))
	b.ResetTimer()
	for i := range b.N {
		f.on("m.gguf", cdnBehaviour{chunk: mib}) // 1 MiB writes, no delay
		dir := filepath.Join(work, fmt.Sprintf("store-%d", i))
		ts := newTestStore(b, f, dir, func(o *Options) { o.Logger = nil })
		start := time.Now()
		ensureWait(b, ts, "hf:org/bench:m.gguf")
		storeDur += time.Since(start)
		ts.Close()
		b.StopTimer()
		_ = os.RemoveAll(dir)
		b.StartTimer()

		f.on("m.gguf", cdnBehaviour{chunk: mib})
		out := filepath.Join(work, fmt.Sprintf("curl-%d", i))
		start = time.Now()
		if msg, err := exec.Command(curl, "-sS", "-L", "-o", out, url).CombinedOutput(); err != nil {
			b.Fatalf("curl: %v: %s", err, msg)
		}
		curlDur += time.Since(start)
		// The Store fsyncs before its rename; curl does not. Time that
		// too, so the durable figures compare like with like.
		if err := fsyncFile(out); err != nil {
			b.Fatal(err)
		}
		curlSyncDur += time.Since(start)
		b.StopTimer()
		_ = os.Remove(out)
		b.StartTimer()
	}
	total := float64(size) * float64(b.N) / 1e6
	b.ReportMetric(total/storeDur.Seconds(), "store_MB/s")
	b.ReportMetric(total/curlDur.Seconds(), "curl_MB/s")
	b.ReportMetric(total/curlSyncDur.Seconds(), "curl+fsync_MB/s")
	b.ReportMetric(curlDur.Seconds()/storeDur.Seconds(), "store/curl")
	b.ReportMetric(curlSyncDur.Seconds()/storeDur.Seconds(), "store/curl+fsync")
}

func fsyncFile(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// BenchmarkCatalogConcurrent mixes the catalog operations the hive does per
// request (present lookup, Touch, Acquire/release, an occasional List) from
// parallel goroutines against 200 models.
func BenchmarkCatalogConcurrent(b *testing.B) {
	f := newFakeHub(b)
	ts := newTestStore(b, f, b.TempDir(), func(o *Options) { o.Logger = nil })
	ctx := context.Background()
	const models = 200
	dir := b.TempDir()
	for i := range models {
		p := filepath.Join(dir, fmt.Sprintf("m%d.gguf", i))
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			b.Fatal(err)
		}
		m := Model{Ref: fmt.Sprintf("hf:org/m%d@main", i), Provider: ProviderHF, Repo: fmt.Sprintf("org/m%d", i),
			Revision: "main", Files: []ModelFile{{Path: "m.gguf", Size: 1}}, LocalPath: p, SizeBytes: 1,
			DownloadedAt: time.Now().Unix(), lastUsedMS: time.Now().UnixMilli()}
		if err := ts.cat.put(ctx, m); err != nil {
			b.Fatal(err)
		}
	}
	var n atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := n.Add(1)
			ref := fmt.Sprintf("hf:org/m%d", i%models)
			switch i % 10 {
			case 0:
				if _, err := ts.List(ctx); err != nil {
					b.Error(err)
				}
			case 1, 2:
				if err := ts.Touch(ctx, ref); err != nil {
					b.Error(err)
				}
			case 3:
				ts.Acquire(ref)()
			default:
				if _, w, err := ts.Ensure(ctx, ref); err != nil || w != nil {
					b.Errorf("Ensure(%s) = %v, %v", ref, w, err)
				}
			}
		}
	})
}
