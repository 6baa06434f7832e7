package router

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"strconv"
	"time"
)

// Routes of the OpenAI endpoint, relative to the hive's root.
const (
	PathModels          = "/openai/v1/models"
	PathChatCompletions = "/openai/v1/chat/completions"
	PathCompletions     = "/openai/v1/completions"
)

// The worker routes a request is forwarded to.
const (
	RouteChatCompletions = "/v1/chat/completions"
	RouteCompletions     = "/v1/completions"
)

// Handler serves the OpenAI endpoint under /openai/v1/. The hive mounts it
// behind its own authentication.
func (r *Router) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PathModels, r.listModels)
	mux.HandleFunc("GET "+PathModels+"/{name}", r.getModel)
	mux.HandleFunc("POST "+PathChatCompletions, func(w http.ResponseWriter, req *http.Request) { r.complete(w, req, RouteChatCompletions) })
	mux.HandleFunc("POST "+PathCompletions, func(w http.ResponseWriter, req *http.Request) { r.complete(w, req, RouteCompletions) })
	mux.HandleFunc("POST "+PathModels+"/{name}/load", r.loadModel)
	mux.HandleFunc("POST "+PathModels+"/{name}/unload", r.unloadModel)
	mux.HandleFunc("/openai/", func(w http.ResponseWriter, req *http.Request) {
		writeError(w, http.StatusNotFound, "invalid_request_error", "not_found", "no such route: "+req.Method+" "+req.URL.Path, 0)
	})
	return mux
}

// errorBody is OpenAI's error shape.
type errorBody struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	} `json:"error"`
}

// WriteError answers with an error in OpenAI's shape; retry > 0 sets
// Retry-After. A Forwarder uses it for failures before the first byte.
func WriteError(w http.ResponseWriter, status int, typ, code, msg string, retry time.Duration) {
	writeError(w, status, typ, code, msg, retry)
}

func writeError(w http.ResponseWriter, status int, typ, code, msg string, retry time.Duration) {
	var b errorBody
	b.Error.Message, b.Error.Type, b.Error.Code = msg, typ, code
	if retry > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(retry.Seconds()))))
	}
	writeJSON(w, status, b)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeRouterError answers an error of Acquire, Load or Unload.
func writeRouterError(w http.ResponseWriter, name string, err error) {
	var ue *UnavailableError
	switch {
	case errors.Is(err, ErrUnknownModel):
		writeError(w, http.StatusNotFound, "invalid_request_error", "model_not_found", "The model '"+name+"' does not exist", 0)
	case errors.As(err, &ue):
		writeError(w, http.StatusServiceUnavailable, "server_error", ue.Code, ue.Error(), ue.RetryAfter)
	case errors.Is(err, context.Canceled):
		// The client left; nobody reads an answer.
	default:
		writeError(w, http.StatusBadGateway, "server_error", "hive_error", err.Error(), 0)
	}
}

type modelEntry struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
	// Workers and Ready say whether a request would be served at once;
	// OpenAI clients ignore fields they do not know.
	Workers int  `json:"workers"`
	Ready   bool `json:"ready"`
}

func (r *Router) entry(ctx context.Context, name string) modelEntry {
	e := modelEntry{ID: name, Object: "model", OwnedBy: "rbee-hive"}
	if ws, err := r.hive.Workers(ctx, name); err == nil {
		for _, w := range ws {
			if w.State != StateOther {
				e.Workers++
			}
			e.Ready = e.Ready || w.State == StateReady
		}
	}
	return e
}

func (r *Router) listModels(w http.ResponseWriter, req *http.Request) {
	data := make([]modelEntry, 0, len(r.names))
	for _, n := range r.names {
		data = append(data, r.entry(req.Context(), n))
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

func (r *Router) getModel(w http.ResponseWriter, req *http.Request) {
	name := req.PathValue("name")
	if r.models[name] == nil {
		writeRouterError(w, name, ErrUnknownModel)
		return
	}
	writeJSON(w, http.StatusOK, r.entry(req.Context(), name))
}

// complete reads the body once, routes by its "model" and forwards it.
func (r *Router) complete(w http.ResponseWriter, req *http.Request, route string) {
	body, err := io.ReadAll(io.LimitReader(req.Body, r.opts.MaxBodyBytes+1))
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "body_read_failed", "could not read the request body: "+err.Error(), 0)
		return
	}
	if int64(len(body)) > r.opts.MaxBodyBytes {
		writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "request_too_large", "the request body exceeds "+strconv.FormatInt(r.opts.MaxBodyBytes, 10)+" bytes", 0)
		return
	}
	var head struct {
		Model *string `json:"model"`
	}
	if err := json.Unmarshal(body, &head); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_json", "the request body is not a JSON object: "+err.Error(), 0)
		return
	}
	if head.Model == nil || *head.Model == "" {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "model_missing", "you must provide a model parameter", 0)
		return
	}
	name := *head.Model
	// A worker that died a moment ago may still be listed ready: the
	// forwarder's 502 before any byte (nothing reached the client) is held
	// back once, the worker set aside, and the request routed again.
	for attempt := 0; ; attempt++ {
		lease, err := r.Acquire(req.Context(), name)
		if err != nil {
			writeRouterError(w, name, err)
			return
		}
		out := req.Clone(req.Context())
		out.Body = io.NopCloser(bytes.NewReader(body))
		out.ContentLength = int64(len(body))
		out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
		hw := &holdWriter{ResponseWriter: w, hold: attempt == 0}
		r.fwd.Forward(hw, out, lease.Target, route)
		if hw.held {
			r.setAside(lease.Target.WorkerID)
		}
		lease.Release()
		if !hw.held || req.Context().Err() != nil {
			return
		}
		r.log.Warn("worker unreachable; routing the request again", "model", name, "worker_id", lease.Target.WorkerID)
	}
}

// holdWriter passes a response through, except that with hold set a 502
// (the worker could not be reached) is swallowed and remembered in held.
type holdWriter struct {
	http.ResponseWriter
	hold, held, started bool
}

func (h *holdWriter) WriteHeader(code int) {
	if !h.started && h.hold && code == http.StatusBadGateway {
		h.held = true
	}
	h.started = true
	if !h.held {
		h.ResponseWriter.WriteHeader(code)
	}
}

func (h *holdWriter) Write(b []byte) (int, error) {
	if !h.started {
		h.WriteHeader(http.StatusOK)
	}
	if h.held {
		return len(b), nil
	}
	return h.ResponseWriter.Write(b)
}

// FlushError keeps a held answer from being flushed out as a 200.
func (h *holdWriter) FlushError() error {
	if h.held {
		return nil
	}
	return http.NewResponseController(h.ResponseWriter).Flush()
}

func (h *holdWriter) Unwrap() http.ResponseWriter { return h.ResponseWriter }

func (r *Router) loadModel(w http.ResponseWriter, req *http.Request) {
	name := req.PathValue("name")
	wk, err := r.Load(req.Context(), name)
	if err != nil {
		writeRouterError(w, name, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": name, "object": "model", "loaded": true, "worker_id": wk.ID})
}

func (r *Router) unloadModel(w http.ResponseWriter, req *http.Request) {
	name := req.PathValue("name")
	n, err := r.Unload(req.Context(), name)
	if err != nil {
		writeRouterError(w, name, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": name, "object": "model", "loaded": false, "stopped": n})
}
