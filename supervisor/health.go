package supervisor

import (
	"context"
	"io"
	"net/http"
	"time"
)

// loadingPoll is how often an http-mode worker is probed while loading.
const loadingPoll = 200 * time.Millisecond

// pollHealth drives an http-mode worker: GET <url><health_path> until it
// answers 200 (ready; 503 means still loading), then once per heartbeat
// interval, where each 200 counts as a heartbeat and anything else as a
// failed health check. The stale deadline does the rest.
func (s *Supervisor) pollHealth(ctx context.Context, w *worker, r *run) {
	target := w.url + w.backendCfg.HealthPath
	every := loadingPoll
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ok := s.checkHealth(ctx, target)
		s.mu.Lock()
		if w.run != r {
			s.mu.Unlock()
			return
		}
		switch {
		case ok && !r.ready:
			s.markReady(w, "GET "+w.backendCfg.HealthPath)
		case ok:
			w.failedHealthChecks = 0
			s.heartbeat(w)
		case r.ready:
			r.portOwned = false // the next proxied request checks again
			w.failedHealthChecks++
			s.m.healthFails.Inc()
		}
		if r.ready {
			every = s.cfg.Heartbeat.Interval.D()
		}
		s.mu.Unlock()
		t.Reset(every)
	}
}

// checkHealth reports whether target answered 200.
func (s *Supervisor) checkHealth(ctx context.Context, target string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return false
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
