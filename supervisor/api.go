package supervisor

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/api"
)

// WorkerInfo is a worker as the API shows it: the original fields (RFC 3339
// timestamps instead of serde's SystemTime objects) plus the hive's own.
type WorkerInfo struct {
	ID                 string     `json:"id"`
	URL                string     `json:"url"`
	ModelRef           string     `json:"model_ref"`
	Backend            string     `json:"backend"`
	Device             int        `json:"device"`
	State              State      `json:"state"`
	LastActivity       time.Time  `json:"last_activity"`
	SlotsTotal         int        `json:"slots_total"`
	SlotsAvailable     int        `json:"slots_available"`
	FailedHealthChecks int        `json:"failed_health_checks"`
	PID                *int       `json:"pid"`
	RestartCount       int        `json:"restart_count"`
	LastRestart        *time.Time `json:"last_restart"`
	LastHeartbeat      *time.Time `json:"last_heartbeat"`

	StateReason      string            `json:"state_reason,omitempty"`
	Health           string            `json:"health,omitempty"`
	Status           string            `json:"status,omitempty"`
	HealthMode       string            `json:"health_mode"`
	RestartPolicy    string            `json:"restart_policy"`
	MemoryLimitBytes int64             `json:"memory_limit_bytes"`
	VRAMBytes        int64             `json:"vram_bytes,omitempty"`
	GPUUUID          string            `json:"gpu_uuid,omitempty"`
	Port             int               `json:"port"`
	CreatedAt        time.Time         `json:"created_at"`
	StartedAt        *time.Time        `json:"started_at,omitempty"`
	InFlight         int               `json:"in_flight"`
	ExitReason       string            `json:"exit_reason,omitempty"`
	ExitCode         *int              `json:"exit_code,omitempty"`
	ExitSignal       *int              `json:"exit_signal,omitempty"`
	ContextSize      int               `json:"context_size,omitempty"` // what an OpenAI engine reports (engine.go)
	Figures          map[string]string `json:"figures,omitempty"`
	Resources        *Resources        `json:"resources,omitempty"`
}

// Resources are a running worker's figures from its latest monitor sample
// (every resources.sample_interval): its cgroup's memory and CPU and, for
// cuda workers, the GPU memory of the processes in its cgroup.
type Resources struct {
	MemoryCurrentBytes uint64  `json:"memory_current_bytes"`
	MemoryPeakBytes    uint64  `json:"memory_peak_bytes"`
	CPUSeconds         float64 `json:"cpu_seconds"`
	// CPUPercent is the CPU rate between the last two samples; 100 is one
	// core. Absent until there are two samples.
	CPUPercent *float64 `json:"cpu_percent,omitempty"`
	Pids       uint64   `json:"pids"`
	OOMKills   uint64   `json:"oom_kills"`
	// VRAMBytes is sampled from the GPU for cuda workers; otherwise the
	// worker's own RBEE_VRAM_BYTES figure, if it reports one.
	VRAMBytes *uint64 `json:"vram_bytes,omitempty"`
	// VRAMLimitBytes is the expected VRAM × resources.vram_limit_factor;
	// absent when the expectation is unknown.
	VRAMLimitBytes *uint64   `json:"vram_limit_bytes,omitempty"`
	VRAMOverLimit  bool      `json:"vram_over_limit,omitempty"`
	SampledAt      time.Time `json:"sampled_at"`
}

// info snapshots w. Caller holds s.mu.
func (s *Supervisor) info(w *worker) WorkerInfo {
	wi := WorkerInfo{ID: w.id, URL: w.url, ModelRef: w.modelRef, Backend: w.backend, Device: w.device,
		State: w.state, LastActivity: w.lastActivity, SlotsTotal: 1, FailedHealthChecks: w.healthFails,
		RestartCount: w.restartCount, StateReason: w.reason, Health: w.health, Status: w.status,
		HealthMode: string(w.be.Health), RestartPolicy: w.policy, MemoryLimitBytes: w.memLimit, VRAMBytes: w.vram,
		GPUUUID: w.gpuUUID, Port: w.port, CreatedAt: w.created, InFlight: w.inflight, ExitReason: w.exitReason}
	if w.state == StateIdle {
		wi.SlotsAvailable = 1
	}
	if w.run != nil {
		pid, started := w.run.pid, w.run.started
		wi.PID, wi.StartedAt = &pid, &started
		wi.Resources = s.resources(w, w.run)
	}
	if !w.lastRestart.IsZero() {
		t := w.lastRestart
		wi.LastRestart = &t
	}
	if !w.lastHeartbeat.IsZero() {
		t := w.lastHeartbeat
		wi.LastHeartbeat = &t
	}
	if w.exitCode != nil {
		c := *w.exitCode
		if w.exitSignaled {
			wi.ExitSignal = &c
		} else {
			wi.ExitCode = &c
		}
	}
	if len(w.figures) > 0 {
		wi.Figures = make(map[string]string, len(w.figures))
		for k, v := range w.figures {
			wi.Figures[k] = v
		}
	}
	return wi
}

