package model

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// listTree returns every path below dir (for "nothing was written there").
func listTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestDownloadRefusesSymlinkedDir: a directory component of
// hf/<org>/<repo> replaced by a symlink to another directory fails the
// download; nothing is written, renamed or created at the link's target.
func TestDownloadRefusesSymlinkedDir(t *testing.T) {
	for _, link := range []string{"hf", "hf/org", "hf/org/repo", "hf/org/repo/main"} {
		t.Run(link, func(t *testing.T) {
			f := newFakeHub(t)
			f.add("org/repo@main", testFile{path: "model.gguf", content: randomBytes(4096, 3), lfs: true})
			dir := t.TempDir()
			elsewhere := t.TempDir()
			ts := newTestStore(t, f, dir, nil)
			lp := filepath.Join(dir, link)
			if err := os.MkdirAll(filepath.Dir(lp), 0o755); err != nil {
				t.Fatal(err)
			}
			mustSymlink(t, elsewhere, lp)

			_, wait, err := ts.Ensure(context.Background(), "hf:org/repo:model.gguf")
			if err == nil {
				err = waitResult(t, wait, 10e9).Err
			}
			if err == nil || !errors.Is(err, unix.ELOOP) {
				t.Fatalf("download through a symlinked %s: %v, want ELOOP", link, err)
			}
			if got := listTree(t, elsewhere); len(got) != 0 {
				t.Fatalf("download wrote through the link: %v", got)
			}
			if ms, _ := ts.List(context.Background()); len(ms) != 0 {
				t.Fatalf("catalog lists %v", ms)
			}
		})
	}
}

// TestDeleteRefusesSymlinkedDir: a downloaded model whose repo directory
// is then replaced by a symlink to a copy elsewhere: Delete removes
// nothing there.
func TestDeleteRefusesSymlinkedDir(t *testing.T) {
	f := newFakeHub(t)
	f.add("org/repo@main", testFile{path: "model.gguf", content: randomBytes(4096, 4), lfs: true})
	dir := t.TempDir()
	elsewhere := t.TempDir()
	ts := newTestStore(t, f, dir, nil)
	ensureWait(t, ts, "hf:org/repo:model.gguf")

	repo := filepath.Join(dir, "hf", "org", "repo")
	if err := os.Rename(repo, filepath.Join(elsewhere, "repo")); err != nil {
		t.Fatal(err)
	}
	mustSymlink(t, filepath.Join(elsewhere, "repo"), repo)
	victim := filepath.Join(elsewhere, "repo", "main", "model.gguf")

	if _, err := ts.Delete(context.Background(), "hf:org/repo:model.gguf"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := os.Stat(victim); err != nil {
		t.Fatalf("Delete removed the file behind the symlink: %v", err)
	}
	if _, err := os.Lstat(repo); err != nil {
		t.Fatalf("the link itself: %v", err)
	}
}

// TestDeleteRefusesTamperedCatalog: catalog rows whose repo, revision or
// file paths lead out of the model dir delete nothing outside it.
func TestDeleteRefusesTamperedCatalog(t *testing.T) {
	f := newFakeHub(t)
	dir := t.TempDir()
	elsewhere := t.TempDir()
	victim := filepath.Join(elsewhere, "victim")
	if err := os.WriteFile(victim, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	ts := newTestStore(t, f, dir, nil)
	rel, err := filepath.Rel(filepath.Join(dir, "hf", "org", "repo", "main"), victim)
	if err != nil {
		t.Fatal(err)
	}
	rows := []Model{
		{Ref: "hf:org/repo@main", Provider: ProviderHF, Repo: "org/repo", Revision: "main", Files: []ModelFile{{Path: rel, Size: 7}}},
		{Ref: "hf:org/other@main", Provider: ProviderHF, Repo: "org/other", Revision: "../../../../" + elsewhere, Files: []ModelFile{{Path: "victim", Size: 7}}},
	}
	for _, m := range rows {
		m.LocalPath = victim
		if err := ts.cat.put(context.Background(), m); err != nil {
			t.Fatal(err)
		}
		if _, err := ts.Delete(context.Background(), m.Ref); err != nil {
			t.Fatalf("Delete(%s): %v", m.Ref, err)
		}
		if b, err := os.ReadFile(victim); err != nil || string(b) != "keep me" {
			t.Fatalf("row %+v: victim %q %v", m, b, err)
		}
	}
	if _, err := os.Stat(elsewhere); err != nil {
		t.Fatalf("elsewhere: %v", err)
	}
}

// TestSafeDir checks the primitives directly: no symlink in any component,
// nothing outside the dir.
func TestSafeDir(t *testing.T) {
	dir := t.TempDir()
	elsewhere := t.TempDir()
	d, err := openSafeDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	if err := d.MkdirAll(filepath.Join(dir, "a", "b"), 0o755); err != nil {
		t.Fatal(err)
	}
	mustSymlink(t, elsewhere, filepath.Join(dir, "a", "link"))
	if err := os.WriteFile(filepath.Join(elsewhere, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"mkdir through link", func() error { return d.MkdirAll(filepath.Join(dir, "a", "link", "new"), 0o755) }},
		{"create through link", func() error {
			f, err := d.OpenFile(filepath.Join(dir, "a", "link", "g"), os.O_RDWR|os.O_CREATE, 0o644)
			if err == nil {
				f.Close()
			}
			return err
		}},
		{"remove through link", func() error { return d.Remove(filepath.Join(dir, "a", "link", "f")) }},
		{"rename into link", func() error { return d.Rename(filepath.Join(dir, "a", "b"), filepath.Join(dir, "a", "link", "b")) }},
		{"outside", func() error { return d.Remove(victimPath(elsewhere)) }},
		{"dotdot", func() error { return d.Remove(dir + "/a/../../x") }},
		{"the dir itself", func() error { return d.Remove(dir) }},
	} {
		if err := tc.op(); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
	if got := listTree(t, elsewhere); len(got) != 1 {
		t.Fatalf("elsewhere changed: %v", got)
	}
	// The link itself may be removed (it is below the dir).
	if err := d.Remove(filepath.Join(dir, "a", "link")); err != nil {
		t.Fatalf("remove the link itself: %v", err)
	}
	if err := d.Remove(filepath.Join(dir, "a", "b")); err != nil {
		t.Fatalf("remove an empty dir: %v", err)
	}
}

func victimPath(dir string) string { return filepath.Join(dir, "f") }
