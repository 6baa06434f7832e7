package model

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/internal/testkit"
)

const mib = 1 << 20

func counter(t testing.TB, ts *testStore, name string, labels ...string) float64 {
	t.Helper()
	switch name {
	case "failures":
		return testutil.ToFloat64(ts.met.failures.WithLabelValues(labels...))
	case "bytes":
		return testutil.ToFloat64(ts.met.bytes)
	case "evictions":
		return testutil.ToFloat64(ts.met.evictions)
	case "disk":
		return testutil.ToFloat64(ts.met.diskBytes)
	case "inflight":
		return testutil.ToFloat64(ts.met.inFlight)
	}
	t.Fatalf("unknown metric %s", name)
	return 0
}

// ensureWait runs Ensure and waits for the download, failing the test on error.
func ensureWait(t testing.TB, ts *testStore, ref string) string {
	t.Helper()
	p, wait, err := ts.Ensure(context.Background(), ref)
	if err != nil {
		t.Fatalf("Ensure(%s): %v", ref, err)
	}
	if wait == nil {
		return p
	}
	r := waitResult(t, wait, 30*time.Second)
	if r.Err != nil {
		t.Fatalf("download %s: %v", ref, r.Err)
	}
	return r.LocalPath
}

func TestDownloadFull(t *testing.T) {
	f := newFakeHub(t)
	f.token = "hf_secret_token"
	content := randomBytes(3*mib+123, 1)
	f.add("org/repo@main",
		testFile{path: "README.md", content: []byte("# readme")},
		testFile{path: "model-q4.gguf", content: content, lfs: true},
		testFile{path: "model-q8.gguf", content: randomBytes(1000, 2), lfs: true},
	)
	ts := newTestStore(t, f, t.TempDir(), nil)

	path := ensureWait(t, ts, "hf:org/repo:model-q4.gguf")
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("downloaded file differs (err %v, %d bytes)", err, len(got))
	}
	if want := filepath.Join(ts.dir, "hf", "org", "repo", "main", "model-q4.gguf"); path != want {
		t.Fatalf("path %s, want %s", path, want)
	}
	if f.authSeen.Load() == 0 {
		t.Fatal("the hub never saw the token")
	}
	if n := f.cdnAuthLeaks.Load(); n != 0 {
		t.Fatalf("token sent to the CDN %d times across the redirect", n)
	}
	if f.treeHits.Load() != 2 {
		t.Fatalf("tree pages fetched %d, want 2 (paginated)", f.treeHits.Load())
	}
	ms, err := ts.List(context.Background())
	if err != nil || len(ms) != 1 {
		t.Fatalf("List = %v, %v", ms, err)
	}
	m := ms[0]
	if m.Ref != "hf:org/repo@main:model-q4.gguf" || m.SizeBytes != uint64(len(content)) || m.SHA256 != sha(content) ||
		m.LocalPath != path || m.DownloadedAt == 0 || len(m.Files) != 1 {
		t.Fatalf("catalog entry %+v", m)
	}
	if got := counter(t, ts, "bytes"); got != float64(len(content)) {
		t.Fatalf("bytes counter %v", got)
	}
	if got := counter(t, ts, "disk"); got != float64(len(content)) {
		t.Fatalf("disk gauge %v", got)
	}
	if _, err := os.Stat(path + incompleteSuffix); !os.IsNotExist(err) {
		t.Fatalf(".incomplete left behind: %v", err)
	}

	// Present now: no wait, no new request; the same model spelled another
	// way (explicit @main) is the same entry.
	hits := f.cdnHits.Load()
	p2, wait, err := ts.Ensure(context.Background(), "hf:org/repo@main:model-q4.gguf")
	if err != nil || wait != nil || p2 != path {
		t.Fatalf("second Ensure = %q, %v, %v", p2, wait, err)
	}
	if f.cdnHits.Load() != hits {
		t.Fatal("cached model fetched again")
	}
}

func TestDownloadSafetensorsRepo(t *testing.T) {
	f := newFakeHub(t)
	files := []testFile{
		{path: "config.json", content: []byte(`{"num_hidden_layers":2}`)},
		{path: "model-00001-of-00002.safetensors", content: randomBytes(300000, 3), lfs: true},
		{path: "model-00002-of-00002.safetensors", content: randomBytes(200000, 4), lfs: true},
		{path: "pytorch_model.bin", content: randomBytes(500000, 5), lfs: true},
		{path: "consolidated.safetensors", content: randomBytes(500000, 6), lfs: true},
		{path: "original/consolidated.00.pth", content: randomBytes(1000, 7), lfs: true},
		{path: "tokenizer.json", content: []byte(`{"v":1}`)},
		{path: "README.md", content: []byte("hi")},
	}
	f.add("org/st@main", files...)
	ts := newTestStore(t, f, t.TempDir(), nil)
	path := ensureWait(t, ts, "hf:org/st")
	if want := filepath.Join(ts.dir, "hf", "org", "st", "main"); path != want {
		t.Fatalf("path %s, want the revision directory %s", path, want)
	}
	var got []string
	_ = filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(path, p)
			got = append(got, rel)
		}
		return nil
	})
	want := "config.json,model-00001-of-00002.safetensors,model-00002-of-00002.safetensors,tokenizer.json"
	if strings.Join(got, ",") != want {
		t.Fatalf("files %v, want %s", got, want)
	}
	for _, tf := range files[:3] {
		b, _ := os.ReadFile(filepath.Join(path, tf.path))
		if !bytes.Equal(b, tf.content) {
			t.Fatalf("%s differs", tf.path)
		}
	}
}

