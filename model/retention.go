package model

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// Retention: which models stay on disk. In-use models are pinned; the
// least recently used ones are evicted to stay under MaxBytes.

// Acquire marks ref in use until release is called: an in-use model is
// neither evicted nor deletable. Acquire before Ensure, so the model cannot
// be evicted between the two. release is idempotent.
func (s *Store) Acquire(ref string) (release func()) {
	key := canonical(ref)
	s.mu.Lock()
	s.inUse[key]++
	s.mu.Unlock()
	s.touchQuiet(key)
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if s.inUse[key]--; s.inUse[key] <= 0 {
				delete(s.inUse, key)
			}
			s.mu.Unlock()
			s.touchQuiet(key)
		})
	}
}

// Touch records that ref was used now (LRU order).
func (s *Store) Touch(ctx context.Context, ref string) error {
	return s.cat.touch(ctx, canonical(ref), time.Now())
}

func (s *Store) touchQuiet(key string) {
	if err := s.cat.touch(s.ctx, key, time.Now()); err != nil && s.ctx.Err() == nil {
		s.log.Warn("model catalog touch failed", "ref", key, "error", err)
	}
}

// enforceRetention deletes least-recently-used models that nobody holds
// until the catalog plus incoming bytes fit MaxBytes.
func (s *Store) enforceRetention(ctx context.Context, incoming uint64, exclude string) {
	orphans := s.collectPartials(time.Now())
	if s.maxBytes == 0 {
		return
	}
	ms, err := s.cat.list(ctx)
	if err != nil {
		s.log.Warn("model retention: cannot list catalog", "error", err)
		return
	}
	var total uint64
	for _, m := range ms {
		if m.Ref != exclude {
			total += m.SizeBytes
		}
	}
	for _, p := range orphans {
		total += p.size
	}
	// Orphaned partials go first: no download owns them, and losing one
	// costs at most a re-download, never a model a worker may load.
	for _, p := range orphans {
		if total+incoming <= s.maxBytes {
			return
		}
		if s.removePartial(p, partialMaxBytes) {
			total -= p.size
		}
	}
	for _, m := range ms { // least recently used first
		if total+incoming <= s.maxBytes {
			return
		}
		if m.Ref == exclude {
			continue
		}
		gone, err := s.removeEntry(ctx, m.Ref)
		if err != nil {
			continue // in use or downloading: never evicted
		}
		s.removeFiles(ctx, gone)
		total -= gone.SizeBytes
		s.met.evictions.Inc()
		s.log.Info("model evicted", "ref", gone.Ref, "bytes", gone.SizeBytes,
			"last_used", time.UnixMilli(gone.lastUsedMS).UTC().Format(time.RFC3339), "max_bytes", s.maxBytes)
	}
	if total+incoming > s.maxBytes {
		s.log.Warn("model retention: cannot get under max_bytes; the rest is in use",
			"catalog_and_partial_bytes", total, "incoming_bytes", incoming, "max_bytes", s.maxBytes)
	}
}

// Why an orphaned partial download was removed (the metric's reason label).
const (
	partialStale    = "stale"
	partialMaxBytes = "max_bytes"
)

// partial is a partial download (*.incomplete) on disk.
type partial struct {
	path string
	size uint64
	mod  time.Time
}

// collectPartials removes orphaned partial downloads older than
// partialMaxAge and returns the younger ones, oldest first. Younger ones
// stay so that a repeated request resumes them.
func (s *Store) collectPartials(now time.Time) []partial {
	var keep []partial
	for _, p := range s.orphanPartials() {
		if now.Sub(p.mod) >= s.partialMaxAge && s.removePartial(p, partialStale) {
			continue
		}
		keep = append(keep, p)
	}
	return keep
}

// orphanPartials lists the partial downloads under <Dir>/hf that no running
// download owns, oldest first.
func (s *Store) orphanPartials() []partial {
	var out []partial
	_ = filepath.WalkDir(filepath.Join(s.dir, "hf"), func(p string, e fs.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() || !strings.HasSuffix(e.Name(), incompleteSuffix) {
			return nil // an unreadable directory is skipped, not fatal
		}
		st, err := e.Info()
		if err != nil {
			return nil
		}
		out = append(out, partial{path: p, size: uint64(st.Size()), mod: st.ModTime()})
		return nil
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := out[:0]
	for _, p := range out {
		if !s.ownedLocked(p.path) {
			kept = append(kept, p)
		}
	}
	sort.Slice(kept, func(i, j int) bool { return kept[i].mod.Before(kept[j].mod) })
	return kept
}

// ownedLocked reports whether a running download may write path: any file
// under the revision directory of a download in flight (it may resume it).
// s.mu is held.
func (s *Store) ownedLocked(path string) bool {
	for _, d := range s.inflight {
		if strings.HasPrefix(path, s.baseDir(d.ref)+string(filepath.Separator)) {
			return true
		}
	}
	return false
}

// removePartial deletes an orphaned partial unless a download started to own
// it meanwhile (checked under s.mu, which a download takes to register), and
// reports whether it did.
func (s *Store) removePartial(p partial, reason string) bool {
	s.mu.Lock()
	if s.ownedLocked(p.path) {
		s.mu.Unlock()
		return false
	}
	err := s.mdir.Remove(p.path)
	s.mu.Unlock()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Warn("model: cannot remove an orphaned partial download", "path", p.path, "error", err)
		return false
	}
	s.pruneDirs(filepath.Dir(p.path))
	s.met.partialsRemoved.WithLabelValues(reason).Inc()
	s.log.Info("model orphaned partial download removed", "path", p.path, "bytes", p.size,
		"modified", p.mod.UTC().Format(time.RFC3339), "reason", reason)
	return true
}