// List returns every registered worker, oldest first.
func (s *Supervisor) List() []WorkerInfo {
	s.mu.Lock()
	out := make([]WorkerInfo, 0, len(s.workers))
	for _, w := range s.workers {
		out = append(out, s.info(w))
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Get returns one worker. A running worker not sampled yet gets its cgroup
// figures read now.
func (s *Supervisor) Get(id string) (WorkerInfo, error) {
	s.mu.Lock()
	w := s.workers[id]
	if w == nil {
		s.mu.Unlock()
		return WorkerInfo{}, workerNotFound(id)
	}
	wi := s.info(w)
	r := w.run
	vram := w.figures["RBEE_VRAM_BYTES"]
	s.mu.Unlock()
	if r != nil && wi.Resources == nil {
		if st, err := r.leaf.Stats(); err == nil {
			wi.Resources = resourcesOf(st, time.Now())
		}
	}
	if wi.Resources != nil && wi.Resources.VRAMBytes == nil {
		if v, err := strconv.ParseUint(vram, 10, 64); err == nil {
			wi.Resources.VRAMBytes = &v
		}
	}
	return wi, nil
}

// Routes registers the worker API. auth guards every route; the ready and
// heartbeat routes also accept the worker's own RBEE_WORKER_TOKEN, for that
// worker only.
func (s *Supervisor) Routes(rt *api.Router, auth api.AuthFunc) {
	rt.HandleFunc("POST /v1/workers/spawn", auth, s.safe(s.handleSpawn))
	rt.HandleFunc("GET /v1/workers/list", auth, s.safe(s.handleList))
	rt.HandleFunc("GET /v1/workers/{id}", auth, s.safe(s.handleGet))
	rt.HandleFunc("DELETE /v1/workers/{id}", auth, s.safe(s.handleDelete))
	rt.HandleFunc("GET /v1/workers/{id}/logs", auth, s.safe(s.handleLogs))
	rt.HandleFunc("POST /v1/workers/{id}/inference", auth, s.safe(s.protocolGuard(routeRbee, s.handleInference)))
	s.engineRoutes(rt, auth)
	rt.HandleFunc("POST /v1/workers/ready", nil, s.safe(func(w http.ResponseWriter, r *http.Request) { s.handleReady(w, r, auth) }))
	rt.HandleFunc("POST /v1/heartbeat", nil, s.safe(func(w http.ResponseWriter, r *http.Request) { s.handleHeartbeat(w, r, auth) }))
}

// safe turns a panic in a handler into a 500 envelope instead of a dropped
// connection; a bug must not take a request path down with it. The panic
// goes to the supervisor's logger (journald), not the process default.
func (s *Supervisor) safe(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.log.Error("panic in worker API handler", slog.Any("panic", v), slog.String("method", r.Method),
					slog.String("path", r.URL.Path), slog.String("stack", string(debug.Stack())))
				api.WriteError(w, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "internal error"))
			}
		}()
		h(w, r)
	}
}

// writeError answers err as the JSON envelope. An error that is no
// *api.Error goes out as a bare "internal error", so its text is logged
// here: otherwise nobody would ever see it.
func (s *Supervisor) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var ae *api.Error
	if !errors.As(err, &ae) {
		s.log.Error("worker API request failed", slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.Any("err", err))
	}
	api.WriteError(w, err)
}

func (s *Supervisor) handleSpawn(w http.ResponseWriter, r *http.Request) {
	var req SpawnRequest
	if err := api.DecodeJSON(w, r, &req); err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.Spawn(r.Context(), req)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	api.WriteJSON(w, http.StatusOK, res)
}

func (s *Supervisor) handleList(w http.ResponseWriter, r *http.Request) {
	api.WriteJSON(w, http.StatusOK, map[string]any{"workers": s.List()})
}

func (s *Supervisor) handleGet(w http.ResponseWriter, r *http.Request) {
	wi, err := s.Get(pathID(r))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.engineDetails(r.Context(), &wi)
	api.WriteJSON(w, http.StatusOK, wi)
}