func TestResumeAfterCutConnection(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(2*mib, 10)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	// The first response is cut after 700 KiB (the connection is closed).
	f.on("m.gguf", cdnBehaviour{dropAfter: 700 << 10})
	ts := newTestStore(t, f, t.TempDir(), nil)
	path := ensureWait(t, ts, "hf:org/repo:m.gguf")
	if b, _ := os.ReadFile(path); !bytes.Equal(b, content) {
		t.Fatal("resumed file differs")
	}
	rs := f.rangesSeen()
	if len(rs) != 2 || rs[0] != "" || rs[1] != "bytes=716800-" {
		t.Fatalf("CDN Range headers %q, want [\"\" \"bytes=716800-\"]", rs)
	}
	if got := counter(t, ts, "bytes"); got != float64(len(content)) {
		t.Fatalf("bytes counter %v, want %d (no byte fetched twice)", got, len(content))
	}
}

func TestRangeIgnoredRestartsFile(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(1*mib, 20)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	// Cut at 300 KiB, then a server that ignores Range: the file must be
	// restarted, not appended to.
	f.on("m.gguf", cdnBehaviour{dropAfter: 300 << 10}, cdnBehaviour{noRange: true})
	ts := newTestStore(t, f, t.TempDir(), nil)
	path := ensureWait(t, ts, "hf:org/repo:m.gguf")
	if b, _ := os.ReadFile(path); !bytes.Equal(b, content) {
		t.Fatal("file differs after a 200 answer to Range")
	}
	if rs := f.rangesSeen(); len(rs) != 2 || rs[1] != "bytes=307200-" {
		t.Fatalf("ranges %q", rs)
	}
}

func TestSharedFileOneWriter(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(1*mib, 21)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	f.on("m.gguf", cdnBehaviour{chunk: 128 << 10, delay: 20 * time.Millisecond})
	ts := newTestStore(t, f, t.TempDir(), nil)
	// Two different refs, one file: each is its own download, but only one
	// writes the file; the other waits and verifies it.
	var wg sync.WaitGroup
	paths := make([]string, 2)
	for i, ref := range []string{"hf:org/repo", "hf:org/repo:m.gguf"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i] = ensureWait(t, ts, ref)
		}()
	}
	wg.Wait()
	if paths[0] != paths[1] {
		t.Fatalf("paths %v", paths)
	}
	if b, _ := os.ReadFile(paths[0]); !bytes.Equal(b, content) {
		t.Fatal("shared file differs")
	}
	if h := f.cdnHits.Load(); h != 1 {
		t.Fatalf("CDN hits %d, want 1", h)
	}
}

func TestRedactURL(t *testing.T) {
	err := &url.Error{Op: "Get", URL: "https://cdn.example/blob?X-Amz-Signature=secret&X-Amz-Credential=k", Err: io.ErrUnexpectedEOF}
	got := redactURL(fmt.Errorf("x: %w", err))
	if strings.Contains(got.Error(), "secret") || !errors.Is(got, io.ErrUnexpectedEOF) {
		t.Fatalf("redactURL = %v", got)
	}
}

func TestResumeAfterRestart(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(2*mib, 11)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	f.on("m.gguf", cdnBehaviour{stallAfter: 1 << 20})
	dir := t.TempDir()
	ts := newTestStore(t, f, dir, nil)
	_, wait, err := ts.Ensure(context.Background(), "hf:org/repo:m.gguf")
	if err != nil {
		t.Fatal(err)
	}
	part := filepath.Join(dir, "hf", "org", "repo", "main", "m.gguf") + incompleteSuffix
	deadline := time.Now().Add(10 * time.Second)
	for {
		if st, err := os.Stat(part); err == nil && st.Size() == 1<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("partial file never reached 1 MiB")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The hive stops mid-download.
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	r := waitResult(t, wait, 5*time.Second)
	if r.Err == nil || api.AsError(r.Err).Status != http.StatusServiceUnavailable {
		t.Fatalf("result after Close = %+v, want a 503 cancel", r)
	}
	if counter(t, ts, "failures", ReasonNetwork) != 0 {
		t.Fatal("shutdown counted as a failure")
	}
	if st, err := os.Stat(part); err != nil || st.Size() != 1<<20 {
		t.Fatalf("partial file after Close: %v %v", st, err)
	}

	// A new hive resumes from the partial file with Range.
	ts2 := newTestStore(t, f, dir, nil)
	path := ensureWait(t, ts2, "hf:org/repo:m.gguf")
	if b, _ := os.ReadFile(path); !bytes.Equal(b, content) {
		t.Fatal("resumed file differs")
	}
	rs := f.rangesSeen()
	if rs[len(rs)-1] != "bytes=1048576-" {
		t.Fatalf("CDN Range headers %q", rs)
	}
	if got := counter(t, ts2, "bytes"); got != float64(len(content)-1<<20) {
		t.Fatalf("second hive fetched %v bytes, want %d", got, len(content)-1<<20)
	}
}

func TestChecksumMismatch(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(500000, 12)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true, sha: strings.Repeat("ab", 32)})
	ts := newTestStore(t, f, t.TempDir(), nil)
	_, wait, err := ts.Ensure(context.Background(), "hf:org/repo:m.gguf")
	if err != nil {
		t.Fatal(err)
	}
	r := waitResult(t, wait, 10*time.Second)
	if r.Err == nil || !strings.Contains(r.Err.Error(), "checksum mismatch") {
		t.Fatalf("result %+v, want checksum mismatch", r)
	}
	if got := counter(t, ts, "failures", ReasonChecksum); got != 1 {
		t.Fatalf("checksum failures %v", got)
	}
	if ms, _ := ts.List(context.Background()); len(ms) != 0 {
		t.Fatalf("catalog holds %v after a checksum failure", ms)
	}
	base := filepath.Join(ts.dir, "hf", "org", "repo", "main")
	for _, p := range []string{"m.gguf", "m.gguf" + incompleteSuffix} {
		if _, err := os.Stat(filepath.Join(base, p)); !os.IsNotExist(err) {
			t.Fatalf("%s left behind: %v", p, err)
		}
	}
}

