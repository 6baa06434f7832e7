package model

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func writeFile(t *testing.T, path string, data []byte, mod time.Time) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if !mod.IsZero() {
		if err := os.Chtimes(path, mod, mod); err != nil {
			t.Fatal(err)
		}
	}
}

// A corrupt catalog.db must not keep the hive from starting: it is moved
// aside, counted, and the catalog is rebuilt from the model files.
func TestCorruptCatalogIsMovedAsideAndRebuilt(t *testing.T) {
	f := newFakeHub(t)
	dir := t.TempDir()
	hf := filepath.Join(dir, "hf")
	writeFile(t, filepath.Join(hf, "org", "a", "main", "a.gguf"), []byte("aaaa"), time.Time{})
	writeFile(t, filepath.Join(hf, "org", "b", "v1", "x.gguf"), []byte("xx"), time.Time{})
	writeFile(t, filepath.Join(hf, "org", "b", "v1", "y.gguf"), []byte("yyy"), time.Time{})
	writeFile(t, filepath.Join(hf, "org", "b", "v1", "z.gguf"+incompleteSuffix), []byte("z"), time.Time{})
	garbage := []byte(strings.Repeat("this is not a database\n", 200))
	writeFile(t, filepath.Join(dir, "catalog.db"), garbage, time.Time{})

	ts := newTestStore(t, f, dir, nil)

	if got := testutil.ToFloat64(ts.met.catalogRebuilds); got != 1 {
		t.Fatalf("catalog rebuilds counted %v, want 1", got)
	}
	aside, _ := filepath.Glob(filepath.Join(dir, "catalog.db.corrupt-*"))
	if len(aside) != 1 {
		t.Fatalf("corrupt catalog moved aside as %v, want one file", aside)
	}
	if b, err := os.ReadFile(aside[0]); err != nil || string(b) != string(garbage) {
		t.Fatalf("moved-aside catalog changed: %v", err)
	}
	ms, err := ts.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range ms {
		got = append(got, m.Ref+"="+strings.TrimPrefix(m.LocalPath, dir))
	}
	sort.Strings(got)
	want := []string{
		"hf:org/a@main=/hf/org/a/main/a.gguf",
		"hf:org/b@v1:x.gguf=/hf/org/b/v1/x.gguf",
		"hf:org/b@v1:y.gguf=/hf/org/b/v1/y.gguf",
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("rebuilt catalog\n got %v\nwant %v", got, want)
	}
	// A rebuilt model is present: no download starts for it.
	p, wait, err := ts.Ensure(context.Background(), "hf:org/a")
	if err != nil || wait != nil || p != filepath.Join(hf, "org", "a", "main", "a.gguf") {
		t.Fatalf("Ensure after rebuild: %q %v %v", p, wait, err)
	}
	if got := counter(t, ts, "disk"); got != 4+2+3 {
		t.Fatalf("disk gauge %v", got)
	}
}

// Orphaned partial downloads older than the bound are collected at start;
// younger ones stay for a resume.
func TestStaleOrphanPartialCollectedAtStart(t *testing.T) {
	f := newFakeHub(t)
	dir := t.TempDir()
	old := filepath.Join(dir, "hf", "org", "old", "main", "m.gguf"+incompleteSuffix)
	young := filepath.Join(dir, "hf", "org", "young", "main", "m.gguf"+incompleteSuffix)
	writeFile(t, old, make([]byte, 1000), time.Now().Add(-2*time.Hour))
	writeFile(t, young, make([]byte, 1000), time.Time{})

	ts := newTestStore(t, f, dir, func(o *Options) { o.PartialMaxAge = time.Hour })

	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Fatalf("stale partial still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "hf", "org", "old")); !os.IsNotExist(err) {
		t.Fatalf("empty dirs of the stale partial left: %v", err)
	}
	if _, err := os.Stat(young); err != nil {
		t.Fatalf("young partial removed: %v", err)
	}
	if got := testutil.ToFloat64(ts.met.partialsRemoved.WithLabelValues(partialStale)); got != 1 {
		t.Fatalf("stale partials removed counted %v, want 1", got)
	}
}

// An orphaned partial counts toward MaxBytes and goes before any model.
func TestOrphanPartialCountsTowardMaxBytes(t *testing.T) {
	f := newFakeHub(t)
	f.add("org/a@main", testFile{path: "a.gguf", content: randomBytes(400000, 1), lfs: true})
	f.add("org/b@main", testFile{path: "b.gguf", content: randomBytes(400000, 2), lfs: true})
	dir := t.TempDir()
	ts := newTestStore(t, f, dir, func(o *Options) { o.MaxBytes = 900000 })
	pa := ensureWait(t, ts, "hf:org/a")
	orphan := filepath.Join(dir, "hf", "org", "gone", "main", "g.gguf"+incompleteSuffix)
	writeFile(t, orphan, make([]byte, 300000), time.Time{})

	// a + orphan + b = 1.1 MB > 0.9 MB: the orphan goes, a stays.
	ensureWait(t, ts, "hf:org/b")
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Fatalf("orphaned partial kept over max_bytes: %v", err)
	}
	if _, err := os.Stat(pa); err != nil {
		t.Fatalf("model a evicted instead of the orphaned partial: %v", err)
	}
	if got := counter(t, ts, "evictions"); got != 0 {
		t.Fatalf("evictions %v, want 0", got)
	}
	if got := testutil.ToFloat64(ts.met.partialsRemoved.WithLabelValues(partialMaxBytes)); got != 1 {
		t.Fatalf("partials removed for max_bytes counted %v, want 1", got)
	}
}
