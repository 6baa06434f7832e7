package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/router"
	"github.com/rbee/rbee-hive/supervisor"
)

// servedHive adapts the supervisor to router.Hive. The workers the OpenAI
// endpoint starts carry their served model's name (WorkerInfo.Served), which
// is how they are told apart from workers spawned through /v1/workers.
type servedHive struct {
	sup  *supervisor.Supervisor
	cfg  *config.Config
	gpus gpu.GPUs // nil or DriverNone: CPU only
}

func (h servedHive) Workers(ctx context.Context, served string) ([]router.Worker, error) {
	var out []router.Worker
	for _, wi := range h.sup.List() {
		if wi.Served == served {
			out = append(out, h.worker(wi))
		}
	}
	return out, nil
}

// worker maps a supervisor worker to the router's view. Slots are the
// backend's parallel setting: asking the engine (/slots) per request would
// put an HTTP round trip on every routed request.
func (h servedHive) worker(wi supervisor.WorkerInfo) router.Worker {
	w := router.Worker{ID: wi.ID, State: routerState(wi.State), Slots: h.cfg.Backends[wi.Backend].Parallel, InFlight: wi.InFlight}
	if u, err := url.Parse(wi.URL); err == nil {
		w.URL = u
	}
	return w
}

func routerState(s supervisor.State) router.State {
	switch s {
	case supervisor.StateIdle, supervisor.StateBusy:
		return router.StateReady
	case supervisor.StateDownloading, supervisor.StateLoading, supervisor.StateRestarting:
		return router.StateLoading
	}
	return router.StateOther
}

// Spawn starts a worker of the served model and waits until it is ready.
// A cuda backend is tried on each GPU in turn; admission's refusal on all
// of them for memory is a *router.NoRoomError, so the router makes room.
func (h servedHive) Spawn(ctx context.Context, served string) (router.Worker, error) {
	s, ok := h.cfg.Served[served]
	if !ok {
		return router.Worker{}, fmt.Errorf("no served model %q", served)
	}
	devices := []int64{0}
	if h.cfg.Backends[s.Backend].CUDA && h.gpus != nil && h.gpus.Backend() != gpu.DriverNone {
		devs, err := h.gpus.Devices(ctx)
		if err != nil {
			return router.Worker{}, fmt.Errorf("listing GPUs: %w", err)
		}
		devices = devices[:0]
		for _, d := range devs {
			devices = append(devices, int64(d.Index))
		}
	}
	req := supervisor.SpawnRequest{ModelRef: servedRef(s.Model), Backend: s.Backend, Served: served, ContextSize: s.ContextSize}
	if mem := int64(h.cfg.ServedMemoryLimit(served)); mem > 0 {
		req.MemoryLimitBytes = &mem
	}
	var refused error = &router.NoRoomError{Resource: "vram", Detail: "no GPU on this host"}
	for _, dev := range devices {
		d := dev
		req.Device = &d
		res, err := h.sup.Spawn(ctx, req)
		if err != nil {
			if nr := noRoom(err); nr != nil {
				refused = nr
				continue
			}
			return router.Worker{}, err
		}
		return h.waitReady(ctx, res.WorkerID)
	}
	return router.Worker{}, refused
}

// servedRef is a served model's reference as a spawn request takes it: a
// bare absolute path is a file: reference.
func servedRef(ref string) string {
	if strings.HasPrefix(ref, "/") {
		return "file:" + ref
	}
	return ref
}

// noRoom turns admission's 507 for memory or VRAM into the router's
// NoRoomError; disk (a download that cannot fit) is not made room for.
func noRoom(err error) *router.NoRoomError {
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusInsufficientStorage {
		return nil
	}
	switch ae.Code {
	case api.CodeInsufficientVRAM:
		return &router.NoRoomError{Resource: "vram", Detail: ae.Message}
	case api.CodeInsufficientMemory:
		return &router.NoRoomError{Resource: "ram", Detail: ae.Message}
	case api.CodeInsufficientDisk:
		return &router.NoRoomError{Resource: "disk", Detail: ae.Message}
	}
	return nil
}

// waitReady waits for worker id to be ready. A crash while loading is the
// supervisor's to restart (the worker stays loading for the router); failed
// or stopped ends the wait. ctx ending stops the worker.
func (h servedHive) waitReady(ctx context.Context, id string) (router.Worker, error) {
	for {
		changed := h.sup.StateChanged()
		wi, ok := h.find(id)
		if !ok {
			return router.Worker{}, fmt.Errorf("worker %s is gone", id)
		}
		switch wi.State {
		case supervisor.StateIdle, supervisor.StateBusy:
			return h.worker(wi), nil
		case supervisor.StateFailed, supervisor.StateStopped:
			return router.Worker{}, fmt.Errorf("worker %s %s while loading: %s", id, wi.State, wi.StateReason)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			go func() {
				sctx, cancel := context.WithTimeout(context.Background(), h.cfg.Workers.GracePeriod.D()+30*time.Second)
				defer cancel()
				_, _ = h.sup.Stop(sctx, id)
			}()
			return router.Worker{}, fmt.Errorf("waiting for worker %s: %w", id, ctx.Err())
		}
	}
}

func (h servedHive) find(id string) (supervisor.WorkerInfo, bool) {
	for _, wi := range h.sup.List() {
		if wi.ID == id {
			return wi, true
		}
	}
	return supervisor.WorkerInfo{}, false
}

func (h servedHive) Stop(ctx context.Context, id string) error {
	_, err := h.sup.Stop(ctx, id)
	var ae *api.Error
	if errors.As(err, &ae) && ae.Status == http.StatusNotFound {
		return nil // gone already
	}
	return err
}

// servedForwarder sends routed requests through the supervisor's own
// inference path, so they count in the worker's requests in flight, its
// busy/idle state and the inference metrics exactly as requests to
// /v1/workers/{id}/v1/chat/completions do.
func servedForwarder(sup *supervisor.Supervisor) router.Forwarder {
	return router.ForwarderFunc(func(w http.ResponseWriter, r *http.Request, t router.Target, route string) {
		if err := sup.Forward(w, r, t.WorkerID, route); err != nil {
			// The worker left between being chosen and the request (a
			// crash, a stop): nothing was written yet.
			router.WriteError(w, http.StatusBadGateway, "server_error", "worker_unreachable", err.Error(), 0)
		}
	})
}

// newOpenAIRouter builds the OpenAI endpoint over the supervisor.
func (h *hive) newOpenAIRouter(o router.Options) (*router.Router, error) {
	hv := servedHive{sup: h.sup, cfg: h.cfg, gpus: h.gpus}
	return router.New(hv, servedForwarder(h.sup), router.ModelsFromConfig(h.cfg), o)
}

// handleOpenAI serves /openai/v1/...; the route table names each route so
// that its auth class is declared, and the router's own mux dispatches.
func (h *hive) handleOpenAI(w http.ResponseWriter, r *http.Request) error {
	h.openaiHandler.ServeHTTP(w, r)
	return nil
}