func TestDiskTooSmallRefusedBeforeWriting(t *testing.T) {
	dir := testkit.MountTmpfs(t, "4m")
	f := newFakeHub(t)
	f.add("org/repo@main", testFile{path: "big.gguf", content: randomBytes(6*mib, 13), lfs: true})
	ts := newTestStore(t, f, dir, func(o *Options) {
		o.CatalogPath = filepath.Join(t.TempDir(), "catalog.db")
	})
	_, wait, err := ts.Ensure(context.Background(), "hf:org/repo:big.gguf")
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusInsufficientStorage || ae.Code != api.CodeInsufficientDisk || wait != nil {
		t.Fatalf("Ensure = %v (wait %v), want 507 INSUFFICIENT_DISK", err, wait)
	}
	if ae.Details["needed_bytes"] != uint64(6*mib) {
		t.Fatalf("details %v", ae.Details)
	}
	if f.cdnHits.Load() != 0 {
		t.Fatal("a byte was requested before admission")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("model dir not empty: %v", ents)
	}
	if got := counter(t, ts, "failures", ReasonDisk); got != 1 {
		t.Fatalf("disk failures %v", got)
	}

	// Over HTTP it is the same 507 envelope.
	srv := newAPIServer(t, ts)
	resp := postJSON(t, srv.URL+"/v1/models/download", `{"model_ref":"hf:org/repo:big.gguf"}`)
	var env struct {
		Error struct {
			Code    string         `json:"code"`
			Details map[string]any `json:"details"`
		} `json:"error"`
	}
	decodeBody(t, resp, http.StatusInsufficientStorage, &env)
	if env.Error.Code != api.CodeInsufficientDisk || env.Error.Details["available_bytes"] == nil {
		t.Fatalf("envelope %+v", env)
	}
}

func TestDiskFillsUpMidDownload(t *testing.T) {
	dir := testkit.MountTmpfs(t, "4m")
	f := newFakeHub(t)
	content := randomBytes(2*mib, 14)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	// Admission passes (2 MiB of 4), then another writer takes 3 MiB.
	filler := filepath.Join(dir, "other-writer")
	f.on("m.gguf", cdnBehaviour{before: func() {
		if err := os.WriteFile(filler, make([]byte, 3*mib), 0o600); err != nil {
			t.Errorf("filler: %v", err)
		}
	}})
	ts := newTestStore(t, f, dir, func(o *Options) {
		o.CatalogPath = filepath.Join(t.TempDir(), "catalog.db")
	})
	_, wait, err := ts.Ensure(context.Background(), "hf:org/repo:m.gguf")
	if err != nil {
		t.Fatal(err)
	}
	r := waitResult(t, wait, 10*time.Second)
	var ae *api.Error
	if !errors.As(r.Err, &ae) || ae.Status != http.StatusInsufficientStorage {
		t.Fatalf("result %+v, want 507", r)
	}
	if got := counter(t, ts, "failures", ReasonDisk); got != 1 {
		t.Fatalf("disk failures %v", got)
	}
	if ms, _ := ts.List(context.Background()); len(ms) != 0 {
		t.Fatalf("half-registered: %v", ms)
	}
	base := filepath.Join(dir, "hf", "org", "repo", "main")
	for _, p := range []string{"m.gguf", "m.gguf" + incompleteSuffix} {
		if _, err := os.Stat(filepath.Join(base, p)); !os.IsNotExist(err) {
			t.Fatalf("%s left behind: %v", p, err)
		}
	}
}

func TestConcurrentSameRefDownloadsOnce(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(1*mib, 15)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	f.on("m.gguf", cdnBehaviour{chunk: 128 << 10, delay: 20 * time.Millisecond})
	ts := newTestStore(t, f, t.TempDir(), nil)
	srv := newAPIServer(t, ts)

	const n = 8
	var wg sync.WaitGroup
	paths := make([]string, n)
	ids := make([]string, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				paths[i] = ensureWait(t, ts, "hf:org/repo:m.gguf")
				return
			}
			var dr DownloadResponse
			decodeBody(t, postJSON(t, srv.URL+"/v1/models/download", `{"model_ref":"hf:org/repo@main:m.gguf"}`), http.StatusOK, &dr)
			ids[i] = dr.DownloadID
		}()
	}
	wg.Wait()
	if h := f.cdnHits.Load(); h != 1 {
		t.Fatalf("CDN hit %d times, want 1", h)
	}
	if h := f.treeHits.Load(); h != 1 {
		t.Fatalf("tree listed %d times, want 1", h)
	}
	for i := 0; i < n; i += 2 {
		if paths[i] != paths[0] || paths[0] == "" {
			t.Fatalf("paths %v", paths)
		}
	}
	for i := 1; i < n; i += 2 {
		if ids[i] != ids[1] && ids[i] != "cached" {
			t.Fatalf("download ids %v: want one shared id", ids)
		}
	}
}

