package model

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/api"
)

// DownloadRequest is the body of POST /v1/models/download.
type DownloadRequest struct {
	ModelRef string `json:"model_ref"`
}

// DownloadResponse is its answer: download_id "cached" with a local_path when
// the model is already here, else a UUID and local_path null.
type DownloadResponse struct {
	DownloadID string  `json:"download_id"`
	LocalPath  *string `json:"local_path"`
}

// ListResponse is the body of GET /v1/models.
type ListResponse struct {
	Models []Model `json:"models"`
}

// DeleteResponse is the body of a successful DELETE /v1/models/{ref}.
type DeleteResponse struct {
	Ref        string `json:"ref"`
	FreedBytes uint64 `json:"freed_bytes"`
}

// HandleDownload answers POST /v1/models/download {model_ref} → {download_id, local_path}.
func (s *Store) HandleDownload(w http.ResponseWriter, r *http.Request) {
	var req DownloadRequest
	if err := api.DecodeJSON(w, r, &req); err != nil {
		api.WriteError(w, err)
		return
	}
	path, d, err := s.start(r.Context(), req.ModelRef)
	if err != nil {
		api.WriteError(w, err)
		return
	}
	if d == nil {
		api.WriteJSON(w, http.StatusOK, DownloadResponse{DownloadID: "cached", LocalPath: &path})
		return
	}
	api.WriteJSON(w, http.StatusOK, DownloadResponse{DownloadID: d.id})
}

// HandleProgress answers GET /v1/models/download/progress?id= with SSE progress.
func (s *Store) HandleProgress(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	if id == "" {
		api.WriteError(w, api.Validation("id", "missing query parameter id"))
		return
	}
	d := s.lookup(id)
	if d == nil {
		api.WriteError(w, api.Errorf(http.StatusNotFound, api.CodeNotFound, "Download %s not found", id).
			WithDetails(map[string]any{"download_id": id}))
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // no proxy buffering of the stream
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	send := func(format string, args ...any) bool {
		// A server WriteTimeout would cut a long download's stream; each
		// write gets its own deadline instead (ignored if unsupported).
		_ = rc.SetWriteDeadline(time.Now().Add(2 * s.keepAlive))
		if _, err := fmt.Fprintf(w, format, args...); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	ka := time.NewTicker(s.keepAlive)
	defer ka.Stop()
	var last Progress
	sent := false
	for {
		p, changed := d.snapshot()
		if !sent || p != last {
			b, err := json.Marshal(p)
			if err != nil || !send("data: %s\n\n", b) {
				return
			}
			last, sent = p, true
		}
		if p.Done() {
			send("data: [DONE]\n\n")
			return
		}
		select {
		case <-changed:
		case <-ka.C:
			if !send(": keep-alive\n\n") {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

// HandleList answers GET /v1/models: the catalog.
func (s *Store) HandleList(w http.ResponseWriter, r *http.Request) {
	ms, err := s.List(r.Context())
	if err != nil {
		s.log.Error("model list failed", "error", err)
		api.WriteError(w, err)
		return
	}
	api.WriteJSON(w, http.StatusOK, ListResponse{Models: ms})
}

// HandleDelete answers DELETE /v1/models/{ref...} (ref URL-escaped, or plain slashes).
func (s *Store) HandleDelete(w http.ResponseWriter, r *http.Request) {
	m, err := s.Delete(r.Context(), refFromPath(r))
	if err != nil {
		api.WriteError(w, err)
		return
	}
	api.WriteJSON(w, http.StatusOK, DeleteResponse{Ref: m.Ref, FreedBytes: m.SizeBytes})
}

// refFromPath is the {ref...} wildcard. api.Router dispatches through
// ServeMux.Handler, which does not fill in PathValue, so the escaped path is
// parsed here too.
func refFromPath(r *http.Request) string {
	if v := r.PathValue("ref"); v != "" {
		return v
	}
	raw := strings.TrimPrefix(r.URL.EscapedPath(), "/v1/models/")
	if v, err := url.PathUnescape(raw); err == nil {
		return v
	}
	return raw
}
