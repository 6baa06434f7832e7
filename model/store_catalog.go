package model

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/api"
)

// The Store's view of the catalog: listing, deleting a model and its
// files, and checking that a catalog entry is still on disk.

// canonical is ref's catalog key, or ref itself if it does not parse.
func canonical(ref string) string {
	if r, err := ParseRef(ref); err == nil {
		return r.String()
	}
	return ref
}

// List returns the catalog, least recently used first, with in-use counts.
func (s *Store) List(ctx context.Context) ([]Model, error) {
	ms, err := s.cat.list(ctx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	for i := range ms {
		ms[i].InUse = s.inUse[ms[i].Ref]
	}
	s.mu.Unlock()
	if ms == nil {
		ms = []Model{}
	}
	return ms, nil
}

// Delete removes a model from the catalog and its files from disk. It is
// refused with 409 while a worker holds the model or it is downloading, and
// 404 when it is not in the catalog.
func (s *Store) Delete(ctx context.Context, ref string) (Model, error) {
	r, err := ParseRef(ref)
	if err != nil {
		return Model{}, err
	}
	key := r.String()
	m, err := s.removeEntry(ctx, key)
	if err != nil {
		return Model{}, err
	}
	s.removeFiles(ctx, m)
	s.log.Info("model deleted", "ref", key, "bytes", m.SizeBytes)
	return m, nil
}

// removeEntry deletes the catalog row unless the model is held or
// downloading. The check and the delete happen under s.mu, so an Acquire
// cannot slip between them.
func (s *Store) removeEntry(ctx context.Context, key string) (Model, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.inUse[key]; n > 0 {
		return Model{}, api.Errorf(http.StatusConflict, api.CodeConflict, "model %s is in use by %d worker(s)", key, n).
			WithDetails(map[string]any{"ref": key, "in_use": n})
	}
	if s.inflight[key] != nil {
		return Model{}, api.Errorf(http.StatusConflict, api.CodeConflict, "model %s is downloading", key).
			WithDetails(map[string]any{"ref": key})
	}
	m, ok, err := s.cat.get(ctx, key)
	if err != nil {
		return Model{}, err
	}
	if !ok {
		return Model{}, api.Errorf(http.StatusNotFound, api.CodeNotFound, "model %s is not in the catalog", key).
			WithDetails(map[string]any{"ref": key})
	}
	if _, err := s.cat.remove(ctx, key); err != nil {
		return Model{}, err
	}
	return m, nil
}

// removeFiles deletes m's files except those another catalog entry also
// lists (hf:a/b and hf:a/b:x.gguf can name the same file), then empty dirs.
func (s *Store) removeFiles(ctx context.Context, m Model) {
	defer s.updateDiskGauge(ctx)
	if m.Provider != ProviderHF {
		return
	}
	keep := map[string]bool{}
	others, err := s.cat.list(ctx)
	if err != nil {
		s.log.Warn("model delete: cannot list catalog; keeping files", "ref", m.Ref, "error", err)
		return
	}
	for _, o := range others {
		base := s.baseDir(Ref{Provider: o.Provider, Repo: o.Repo, Revision: o.Revision})
		for _, f := range o.Files {
			keep[filepath.Join(base, f.Path)] = true
		}
	}
	// Files a running download is about to fetch or has verified stay too.
	s.mu.Lock()
	for _, d := range s.inflight {
		select {
		case <-d.resolved:
			for _, f := range d.sel.files {
				keep[filepath.Join(d.base, f.Path)] = true
			}
		default:
		}
	}
	s.mu.Unlock()
	base := s.baseDir(Ref{Provider: m.Provider, Repo: m.Repo, Revision: m.Revision})
	for _, f := range m.Files {
		p := filepath.Join(base, f.Path)
		if keep[p] {
			continue
		}
		// p comes from the catalog: a tampered row must not make the hive
		// delete outside the model dir or through a symlink (mdir checks).
		if err := s.mdir.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("model delete: cannot remove file", "path", p, "error", err)
		}
		s.pruneDirs(filepath.Dir(p))
	}
}

// pruneDirs removes empty directories from dir up to (excluding) s.dir.
func (s *Store) pruneDirs(dir string) {
	for strings.HasPrefix(dir, s.dir+string(filepath.Separator)) {
		if s.mdir.Remove(dir) != nil {
			return
		}
		dir = filepath.Dir(dir)
	}
}

// baseDir is where a repo revision's files live:
// <Dir>/hf/<org>/<name>/<revision, path-escaped>/.
func (s *Store) baseDir(r Ref) string {
	return filepath.Join(s.dir, "hf", filepath.FromSlash(r.Repo), url.PathEscape(r.Revision))
}

func (s *Store) updateDiskGauge(ctx context.Context) {
	if n, err := s.cat.totalBytes(ctx); err == nil {
		s.met.diskBytes.Set(float64(n))
	}
}

// present returns the catalog path of key when its files are still there;
// a row whose files vanished is dropped so the model downloads again.
func (s *Store) present(ctx context.Context, key string) (string, bool, error) {
	m, ok, err := s.cat.get(ctx, key)
	if err != nil || !ok {
		return "", false, err
	}
	if err := s.checkFiles(m); err != nil {
		s.log.Warn("model in catalog but missing on disk; downloading again", "ref", key, "path", m.LocalPath, "error", err)
		if _, err := s.cat.remove(ctx, key); err != nil {
			return "", false, err
		}
		return "", false, nil
	}
	return m.LocalPath, true, nil
}

