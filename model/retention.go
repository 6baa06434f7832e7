package model

import (
	"context"
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
			"catalog_bytes", total, "incoming_bytes", incoming, "max_bytes", s.maxBytes)
	}
}