func (s *Supervisor) handleDelete(w http.ResponseWriter, r *http.Request) {
	// A client that hangs up must not cut the worker's grace period short:
	// the stop was accepted and runs to its end either way.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.cfg.Workers.GracePeriod.D()+30*time.Second)
	defer cancel()
	wi, err := s.Stop(ctx, pathID(r))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	api.WriteJSON(w, http.StatusOK, wi)
}

func (s *Supervisor) handleLogs(w http.ResponseWriter, r *http.Request) {
	stream := r.URL.Query().Get("stream")
	if stream != "" && stream != "stdout" && stream != "stderr" {
		api.WriteError(w, badField("stream", "must be stdout or stderr, got %q", stream))
		return
	}
	id := pathID(r)
	s.mu.Lock()
	wk := s.workers[id]
	s.mu.Unlock()
	if wk == nil {
		api.WriteError(w, workerNotFound(id))
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(wk.logs.tail(stream))
}

func (s *Supervisor) handleInference(w http.ResponseWriter, r *http.Request) {
	id := pathID(r)
	s.mu.Lock()
	wk := s.workers[id]
	if wk == nil {
		s.mu.Unlock()
		api.WriteError(w, workerNotFound(id))
		return
	}
	if wk.state != StateIdle && wk.state != StateBusy {
		st := wk.state
		s.mu.Unlock()
		api.WriteError(w, api.Errorf(http.StatusConflict, api.CodeConflict, "worker %s is %s, not ready for inference", id, st).
			WithDetails(map[string]any{"worker_id": id, "state": string(st)}))
		return
	}
	r0 := wk.run
	target := ProxyTarget{WorkerID: id, Backend: wk.backend, Model: wk.modelRef, Token: wk.token,
		API: string(wk.be.API), Route: engineRoute(r, id)}
	s.mu.Unlock()
	if s.deps.Proxy == nil {
		api.WriteError(w, api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "no inference proxy configured"))
		return
	}
	u, err := url.Parse(wk.url)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	target.URL = u
	// counted says this request holds one of wk.inflight (guarded by s.mu):
	// a second OnEnd must not end another request's count, and a proxy that
	// panics or forgets OnEnd must not leave the worker busy for good.
	counted := false
	target.OnStart = func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if wk.run != r0 || counted {
			return
		}
		counted = true
		wk.inflight++
		if wk.state == StateIdle {
			s.setState(wk, StateBusy, "inference")
		}
	}
	target.OnEnd = func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if !counted {
			return
		}
		counted = false
		if wk.run != r0 || wk.inflight == 0 {
			return
		}
		wk.inflight--
		if wk.inflight == 0 && wk.state == StateBusy {
			s.setState(wk, StateIdle, "inference done")
		}
	}
	defer target.OnEnd()
	s.deps.Proxy.Forward(w, r, target)
}

// pathID is the {id} of /v1/workers/{id}[/...]. It falls back to parsing
// the path because api.Router dispatches via ServeMux.Handler, which does
// not fill in path values.
func pathID(r *http.Request) string {
	if id := r.PathValue("id"); id != "" {
		return id
	}
	rest := strings.TrimPrefix(r.URL.Path, "/v1/workers/")
	id, _, _ := strings.Cut(rest, "/")
	return id
}

// workerAuth authenticates the ready and heartbeat routes: the API token
// (returns "") or a worker's own token (returns its id).
func (s *Supervisor) workerAuth(r *http.Request, auth api.AuthFunc) (string, *api.Error) {
	if auth == nil {
		return "", nil
	}
	aerr := auth(r)
	if aerr == nil {
		return "", nil
	}
	tok := api.BearerToken(r)
	if tok == "" {
		return "", aerr
	}
	s.mu.Lock()
	id, ok := s.tokens[tokenKey(tok)]
	s.mu.Unlock()
	if !ok {
		return "", aerr
	}
	return id, nil
}

func forbiddenFor(self, other string) *api.Error {
	return api.Errorf(http.StatusForbidden, "FORBIDDEN", "a worker token may only report for its own worker").
		WithDetails(map[string]any{"worker_id": other})
}

// ReadyRequest is the original ready callback body.
type ReadyRequest struct {
	WorkerID string `json:"worker_id"`
	URL      string `json:"url"`
	ModelRef string `json:"model_ref"`
	Backend  string `json:"backend"`
	Device   *int64 `json:"device"`
}

