package model

import (
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// testFile is one file the fake Hub serves.
type testFile struct {
	path    string
	content []byte
	lfs     bool   // served through a redirect to the CDN, with an sha256 in the listing
	sha     string // overrides the listed sha256 (to make it wrong)
	size    int64  // overrides the listed size (to lie)

	sum, oid string // computed once by add: hashing per listing would skew benchmarks
}

// cdnBehaviour shapes one CDN response: it may write only part of the body
// and then drop the connection, or stall.
type cdnBehaviour struct {
	dropAfter  int64 // >0: close the connection after this many body bytes
	stallAfter int64 // >0: stop sending after this many bytes until the client leaves
	chunk      int   // body written in chunks of this size with delay between
	delay      time.Duration
	before     func() // runs before the body (e.g. to fill the disk)
	noRange    bool   // answer 200 with the whole body even to a Range request
}

// fakeHub is a HuggingFace API subset on one server and a "CDN" on another:
// the tree API with pagination, resolve with a redirect for LFS files, and
// Range on the CDN. It counts hits and checks the token never leaks to the CDN.
type fakeHub struct {
	t        testing.TB
	hub, cdn *httptest.Server
	token    string
	pageSize int

	mu        sync.Mutex
	repos     map[string][]testFile // "org/name@rev" → files
	behaviour map[string][]cdnBehaviour
	ranges    []string // Range headers the CDN saw, in order

	treeHits, resolveHits, cdnHits atomic.Int64
	authSeen, cdnAuthLeaks         atomic.Int64
}

func newFakeHub(t testing.TB) *fakeHub {
	f := &fakeHub{t: t, pageSize: 2, repos: map[string][]testFile{}, behaviour: map[string][]cdnBehaviour{}}
	f.cdn = httptest.NewServer(http.HandlerFunc(f.serveCDN))
	f.hub = httptest.NewServer(http.HandlerFunc(f.serveHub))
	t.Cleanup(f.cdn.Close)
	t.Cleanup(f.hub.Close)
	return f
}

func (f *fakeHub) add(repoRev string, files ...testFile) {
	for i := range files {
		files[i].sum, files[i].oid = sha(files[i].content), gitOID(files[i].content)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.repos[repoRev] = append(f.repos[repoRev], files...)
}

// on queues behaviours for the next CDN requests of path (one per request).
func (f *fakeHub) on(path string, b ...cdnBehaviour) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.behaviour[path] = append(f.behaviour[path], b...)
}

func (f *fakeHub) find(repoRev, path string) (testFile, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, tf := range f.repos[repoRev] {
		if tf.path == path {
			return tf, true
		}
	}
	return testFile{}, false
}

func sha(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func (f *fakeHub) checkAuth(w http.ResponseWriter, r *http.Request) bool {
	if r.Header.Get("Authorization") != "" {
		f.authSeen.Add(1)
	}
	if f.token != "" && r.Header.Get("Authorization") != "Bearer "+f.token {
		w.Header().Set("X-Error-Code", "GatedRepo")
		http.Error(w, "auth", http.StatusUnauthorized)
		return false
	}
	return true
}

func (f *fakeHub) serveHub(w http.ResponseWriter, r *http.Request) {
	if !f.checkAuth(w, r) {
		return
	}
	p := r.URL.EscapedPath()
	switch {
	case strings.HasPrefix(p, "/api/models/"):
		f.treeHits.Add(1)
		rest := strings.TrimPrefix(p, "/api/models/")
		repo, rev, ok := strings.Cut(rest, "/tree/")
		if !ok {
			http.NotFound(w, r)
			return
		}
		f.mu.Lock()
		files, ok := f.repos[repo+"@"+rev]
		f.mu.Unlock()
		if !ok {
			w.Header().Set("X-Error-Code", "RepoNotFound")
			http.Error(w, "repo not found", http.StatusNotFound)
			return
		}
		start, _ := strconv.Atoi(r.URL.Query().Get("cursor"))
		end := min(start+f.pageSize, len(files))
		type lfs struct {
			OID  string `json:"oid"`
			Size int64  `json:"size"`
		}
		type entry struct {
			Type string `json:"type"`
			Path string `json:"path"`
			Size int64  `json:"size"`
			OID  string `json:"oid"`
			LFS  *lfs   `json:"lfs,omitempty"`
		}
		out := []entry{}
		if start == 0 {
			out = append(out, entry{Type: "directory", Path: "original"})
		}
		for _, tf := range files[start:end] {
			size := int64(len(tf.content))
			if tf.size != 0 {
				size = tf.size
			}
			e := entry{Type: "file", Path: tf.path, Size: size, OID: tf.oid}
			if tf.lfs {
				s := tf.sum
				if tf.sha != "" {
					s = tf.sha
				}
				e.LFS = &lfs{OID: s, Size: size}
				e.OID = "0123456789abcdef0123456789abcdef01234567"
			}
			out = append(out, e)
		}
		if end < len(files) {
			w.Header().Set("Link", fmt.Sprintf(`<%s%s?recursive=true&cursor=%d>; rel="next"`, f.hub.URL, p, end))
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	case strings.Contains(p, "/resolve/"):
		f.resolveHits.Add(1)
		repo, rest, _ := strings.Cut(strings.TrimPrefix(p, "/"), "/resolve/")
		rev, file, _ := strings.Cut(rest, "/")
		tf, ok := f.find(repo+"@"+rev, file)
		if !ok {
			w.Header().Set("X-Error-Code", "EntryNotFound")
			http.Error(w, "entry not found", http.StatusNotFound)
			return
		}
		if tf.lfs {
			// Real CDN URLs carry a signature in the query.
			http.Redirect(w, r, f.cdn.URL+"/blob/"+repo+"@"+rev+"/"+file+"?X-Amz-Signature=cdnsecret", http.StatusFound)
			return
		}
		f.serveBody(w, r, tf, cdnBehaviour{})
	default:
		http.NotFound(w, r)
	}
}

func gitOID(b []byte) string {
	h := sha1.New()
	fmt.Fprintf(h, "blob %d\x00", len(b))
	h.Write(b)
	return hex.EncodeToString(h.Sum(nil))
}

func (f *fakeHub) serveCDN(w http.ResponseWriter, r *http.Request) {
	f.cdnHits.Add(1)
	if r.Header.Get("Authorization") != "" {
		f.cdnAuthLeaks.Add(1)
	}
	repo, revFile, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/blob/"), "@")
	rev, file, _ := strings.Cut(revFile, "/")
	tf, ok := f.find(repo+"@"+rev, file)
	if !ok {
		http.NotFound(w, r)
		return
	}
	f.mu.Lock()
	f.ranges = append(f.ranges, r.Header.Get("Range"))
	var b cdnBehaviour
	if q := f.behaviour[file]; len(q) > 0 {
		b, f.behaviour[file] = q[0], q[1:]
	}
	f.mu.Unlock()
	f.serveBody(w, r, tf, b)
}

// serveBody answers with Range support and the behaviour's faults.
func (f *fakeHub) serveBody(w http.ResponseWriter, r *http.Request, tf testFile, b cdnBehaviour) {
	body := tf.content
	var start int64
	if rg := r.Header.Get("Range"); rg != "" && !b.noRange {
		v, ok := strings.CutPrefix(rg, "bytes=")
		a, _, _ := strings.Cut(v, "-")
		n, err := strconv.ParseInt(a, 10, 64)
		if !ok || err != nil || n > int64(len(body)) {
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return
		}
		start = n
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", n, len(body)-1, len(body)))
		body = body[n:]
	}
	if b.before != nil {
		b.before()
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	if start > 0 {
		w.WriteHeader(http.StatusPartialContent)
	} else {
		w.WriteHeader(http.StatusOK)
	}
	limit := int64(len(body))
	if b.dropAfter > 0 {
		limit = min(limit, b.dropAfter)
	}
	if b.stallAfter > 0 {
		limit = min(limit, b.stallAfter)
	}
	chunk := b.chunk
	if chunk <= 0 {
		chunk = 64 << 10
	}
	rc := http.NewResponseController(w)
	for off := int64(0); off < limit; off += int64(chunk) {
		end := min(off+int64(chunk), limit)
		if _, err := w.Write(body[off:end]); err != nil {
			return
		}
		_ = rc.Flush()
		if b.delay > 0 {
			select {
			case <-time.After(b.delay):
			case <-r.Context().Done():
				return
			}
		}
	}
	switch {
	case b.dropAfter > 0 && limit < int64(len(body)):
		conn, _, err := rc.Hijack()
		if err == nil {
			conn.Close()
		}
	case b.stallAfter > 0 && limit < int64(len(body)):
		<-r.Context().Done()
	}
}

// rangesSeen returns the Range headers the CDN received.
func (f *fakeHub) rangesSeen() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.ranges...)
}

// randomBytes is deterministic filler.
func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

type testStore struct {
	*Store
	reg *prometheus.Registry
	dir string
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newTestStore opens a Store on dir against the fake hub; mod adjusts opts.
func newTestStore(t testing.TB, f *fakeHub, dir string, mod func(*Options)) *testStore {
	t.Helper()
	reg := prometheus.NewRegistry()
	opts := Options{
		Dir: dir, Endpoint: f.hub.URL, Token: f.token, StallTimeout: 5 * time.Second,
		Logger: testLogger(t), Registry: reg,
	}
	if mod != nil {
		mod(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return &testStore{Store: s, reg: reg, dir: dir}
}

// waitResult waits for a download's Result with a deadline.
func waitResult(t testing.TB, ch <-chan Result, d time.Duration) Result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(d):
		t.Fatalf("no download result within %s", d)
		return Result{}
	}
}