func TestRetentionEvictsLRUNeverInUse(t *testing.T) {
	f := newFakeHub(t)
	for _, name := range []string{"a", "b", "c", "d"} {
		f.add("org/"+name+"@main", testFile{path: name + ".gguf", content: randomBytes(400000, uint64(name[0])), lfs: true})
	}
	// Room for two models of 400 000 bytes.
	ts := newTestStore(t, f, t.TempDir(), func(o *Options) { o.MaxBytes = 900000 })
	pa := ensureWait(t, ts, "hf:org/a")
	release := ts.Acquire("hf:org/a") // a worker runs a: the oldest, but in use
	time.Sleep(5 * time.Millisecond)
	pb := ensureWait(t, ts, "hf:org/b")
	time.Sleep(5 * time.Millisecond)
	pc := ensureWait(t, ts, "hf:org/c") // must evict b, not a
	if _, err := os.Stat(pa); err != nil {
		t.Fatalf("in-use model a evicted: %v", err)
	}
	if _, err := os.Stat(pb); !os.IsNotExist(err) {
		t.Fatalf("LRU model b still on disk: %v", err)
	}
	if _, err := os.Stat(pc); err != nil {
		t.Fatal(err)
	}
	if got := counter(t, ts, "evictions"); got != 1 {
		t.Fatalf("evictions %v", got)
	}
	refs := func() string {
		ms, _ := ts.List(context.Background())
		var r []string
		for _, m := range ms {
			r = append(r, m.Ref)
		}
		return strings.Join(r, ",")
	}
	if got := refs(); got != "hf:org/a@main,hf:org/c@main" {
		t.Fatalf("catalog %s", got)
	}
	// Released, a is now least recently used... but release touched it; c
	// was used before that release, so c goes.
	time.Sleep(5 * time.Millisecond)
	release()
	time.Sleep(5 * time.Millisecond)
	ensureWait(t, ts, "hf:org/d")
	if got := refs(); got != "hf:org/a@main,hf:org/d@main" {
		t.Fatalf("catalog after d: %s", got)
	}
	if got := counter(t, ts, "disk"); got != 800000 {
		t.Fatalf("disk gauge %v", got)
	}
}

