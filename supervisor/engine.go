package supervisor

// Workers whose backend has api = "openai" are engines such as llama.cpp's
// llama-server: the hive proxies their OpenAI routes and, where the engine
// offers them, reads its slots and context size (llama-server's GET /props
// and /slots) into the worker's API view.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/config"
)

// The inference routes under /v1/workers/{id} (the proxy's Route values).
const (
	RouteChat       = "/v1/chat/completions"
	RouteCompletion = "/v1/completions"
	RouteNative     = "/completion"
	RouteRbee       = "/inference"
)

// engineTimeout bounds each read of an engine's /props or /slots, so a
// wedged engine cannot hold GET /v1/workers/{id}.
const engineTimeout = 2 * time.Second

// engineRoute is the part of r's path after /v1/workers/{id}.
func engineRoute(r *http.Request, id string) string {
	return strings.TrimPrefix(r.URL.Path, "/v1/workers/"+id)
}

// HandleWorkerRoute answers POST /v1/workers/{id}<route> through the
// inference proxy, refusing (404) a route the worker's backend does not
// speak: the rbee route on an OpenAI engine, the OpenAI routes on an rbee
// worker, and llama.cpp's /completion unless the backend enables it.
func (s *Supervisor) HandleWorkerRoute(route string) api.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		id := pathID(r)
		s.mu.Lock()
		wk := s.workers[id]
		var be config.Backend
		if wk != nil {
			be = wk.backendCfg
		}
		s.mu.Unlock()
		if wk == nil {
			return workerNotFound(id)
		}
		var why string
		switch {
		case route == RouteRbee && be.API == config.APIOpenAI:
			why = "speaks the OpenAI API: use /v1/workers/{id}/v1/chat/completions or /v1/completions"
		case route != RouteRbee && be.API != config.APIOpenAI:
			why = "speaks the rbee protocol: use /v1/workers/{id}/inference"
		case route == RouteNative && !be.NativeCompletion:
			why = "does not enable llama.cpp's /completion (native_completion)"
		}
		if why != "" {
			return api.Errorf(http.StatusNotFound, api.CodeNotFound, "worker %s (backend %s) %s", id, wk.backend, why).
				WithDetails(map[string]any{"worker_id": id, "api": string(be.API), "route": route})
		}
		return s.HandleInference(w, r)
	}
}

// engineDetails asks an OpenAI engine for its slots and context size and
// puts what it answers into wi; an engine without /props or /slots leaves
// wi as it is.
func (s *Supervisor) engineDetails(ctx context.Context, wi *WorkerInfo) {
	if wi.State != StateIdle && wi.State != StateBusy {
		return
	}
	s.mu.Lock()
	wk := s.workers[wi.ID]
	openai := wk != nil && wk.backendCfg.API == config.APIOpenAI
	s.mu.Unlock()
	if !openai {
		return
	}
	base, err := url.Parse(wi.URL)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, engineTimeout)
	defer cancel()
	client := &http.Client{Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()

	var props struct {
		TotalSlots int `json:"total_slots"`
		Settings   struct {
			NCtx int `json:"n_ctx"`
		} `json:"default_generation_settings"`
	}
	if getJSON(ctx, client, base.JoinPath("/props"), &props) == nil {
		if props.TotalSlots > 0 {
			wi.SlotsTotal = props.TotalSlots
		}
		if props.Settings.NCtx > 0 {
			wi.ContextSize = props.Settings.NCtx
		}
	}
	var slots []struct {
		NCtx         int  `json:"n_ctx"`
		IsProcessing bool `json:"is_processing"`
	}
	if getJSON(ctx, client, base.JoinPath("/slots"), &slots) == nil && len(slots) > 0 {
		wi.SlotsTotal, wi.SlotsAvailable = len(slots), 0
		for _, sl := range slots {
			if !sl.IsProcessing {
				wi.SlotsAvailable++
			}
			if wi.ContextSize == 0 {
				wi.ContextSize = sl.NCtx
			}
		}
	}
}

func getJSON(ctx context.Context, c *http.Client, u *url.URL, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", u.Path, resp.Status)
	}
	return json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(v)
}