// checkFiles stats every file of m (sizes included): someone may have
// deleted or truncated files under the model dir by hand.
func (s *Store) checkFiles(m Model) error {
	if _, err := os.Stat(m.LocalPath); err != nil {
		return err
	}
	base := s.baseDir(Ref{Provider: m.Provider, Repo: m.Repo, Revision: m.Revision})
	for _, f := range m.Files {
		p := filepath.Join(base, filepath.FromSlash(f.Path))
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		if uint64(st.Size()) != f.Size {
			return fmt.Errorf("%s is %d bytes, catalog says %d", p, st.Size(), f.Size)
		}
	}
	return nil
}

// rebuildCatalog registers the complete models found under <Dir>/hf, after
// a corrupt catalog was moved aside. A revision directory becomes the whole
// model (hf:<repo>@<rev>) when its files form one, else one entry per GGUF
// model (hf:<repo>@<rev>:<file>), as a download would have named them. The
// hub's checksums are not re-read: the files were verified when they were
// downloaded, and entries carry no sha256. Last use is the files' mtime.
func (s *Store) rebuildCatalog(ctx context.Context) (int, error) {
	var n int
	for _, b := range s.scanBases() {
		files, newest, err := scanFiles(b.dir)
		if err != nil {
			s.log.Warn("model catalog rebuild: cannot read a model directory; skipping it", "path", b.dir, "error", err)
			continue
		}
		if len(files) == 0 {
			continue
		}
		ref := Ref{Provider: ProviderHF, Repo: b.repo, Revision: b.revision}
		var refs []Ref
		if _, err := selectFiles(ref, files); err == nil {
			refs = append(refs, ref)
		} else {
			for _, g := range ggufModels(files) {
				r := ref
				r.File = g
				refs = append(refs, r)
			}
		}
		for _, r := range refs {
			if _, err := ParseRef(r.String()); err != nil {
				s.log.Warn("model catalog rebuild: directory does not name a model; skipping it", "path", b.dir, "error", err)
				break
			}
			sel, err := selectFiles(r, files)
			if err != nil {
				continue
			}
			m := Model{
				Ref: r.String(), Provider: r.Provider, Repo: r.Repo, Revision: r.Revision,
				LocalPath: b.dir, SizeBytes: sel.total,
				DownloadedAt: newest.Unix(), lastUsedMS: newest.UnixMilli(),
			}
			if sel.main != "" {
				m.LocalPath = filepath.Join(b.dir, filepath.FromSlash(sel.main))
			}
			for _, f := range sel.files {
				m.Files = append(m.Files, ModelFile{Path: f.Path, Size: f.Size})
			}
			if err := s.cat.put(ctx, m); err != nil {
				return n, fmt.Errorf("model: rebuild catalog: %w", err)
			}
			s.log.Info("model catalog rebuild: registered a model found on disk", "ref", m.Ref, "path", m.LocalPath, "bytes", m.SizeBytes)
			n++
		}
	}
	return n, nil
}

// modelBase is one revision directory under <Dir>/hf.
type modelBase struct{ dir, repo, revision string }

// scanBases finds the revision directories: <Dir>/hf/<org>/<name>/<rev> for
// an org/name repo, <Dir>/hf/<name>/<rev> for a bare one (told apart by the
// revision directory holding files directly).
func (s *Store) scanBases() []modelBase {
	var out []modelBase
	root := filepath.Join(s.dir, "hf")
	for _, a := range readDirs(root) {
		for _, b := range readDirs(filepath.Join(root, a)) {
			dirB := filepath.Join(root, a, b)
			if hasRegularFile(dirB) {
				if rev, err := url.PathUnescape(b); err == nil {
					out = append(out, modelBase{dir: dirB, repo: a, revision: rev})
				}
				continue
			}
			for _, c := range readDirs(dirB) {
				if rev, err := url.PathUnescape(c); err == nil {
					out = append(out, modelBase{dir: filepath.Join(dirB, c), repo: a + "/" + b, revision: rev})
				}
			}
		}
	}
	return out
}

func readDirs(dir string) []string {
	es, _ := os.ReadDir(dir)
	var out []string
	for _, e := range es {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}

func hasRegularFile(dir string) bool {
	es, _ := os.ReadDir(dir)
	for _, e := range es {
		if e.Type().IsRegular() {
			return true
		}
	}
	return false
}

// scanFiles lists the complete regular files under dir (partials are not
// model files) and the newest modification time among them.
func scanFiles(dir string) ([]RepoFile, time.Time, error) {
	var files []RepoFile
	var newest time.Time
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !e.Type().IsRegular() || strings.HasSuffix(e.Name(), incompleteSuffix) {
			return nil
		}
		st, err := e.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		files = append(files, RepoFile{Path: filepath.ToSlash(rel), Size: uint64(st.Size())})
		if st.ModTime().After(newest) {
			newest = st.ModTime()
		}
		return nil
	})
	return files, newest, err
}
