package model

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rbee/rbee-hive/api"
)

// TestFileRefRoots: a file: reference outside models.file_roots, or one
// whose symlinks lead out of its root, is a 400 VALIDATION_ERROR, through
// Ensure (spawn) and POST /v1/models/download alike; a path outside every
// root gets the same answer whether it exists, is missing, or lies in a
// directory only root may search, so the API tells nothing about it.
func TestFileRefRoots(t *testing.T) {
	f := newFakeHub(t)
	root := t.TempDir()
	other := t.TempDir()
	ts := newTestStore(t, f, t.TempDir(), func(o *Options) { o.FileRoots = []string{root} })

	good := filepath.Join(root, "m", "good.gguf")
	if err := os.MkdirAll(filepath.Dir(good), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(good, []byte("gguf"), 0o644); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(other, "secret.gguf")
	if err := os.WriteFile(secret, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A directory nobody but root may search: a stat below it would fail
	// with EACCES for a non-root hive, ENOENT or success for root; the
	// answer must be the same 400 in every case.
	closed := filepath.Join(other, "closed")
	if err := os.Mkdir(closed, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(closed, "x.gguf"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Symlinks inside the root: one leaving it (relative), one absolute
	// to the outside, one directory component leaving it, one staying in.
	mustSymlink(t, "../../"+filepath.Base(other)+"/secret.gguf", filepath.Join(root, "m", "rel-out.gguf"))
	if _, err := os.Stat(filepath.Join(root, "m", "rel-out.gguf")); err != nil {
		t.Fatalf("test setup: relative symlink does not resolve: %v", err)
	}
	mustSymlink(t, secret, filepath.Join(root, "abs-out.gguf"))
	mustSymlink(t, other, filepath.Join(root, "dir-out"))
	mustSymlink(t, "good.gguf", filepath.Join(root, "m", "alias.gguf"))
	// The HuggingFace cache layout: snapshots/<rev>/file -> ../../blobs/<sha>.
	if err := os.MkdirAll(filepath.Join(root, "blobs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "snapshots", "rev"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "blobs", "abc"), []byte("gguf"), 0o644); err != nil {
		t.Fatal(err)
	}
	mustSymlink(t, "../../blobs/abc", filepath.Join(root, "snapshots", "rev", "m.gguf"))
	mustSymlink(t, "../snapshots/rev", filepath.Join(root, "m", "latest"))

	outside := []string{
		"/etc/shadow",
		"/etc/passwd",
		secret,
		secret + "-missing",
		filepath.Join(closed, "x.gguf"),
		filepath.Join(closed, "missing.gguf"),
		"/",
		filepath.Dir(root),
		root + "x/good.gguf", // a sibling sharing the root's prefix
	}
	escapes := []string{
		filepath.Join(root, "m", "rel-out.gguf"),
		filepath.Join(root, "abs-out.gguf"),
		filepath.Join(root, "dir-out", "secret.gguf"),
	}
	var first string
	for _, p := range append(outside, escapes...) {
		_, wait, err := ts.Ensure(context.Background(), "file:"+p)
		e := api.AsError(err)
		if wait != nil || e == nil || e.Status != http.StatusBadRequest || e.Code != api.CodeValidation ||
			!strings.Contains(e.Message, "models.file_roots") {
			t.Errorf("Ensure(file:%s) = %v, want 400 VALIDATION_ERROR naming models.file_roots", p, err)
			continue
		}
		// Same wording for every outside path, apart from the path itself.
		msg := strings.ReplaceAll(e.Message, p, "P")
		if first == "" {
			first = msg
		} else if msg != first {
			t.Errorf("file:%s answered %q, others %q: the answer tells paths apart", p, msg, first)
		}
		code, body := postDownload(t, ts, "file:"+p)
		if code != http.StatusBadRequest || !strings.Contains(body, api.CodeValidation) {
			t.Errorf("POST /v1/models/download file:%s = %d %s, want 400", p, code, body)
		}
	}
	// file:<root>/../etc/passwd never gets this far: the reference parser
	// refuses the traversal.
	if _, _, err := ts.Ensure(context.Background(), "file:"+root+"/../etc/passwd"); api.AsError(err) == nil || api.AsError(err).Status != http.StatusBadRequest {
		t.Errorf("file:<root>/../etc/passwd = %v, want 400", err)
	}

	for _, p := range []string{good, filepath.Join(root, "m", "alias.gguf"), filepath.Join(root, "m"), root,
		filepath.Join(root, "snapshots", "rev", "m.gguf"), filepath.Join(root, "m", "latest", "m.gguf")} {
		got, wait, err := ts.Ensure(context.Background(), "file:"+p)
		if err != nil || wait != nil || got != p {
			t.Errorf("Ensure(file:%s) = %q %v %v, want the path", p, got, wait, err)
		}
	}
	if code, body := postDownload(t, ts, "file:"+good); code != http.StatusOK {
		t.Errorf("POST download file:%s = %d %s, want 200", good, code, body)
	}
	// Inside a root, a missing path is a 404 (the root is the operator's
	// own model directory).
	if _, _, err := ts.Ensure(context.Background(), "file:"+filepath.Join(root, "missing.gguf")); api.AsError(err) == nil || api.AsError(err).Status != http.StatusNotFound {
		t.Errorf("missing file inside the root: %v, want 404", err)
	}
}

// TestFileRootsDefault: without models.file_roots only the model dir is a
// root.
func TestFileRootsDefault(t *testing.T) {
	dir := t.TempDir()
	ts := newTestStore(t, newFakeHub(t), dir, nil)
	in := filepath.Join(dir, "local.gguf")
	if err := os.WriteFile(in, []byte("gguf"), 0o644); err != nil {
		t.Fatal(err)
	}
	if p, _, err := ts.Ensure(context.Background(), "file:"+in); err != nil || p != in {
		t.Fatalf("file: in the model dir = %q %v", p, err)
	}
	outFile := filepath.Join(t.TempDir(), "x.gguf")
	if err := os.WriteFile(outFile, []byte("gguf"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ts.Ensure(context.Background(), "file:"+outFile); api.AsError(err) == nil || api.AsError(err).Status != http.StatusBadRequest {
		t.Fatalf("file: outside the model dir = %v, want 400", err)
	}
}

func mustSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func postDownload(t *testing.T, ts *testStore, ref string) (int, string) {
	t.Helper()
	b, _ := json.Marshal(map[string]string{"model_ref": ref})
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/v1/models/download", bytes.NewReader(b))
	ts.HandleDownload(rec, req)
	return rec.Code, rec.Body.String()
}