func TestFileRef(t *testing.T) {
	f := newFakeHub(t)
	root := t.TempDir()
	ts := newTestStore(t, f, t.TempDir(), func(o *Options) { o.FileRoots = []string{root} })
	file := filepath.Join(root, "local.gguf")
	if err := os.WriteFile(file, []byte("gguf"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, wait, err := ts.Ensure(context.Background(), "file:"+file)
	if err != nil || wait != nil || p != file {
		t.Fatalf("Ensure(file:) = %q %v %v", p, wait, err)
	}
	_, _, err = ts.Ensure(context.Background(), "file:"+file+"-missing")
	if api.AsError(err).Status != http.StatusNotFound {
		t.Fatalf("missing file: %v", err)
	}
	if f.treeHits.Load()+f.cdnHits.Load() != 0 {
		t.Fatal("file: ref touched the network")
	}
}

func TestUpstreamErrors(t *testing.T) {
	f := newFakeHub(t)
	f.add("org/repo@main", testFile{path: "m.gguf", content: []byte("x"), lfs: true})
	ts := newTestStore(t, f, t.TempDir(), nil)
	tests := []struct {
		ref    string
		token  string
		status int
		reason string
	}{
		{"hf:org/missing", "", http.StatusNotFound, ReasonNotFound},
		{"hf:org/repo@v9", "", http.StatusNotFound, ReasonNotFound},
		{"hf:org/repo:nope.gguf", "", http.StatusNotFound, ReasonNotFound},
		{"hf:org/repo:m.gguf", "needed", http.StatusBadGateway, ReasonAuth},
	}
	for _, tc := range tests {
		t.Run(tc.ref, func(t *testing.T) {
			f.token = tc.token
			defer func() { f.token = "" }()
			before := counter(t, ts, "failures", tc.reason)
			_, _, err := ts.Ensure(context.Background(), tc.ref)
			if ae := api.AsError(err); err == nil || ae.Status != tc.status {
				t.Fatalf("Ensure = %v, want %d", err, tc.status)
			}
			if counter(t, ts, "failures", tc.reason) != before+1 {
				t.Fatalf("failure %s not counted", tc.reason)
			}
		})
	}
}

func TestStalledDownloadFails(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(1*mib, 16)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	f.on("m.gguf", cdnBehaviour{stallAfter: 100 << 10})
	const stall = 300 * time.Millisecond
	ts := newTestStore(t, f, t.TempDir(), func(o *Options) { o.StallTimeout = stall })
	start := time.Now()
	_, wait, err := ts.Ensure(context.Background(), "hf:org/repo:m.gguf")
	if err != nil {
		t.Fatal(err)
	}
	r := waitResult(t, wait, 10*time.Second)
	el := time.Since(start)
	if r.Err == nil || !strings.Contains(r.Err.Error(), "stalled") {
		t.Fatalf("result %+v, want stalled", r)
	}
	if el < stall || el > stall+2*time.Second {
		t.Fatalf("stall detected after %s (timeout %s)", el, stall)
	}
	if got := counter(t, ts, "failures", ReasonStalled); got != 1 {
		t.Fatalf("stalled failures %v", got)
	}
	// The partial file stays for a later resume.
	if st, err := os.Stat(filepath.Join(ts.dir, "hf", "org", "repo", "main", "m.gguf") + incompleteSuffix); err != nil || st.Size() != 100<<10 {
		t.Fatalf("partial: %v %v", st, err)
	}
}

// --- HTTP -----------------------------------------------------------------

func newAPIServer(t testing.TB, ts *testStore) *httptest.Server {
	rt := api.NewRouter(testLogger(t))
	auth := api.Authenticator{Token: "api-token"}
	err := rt.Register(auth.Check,
		api.Route{Pattern: "POST /v1/models/download", Auth: api.AuthToken, Handler: api.Plain(http.HandlerFunc(ts.HandleDownload))},
		api.Route{Pattern: "GET /v1/models/download/progress", Auth: api.AuthToken, Handler: api.Plain(http.HandlerFunc(ts.HandleProgress))},
		api.Route{Pattern: "GET /v1/models", Auth: api.AuthToken, Handler: api.Plain(http.HandlerFunc(ts.HandleList))},
		api.Route{Pattern: "DELETE /v1/models/{ref...}", Auth: api.AuthToken, Handler: api.Plain(http.HandlerFunc(ts.HandleDelete))})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(rt)
	t.Cleanup(srv.Close)
	return srv
}

func authed(t testing.TB, method, u string, body io.Reader) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer api-token")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func postJSON(t testing.TB, u, body string) *http.Response {
	return authed(t, http.MethodPost, u, strings.NewReader(body))
}

func decodeBody(t testing.TB, resp *http.Response, status int, v any) {
	t.Helper()
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != status {
		t.Fatalf("status %d, want %d: %s", resp.StatusCode, status, b)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
}

func TestHTTPBadRefs(t *testing.T) {
	f := newFakeHub(t)
	ts := newTestStore(t, f, t.TempDir(), nil)
	srv := newAPIServer(t, ts)
	for _, ref := range []string{"", "hf:../x", "hf:a;rm", strings.Repeat("a", 600), "s3:x", "hf:a/b@x y"} {
		body, _ := json.Marshal(DownloadRequest{ModelRef: ref})
		var env struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		decodeBody(t, postJSON(t, srv.URL+"/v1/models/download", string(body)), http.StatusBadRequest, &env)
		if env.Error.Code != api.CodeValidation || !strings.HasPrefix(env.Error.Message, "Invalid model_ref: ") {
			t.Errorf("%q: %+v", ref, env)
		}
	}
	if f.treeHits.Load() != 0 {
		t.Fatal("a bad ref reached the hub")
	}
	// Unauthenticated requests never get in.
	resp, err := http.Post(srv.URL+"/v1/models/download", "application/json", strings.NewReader(`{"model_ref":"hf:a/b"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("no token: %d", resp.StatusCode)
	}
}

// sseEvents reads a whole progress stream, returning raw data payloads and
// whether a keep-alive comment was seen.
func sseEvents(t testing.TB, srv, id string) (events []string, keepAlive bool) {
	t.Helper()
	resp := authed(t, http.MethodGet, srv+"/v1/models/download/progress?id="+url.QueryEscape(id), nil)
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("progress: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "data: "); ok {
			events = append(events, p)
		}
		if strings.HasPrefix(line, ": keep-alive") {
			keepAlive = true
		}
	}
	var n int
	if err := ReadProgress(bytes.NewReader(b), func(Progress) { n++ }); err != nil {
		t.Fatalf("ReadProgress on the real stream: %v", err)
	}
	return events, keepAlive
}

func TestProgressSSE(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(1*mib, 17)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	// 16 chunks, 60 ms apart: about a second of visible progress, with a
	// pause long enough for a keep-alive.
	f.on("m.gguf", cdnBehaviour{chunk: 64 << 10, delay: 60 * time.Millisecond})
	ts := newTestStore(t, f, t.TempDir(), nil)
	ts.keepAlive = 50 * time.Millisecond
	srv := newAPIServer(t, ts)

	var dr DownloadResponse
	decodeBody(t, postJSON(t, srv.URL+"/v1/models/download", `{"model_ref":"hf:org/repo:m.gguf"}`), http.StatusOK, &dr)
	if dr.DownloadID == "" || dr.DownloadID == "cached" || dr.LocalPath != nil {
		t.Fatalf("response %+v", dr)
	}
	events, keepAlive := sseEvents(t, srv.URL, dr.DownloadID)
	if len(events) < 3 || events[len(events)-1] != "[DONE]" {
		t.Fatalf("events %v", events)
	}
	if !keepAlive {
		t.Error("no keep-alive comment in the stream")
	}
	var prev uint64
	for i, e := range events[:len(events)-1] {
		var raw map[string]any
		if err := json.Unmarshal([]byte(e), &raw); err != nil {
			t.Fatal(err)
		}
		last := i == len(events)-2
		if last {
			want := filepath.Join(ts.dir, "hf", "org", "repo", "main", "m.gguf")
			if len(raw) != 2 || raw["stage"] != "complete" || raw["local_path"] != want {
				t.Fatalf("terminal event %s", e)
			}
			continue
		}
		if len(raw) != 4 || raw["stage"] != "downloading" || raw["bytes_total"] != float64(len(content)) {
			t.Fatalf("progress event %s", e)
		}
		if _, ok := raw["speed_mbps"].(float64); !ok {
			t.Fatalf("speed_mbps missing: %s", e)
		}
		got := uint64(raw["bytes_downloaded"].(float64))
		if got < prev {
			t.Fatalf("bytes went backwards: %v", events)
		}
		prev = got
	}

	// A late subscriber gets the outcome at once, then [DONE].
	late, _ := sseEvents(t, srv.URL, dr.DownloadID)
	if len(late) != 2 || !strings.Contains(late[0], `"stage":"complete"`) || late[1] != "[DONE]" {
		t.Fatalf("late subscriber got %v", late)
	}
	// Now cached.
	decodeBody(t, postJSON(t, srv.URL+"/v1/models/download", `{"model_ref":"hf:org/repo:m.gguf"}`), http.StatusOK, &dr)
	if dr.DownloadID != "cached" || dr.LocalPath == nil {
		t.Fatalf("second request %+v", dr)
	}
	// Unknown id: 404 JSON.
	var env struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	decodeBody(t, authed(t, http.MethodGet, srv.URL+"/v1/models/download/progress?id=nope", nil), http.StatusNotFound, &env)
	if env.Error.Code != api.CodeNotFound || env.Error.Message != "Download nope not found" {
		t.Fatalf("unknown id: %+v", env)
	}
}

func TestProgressSSEError(t *testing.T) {
	f := newFakeHub(t)
	f.add("org/repo@main", testFile{path: "m.gguf", content: randomBytes(100000, 18), lfs: true, sha: strings.Repeat("0", 64)})
	f.on("m.gguf", cdnBehaviour{chunk: 10000, delay: 10 * time.Millisecond})
	ts := newTestStore(t, f, t.TempDir(), nil)
	srv := newAPIServer(t, ts)
	var dr DownloadResponse
	decodeBody(t, postJSON(t, srv.URL+"/v1/models/download", `{"model_ref":"hf:org/repo:m.gguf"}`), http.StatusOK, &dr)
	resp := authed(t, http.MethodGet, srv.URL+"/v1/models/download/progress?id="+dr.DownloadID, nil)
	defer resp.Body.Close()
	var stages []string
	err := ReadProgress(resp.Body, func(p Progress) { stages = append(stages, p.Stage) })
	var de *DownloadError
	if !errors.As(err, &de) || !strings.Contains(de.Message, "checksum mismatch") {
		t.Fatalf("ReadProgress = %v", err)
	}
	if stages[len(stages)-1] != StageError {
		t.Fatalf("stages %v", stages)
	}
}

func TestHTTPListAndDelete(t *testing.T) {
	f := newFakeHub(t)
	f.add("org/repo@main", testFile{path: "m.gguf", content: randomBytes(1000, 19), lfs: true})
	ts := newTestStore(t, f, t.TempDir(), nil)
	srv := newAPIServer(t, ts)
	path := ensureWait(t, ts, "hf:org/repo:m.gguf")
	// The same file is also the whole-repo model: deleting one keeps it.
	if p := ensureWait(t, ts, "hf:org/repo"); p != path {
		t.Fatalf("whole-repo path %s", p)
	}
	if _, err := ts.Delete(context.Background(), "hf:org/repo"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("shared file deleted: %v", err)
	}

	var lr ListResponse
	decodeBody(t, authed(t, http.MethodGet, srv.URL+"/v1/models", nil), http.StatusOK, &lr)
	if len(lr.Models) != 1 || lr.Models[0].Ref != "hf:org/repo@main:m.gguf" || lr.Models[0].InUse != 0 {
		t.Fatalf("list %+v", lr)
	}

	release := ts.Acquire("hf:org/repo:m.gguf")
	del := srv.URL + "/v1/models/" + url.PathEscape("hf:org/repo:m.gguf")
	var env struct {
		Error struct{ Code string } `json:"error"`
	}
	decodeBody(t, authed(t, http.MethodDelete, del, nil), http.StatusConflict, &env)
	if env.Error.Code != api.CodeConflict {
		t.Fatalf("in-use delete: %+v", env)
	}
	decodeBody(t, authed(t, http.MethodGet, srv.URL+"/v1/models", nil), http.StatusOK, &lr)
	if lr.Models[0].InUse != 1 {
		t.Fatalf("in_use %d", lr.Models[0].InUse)
	}
	release()
	release() // idempotent
	var dr DeleteResponse
	decodeBody(t, authed(t, http.MethodDelete, del, nil), http.StatusOK, &dr)
	if dr.Ref != "hf:org/repo@main:m.gguf" || dr.FreedBytes != 1000 {
		t.Fatalf("delete %+v", dr)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("file still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(ts.dir, "hf")); !os.IsNotExist(err) {
		t.Fatalf("empty dirs not pruned: %v", err)
	}
	decodeBody(t, authed(t, http.MethodDelete, del, nil), http.StatusNotFound, &env)
	// Plain (unescaped) slashes work too, and bad refs are 400.
	decodeBody(t, authed(t, http.MethodDelete, srv.URL+"/v1/models/hf:org/repo:m.gguf", nil), http.StatusNotFound, &env)
	decodeBody(t, authed(t, http.MethodDelete, srv.URL+"/v1/models/"+url.PathEscape("s3:x"), nil), http.StatusBadRequest, &env)
}

func TestMetricsLint(t *testing.T) {
	f := newFakeHub(t)
	ts := newTestStore(t, f, t.TempDir(), nil)
	problems, err := testutil.GatherAndLint(ts.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	n, err := testutil.GatherAndCount(ts.reg)
	if err != nil || n < 5 {
		t.Fatalf("gathered %d series: %v", n, err)
	}
}

func TestReadProgress(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		stages []string
		err    string
	}{
		{"complete", ": keep-alive\n\ndata: {\"stage\":\"downloading\",\"bytes_downloaded\":1,\"bytes_total\":2,\"speed_mbps\":0.5}\n\ndata: {\"stage\":\"complete\",\"local_path\":\"/m\"}\n\ndata: [DONE]\n\n",
			[]string{"downloading", "complete"}, ""},
		{"error", "data: {\"stage\":\"error\",\"message\":\"boom\"}\n\ndata: [DONE]\n\n", []string{"error"}, "model download failed: boom"},
		{"cut", "data: {\"stage\":\"downloading\",\"bytes_downloaded\":1,\"bytes_total\":2,\"speed_mbps\":0}\n\n", []string{"downloading"}, "unexpected EOF"},
		{"garbage", "data: {nope\n\n", nil, "bad progress event"},
		{"DONE without complete", "data: {\"stage\":\"downloading\",\"bytes_downloaded\":1,\"bytes_total\":2,\"speed_mbps\":0}\n\ndata: [DONE]\n\n",
			[]string{"downloading"}, "unexpected EOF"},
		{"DONE alone", "data: [DONE]\n\n", nil, "unexpected EOF"},
		{"crlf-free multi-line data ignored fields", "data: {\"stage\":\"complete\",\n data\ndata: \"local_path\":\"/x\",\"extra\":1}\n\ndata: [DONE]\n\n", []string{"complete"}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stages []string
			err := ReadProgress(strings.NewReader(tc.in), func(p Progress) { stages = append(stages, p.Stage) })
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("err %v, want %q", err, tc.err)
			}
			if strings.Join(stages, ",") != strings.Join(tc.stages, ",") {
				t.Fatalf("stages %v, want %v", stages, tc.stages)
			}
		})
	}
}

func TestCatalogEntryWithMissingFilesDownloadsAgain(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(100000, 22)
	f.add("org/st@main",
		testFile{path: "config.json", content: []byte(`{}`)},
		testFile{path: "model.safetensors", content: content, lfs: true})
	ts := newTestStore(t, f, t.TempDir(), nil)
	dir := ensureWait(t, ts, "hf:org/st")
	// Truncated by hand: the directory still exists, one file is wrong.
	if err := os.Truncate(filepath.Join(dir, "model.safetensors"), 10); err != nil {
		t.Fatal(err)
	}
	p, wait, err := ts.Ensure(context.Background(), "hf:org/st")
	if err != nil || wait == nil {
		t.Fatalf("Ensure after truncation = %q, %v, %v; want a new download", p, wait, err)
	}
	if r := waitResult(t, wait, 10*time.Second); r.Err != nil {
		t.Fatal(r.Err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "model.safetensors")); !bytes.Equal(b, content) {
		t.Fatal("file not restored")
	}
}

func TestCorruptPartialIsDownloadedAgain(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(1*mib, 23)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	dir := t.TempDir()
	base := filepath.Join(dir, "hf", "org", "repo", "main")
	if err := os.MkdirAll(base, 0o755); err != nil {
		t.Fatal(err)
	}
	// A torn partial from a crashed hive: right length, wrong bytes.
	if err := os.WriteFile(filepath.Join(base, "m.gguf"+incompleteSuffix), make([]byte, 500000), 0o644); err != nil {
		t.Fatal(err)
	}
	ts := newTestStore(t, f, dir, nil)
	path := ensureWait(t, ts, "hf:org/repo:m.gguf")
	if b, _ := os.ReadFile(path); !bytes.Equal(b, content) {
		t.Fatal("file differs")
	}
	if rs := f.rangesSeen(); len(rs) != 2 || rs[0] != "bytes=500000-" || rs[1] != "" {
		t.Fatalf("ranges %q, want a resume then a full download", rs)
	}
	if got := counter(t, ts, "failures", ReasonChecksum); got != 0 {
		t.Fatalf("checksum failures %v", got)
	}
}

// rtFunc is an http.RoundTripper from a function.
type rtFunc func(*http.Request) (*http.Response, error)

func (f rtFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// The token goes only to the endpoint's own scheme and host: a Link or a
// redirect from https to http on the same host must not carry it in clear.
func TestTokenNeverSentOverHTTPDowngrade(t *testing.T) {
	content := randomBytes(1000, 21)
	var mu sync.Mutex
	auth := map[string]string{} // URL → Authorization seen
	rt := rtFunc(func(r *http.Request) (*http.Response, error) {
		mu.Lock()
		auth[r.URL.String()] = r.Header.Get("Authorization")
		mu.Unlock()
		resp := &http.Response{StatusCode: http.StatusOK, Header: http.Header{}, Request: r, Body: io.NopCloser(strings.NewReader(""))}
		switch {
		case r.URL.Path == "/api/models/o/r/tree/main" && r.URL.Query().Get("cursor") == "":
			resp.Header.Set("Link", `<http://hub.test/api/models/o/r/tree/main?recursive=true&cursor=1>; rel="next"`)
			resp.Body = io.NopCloser(strings.NewReader(fmt.Sprintf(`[{"type":"file","path":"m.gguf","size":%d,"lfs":{"oid":%q,"size":%d}}]`,
				len(content), sha(content), len(content))))
		case r.URL.Path == "/api/models/o/r/tree/main":
			resp.Body = io.NopCloser(strings.NewReader(`[]`))
		case r.URL.Path == "/o/r/resolve/main/m.gguf":
			resp.StatusCode = http.StatusFound
			resp.Header.Set("Location", "http://hub.test/blob/m.gguf")
		case r.URL.Path == "/blob/m.gguf":
			resp.Body = io.NopCloser(bytes.NewReader(content))
		default:
			resp.StatusCode = http.StatusNotFound
		}
		return resp, nil
	})
	s, err := New(Options{Dir: t.TempDir(), Endpoint: "https://hub.test", Token: "hf_secret",
		HTTPClient: &http.Client{Transport: rt}, Logger: testLogger(t), DiskChecker: func(string, uint64, uint64) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, wait, err := s.Ensure(t.Context(), "hf:o/r:m.gguf")
	if err != nil {
		t.Fatal(err)
	}
	if r := waitResult(t, wait, 10*time.Second); r.Err != nil {
		t.Fatal(r.Err)
	}
	mu.Lock()
	defer mu.Unlock()
	var https int
	for u, a := range auth {
		switch {
		case strings.HasPrefix(u, "http:") && a != "":
			t.Errorf("token sent in clear to %s", u)
		case strings.HasPrefix(u, "https:") && a == "Bearer hf_secret":
			https++
		}
	}
	if https != 2 { // the first tree page and the resolve request
		t.Errorf("token sent on %d https requests, want 2 (seen %v)", https, auth)
	}
}

// A caller that leaves while the repo is listed must not fail the callers
// that joined its listing: they list again themselves.
func TestJoinerSurvivesFirstCallerLeaving(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(64<<10, 22)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	listing := make(chan struct{})
	var first atomic.Bool
	tr := http.DefaultTransport.(*http.Transport).Clone()
	t.Cleanup(tr.CloseIdleConnections)
	rt := rtFunc(func(r *http.Request) (*http.Response, error) {
		if strings.Contains(r.URL.Path, "/tree/") && first.CompareAndSwap(false, true) {
			close(listing)
			<-r.Context().Done() // the first listing hangs until its caller leaves
			return nil, r.Context().Err()
		}
		return tr.RoundTrip(r)
	})
	ts := newTestStore(t, f, t.TempDir(), func(o *Options) { o.HTTPClient = &http.Client{Transport: rt} })

	ctx1, cancel1 := context.WithCancel(context.Background())
	err1 := make(chan error, 1)
	go func() { _, _, err := ts.Ensure(ctx1, "hf:org/repo:m.gguf"); err1 <- err }()
	<-listing
	type res struct {
		wait <-chan Result
		err  error
	}
	second := make(chan res, 1)
	go func() { _, w, err := ts.Ensure(context.Background(), "hf:org/repo:m.gguf"); second <- res{w, err} }()
	time.Sleep(100 * time.Millisecond) // let the second caller join the listing
	cancel1()
	if err := <-err1; err == nil {
		t.Fatal("the first caller's Ensure succeeded after its ctx ended")
	}
	r := <-second
	if r.err != nil {
		t.Fatalf("joined caller failed with the first caller's cancellation: %v", r.err)
	}
	if got := waitResult(t, r.wait, 10*time.Second); got.Err != nil {
		t.Fatal(got.Err)
	}
	if n := counter(t, ts, "failures", ReasonNetwork) + counter(t, ts, "failures", ReasonInternal); n != 0 {
		t.Errorf("failures counted: %v", n)
	}
}

// A file the listing gives no hash for cannot be verified at the end, so a
// partial of it is never trusted: it is fetched whole.
func TestUnverifiablePartialIsNotResumed(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(300000, 24)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content})
	f.repos["org/repo@main"][0].oid = "" // no git oid: nothing to verify against
	dir := t.TempDir()
	base := filepath.Join(dir, "hf", "org", "repo", "main")
	if err := os.MkdirAll(base, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(base, "m.gguf"+incompleteSuffix), make([]byte, 100000), 0o644); err != nil {
		t.Fatal(err)
	}
	ts := newTestStore(t, f, dir, nil)
	path := ensureWait(t, ts, "hf:org/repo:m.gguf")
	if b, _ := os.ReadFile(path); !bytes.Equal(b, content) {
		t.Fatal("a torn partial was resumed: the file differs")
	}
}

// A symlink planted at a partial's name must not redirect the download's
// writes outside the model directory.
func TestSymlinkedPartialIsNotFollowed(t *testing.T) {
	f := newFakeHub(t)
	content := randomBytes(200000, 25)
	f.add("org/repo@main", testFile{path: "m.gguf", content: content, lfs: true})
	dir := t.TempDir()
	base := filepath.Join(dir, "hf", "org", "repo", "main")
	if err := os.MkdirAll(base, 0o755); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(base, "m.gguf"+incompleteSuffix)); err != nil {
		t.Fatal(err)
	}
	ts := newTestStore(t, f, dir, nil)
	path := ensureWait(t, ts, "hf:org/repo:m.gguf")
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Fatalf("the download wrote through the symlink: victim is now %d bytes", len(b))
	}
	if st, err := os.Lstat(path); err != nil || !st.Mode().IsRegular() {
		t.Fatalf("model file %s: %v %v", path, st, err)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, content) {
		t.Fatal("file differs")
	}
}