// handleReady is POST /v1/workers/ready. Unlike the original, an unknown
// worker id is a 404, not a silent 200.
func (s *Supervisor) handleReady(w http.ResponseWriter, r *http.Request, auth api.AuthFunc) {
	self, aerr := s.workerAuth(r, auth)
	if aerr != nil {
		api.WriteError(w, aerr)
		return
	}
	var req ReadyRequest
	if err := api.DecodeJSON(w, r, &req); err != nil {
		s.writeError(w, r, err)
		return
	}
	if msg := checkIdentifier(req.WorkerID, 256); msg != "" {
		api.WriteError(w, badField("worker_id", "%s", msg))
		return
	}
	if msg := checkModelRef(req.ModelRef); msg != "" {
		api.WriteError(w, badField("model_ref", "%s", msg))
		return
	}
	if msg := checkIdentifier(req.Backend, 64); msg != "" {
		api.WriteError(w, badField("backend", "%s", msg))
		return
	}
	if req.Device == nil {
		api.WriteError(w, api.Errorf(http.StatusUnprocessableEntity, api.CodeValidation, "missing field `device`").
			WithDetails(map[string]any{"field": "device"}))
		return
	}
	if self != "" && self != req.WorkerID {
		api.WriteError(w, forbiddenFor(self, req.WorkerID))
		return
	}
	s.mu.Lock()
	wk := s.workers[req.WorkerID]
	if wk == nil || (wk.run == nil && !wk.starting) {
		s.mu.Unlock()
		api.WriteError(w, workerNotFound(req.WorkerID))
		return
	}
	if wk.run == nil {
		// Called back before its start was registered: apply it then.
		if wk.early == nil {
			wk.early = make(map[string]string)
		}
		wk.early["READY"] = "1"
		wk.earlyVia = "POST /v1/workers/ready"
	} else {
		s.markReady(wk, "POST /v1/workers/ready")
	}
	s.mu.Unlock()
	api.WriteJSON(w, http.StatusOK, map[string]string{"message": "Worker registered as ready"})
}

// HeartbeatRequest is the original heartbeat body.
type HeartbeatRequest struct {
	WorkerID     string `json:"worker_id"`
	Timestamp    string `json:"timestamp"`
	HealthStatus string `json:"health_status"`
}

func (s *Supervisor) handleHeartbeat(w http.ResponseWriter, r *http.Request, auth api.AuthFunc) {
	self, aerr := s.workerAuth(r, auth)
	if aerr != nil {
		s.m.heartbeatsRejected.WithLabelValues(rejectUnauthorized).Inc()
		api.WriteError(w, aerr)
		return
	}
	var req HeartbeatRequest
	if err := api.DecodeJSON(w, r, &req); err != nil {
		s.m.heartbeatsRejected.WithLabelValues(rejectInvalid).Inc()
		s.writeError(w, r, err)
		return
	}
	if req.WorkerID == "" || len(req.WorkerID) > 256 {
		s.m.heartbeatsRejected.WithLabelValues(rejectInvalid).Inc()
		api.WriteError(w, api.Errorf(http.StatusUnprocessableEntity, api.CodeValidation, "worker_id must be 1 to 256 characters").
			WithDetails(map[string]any{"field": "worker_id"}))
		return
	}
	if req.HealthStatus != "healthy" && req.HealthStatus != "degraded" {
		s.m.heartbeatsRejected.WithLabelValues(rejectInvalid).Inc()
		api.WriteError(w, api.Errorf(http.StatusUnprocessableEntity, api.CodeValidation,
			"health_status must be \"healthy\" or \"degraded\", got %q", req.HealthStatus).WithDetails(map[string]any{"field": "health_status"}))
		return
	}
	if self != "" && self != req.WorkerID {
		s.m.heartbeatsRejected.WithLabelValues(rejectUnauthorized).Inc()
		api.WriteError(w, forbiddenFor(self, req.WorkerID))
		return
	}
	s.mu.Lock()
	wk := s.workers[req.WorkerID]
	if wk == nil || wk.state.terminal() {
		s.mu.Unlock()
		s.m.heartbeatsRejected.WithLabelValues(rejectUnknownWorker).Inc()
		api.WriteError(w, workerNotFound(req.WorkerID))
		return
	}
	wk.health = req.HealthStatus
	s.heartbeat(wk)
	s.mu.Unlock()
	api.WriteJSON(w, http.StatusOK, map[string]string{"message": "Heartbeat received"})
}