// A listing that never answers fails after the stall timeout, even for a
// caller whose ctx has no deadline.
func TestHungListingFails(t *testing.T) {
	f := newFakeHub(t)
	f.add("org/repo@main", testFile{path: "m.gguf", content: []byte("x"), lfs: true})
	rt := rtFunc(func(r *http.Request) (*http.Response, error) {
		<-r.Context().Done() // the Hub accepts and never answers
		return nil, r.Context().Err()
	})
	const stall = 300 * time.Millisecond
	ts := newTestStore(t, f, t.TempDir(), func(o *Options) {
		o.StallTimeout = stall
		o.HTTPClient = &http.Client{Transport: rt}
	})
	errc := make(chan error, 1)
	go func() { _, _, err := ts.Ensure(context.Background(), "hf:org/repo:m.gguf"); errc <- err }()
	select {
	case err := <-errc:
		if ae := api.AsError(err); err == nil || ae.Status != http.StatusGatewayTimeout {
			t.Fatalf("Ensure = %v, want a 504", err)
		}
	case <-time.After(10 * stall):
		t.Fatal("Ensure still waiting on a listing that never answers")
	}
	if got := counter(t, ts, "failures", ReasonStalled); got != 1 {
		t.Fatalf("stalled failures %v, want 1", got)
	}
}
