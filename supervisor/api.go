package supervisor

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/procfs"
	workerproto "github.com/rbee/rbee-hive/worker"
)

// WorkerInfo is a worker as the API shows it (timestamps in RFC 3339).
type WorkerInfo struct {
	ID       string `json:"id"`
	URL      string `json:"url"`
	ModelRef string `json:"model_ref"`
	// Served is the served model (config [served.NAME]) the hive's OpenAI
	// endpoint started this worker for; absent for workers spawned directly.
	Served             string     `json:"served,omitempty"`
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
	HealthMode       config.HealthMode `json:"health_mode"`
	RestartPolicy    RestartPolicy     `json:"restart_policy"`
	MemoryLimitBytes int64             `json:"memory_limit_bytes"`
	VRAMBytes        int64             `json:"vram_bytes,omitempty"`
	GPUUUID          string            `json:"gpu_uuid,omitempty"`
	Port             int               `json:"port"`
	// User is who the worker runs as: its uid (a uid of its own), the
	// backend's system user, or "root"; empty before its first start.
	User        string            `json:"user,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	StartedAt   *time.Time        `json:"started_at,omitempty"`
	AdoptedAt   *time.Time        `json:"adopted_at,omitempty"` // when a restarted hive took over the running process
	InFlight    int               `json:"in_flight"`
	ExitReason  ExitReason        `json:"exit_reason,omitempty"`
	ExitCode    *int              `json:"exit_code,omitempty"`
	ExitSignal  *int              `json:"exit_signal,omitempty"`
	ContextSize int               `json:"context_size,omitempty"` // what an OpenAI engine reports (engine.go)
	Figures     map[string]string `json:"figures,omitempty"`
	Resources   *Resources        `json:"resources,omitempty"`
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
	wi := WorkerInfo{ID: w.id, URL: w.url, ModelRef: w.modelRef, Served: w.served, Backend: w.backend, Device: w.device,
		State: w.state, LastActivity: w.lastActivity, SlotsTotal: 1, FailedHealthChecks: w.failedHealthChecks,
		RestartCount: w.restartCount, StateReason: w.stateReason, Health: w.reportedHealth, Status: w.statusLine,
		HealthMode: w.backendCfg.Health, RestartPolicy: w.restartPolicy, MemoryLimitBytes: w.memoryLimit, VRAMBytes: int64(w.vramRequested),
		GPUUUID: w.gpuUUID, Port: w.port, CreatedAt: w.createdAt, InFlight: w.inFlight, ExitReason: w.exitReason,
		User: userName(w.backendCfg, w.iso)}
	if w.state == StateIdle {
		wi.SlotsAvailable = 1
	}
	if w.run != nil {
		pid, started := w.run.pid, w.run.started
		wi.PID, wi.StartedAt = &pid, &started
		wi.Resources = s.resources(w, w.run)
	}
	if !w.adoptedAt.IsZero() {
		t := w.adoptedAt
		wi.AdoptedAt = &t
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
	vram := w.figures[workerproto.KeyVRAMBytes]
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

// HandleSpawn answers POST /v1/workers/spawn.
func (s *Supervisor) HandleSpawn(w http.ResponseWriter, r *http.Request) error {
	var req SpawnRequest
	if err := api.DecodeJSON(w, r, &req); err != nil {
		return err
	}
	res, err := s.Spawn(r.Context(), req)
	if err != nil {
		return err
	}
	api.WriteJSON(w, http.StatusOK, res)
	return nil
}

// HandleList answers GET /v1/workers/list.
func (s *Supervisor) HandleList(w http.ResponseWriter, r *http.Request) error {
	api.WriteJSON(w, http.StatusOK, map[string]any{"workers": s.List()})
	return nil
}

// HandleGet answers GET /v1/workers/{id}.
func (s *Supervisor) HandleGet(w http.ResponseWriter, r *http.Request) error {
	wi, err := s.Get(pathID(r))
	if err != nil {
		return err
	}
	s.engineDetails(r.Context(), &wi)
	api.WriteJSON(w, http.StatusOK, wi)
	return nil
}

// HandleDelete answers DELETE /v1/workers/{id}.
func (s *Supervisor) HandleDelete(w http.ResponseWriter, r *http.Request) error {
	// A client that hangs up must not cut the worker's grace period short:
	// the stop was accepted and runs to its end either way.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.cfg.Workers.GracePeriod.D()+30*time.Second)
	defer cancel()
	wi, err := s.Stop(ctx, pathID(r))
	if err != nil {
		return err
	}
	api.WriteJSON(w, http.StatusOK, wi)
	return nil
}

// HandleLogs answers GET /v1/workers/{id}/logs.
func (s *Supervisor) HandleLogs(w http.ResponseWriter, r *http.Request) error {
	stream := r.URL.Query().Get("stream")
	if stream != "" && stream != streamStdout && stream != streamStderr {
		return badField("stream", "must be stdout or stderr, got %q", stream)
	}
	id := pathID(r)
	s.mu.Lock()
	wk := s.workers[id]
	s.mu.Unlock()
	if wk == nil {
		return workerNotFound(id)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(wk.logs.tail(stream))
	return nil
}

// HandleInference answers POST /v1/workers/{id}/inference.
func (s *Supervisor) HandleInference(w http.ResponseWriter, r *http.Request) error {
	id := pathID(r)
	return s.Forward(w, r, id, engineRoute(r, id))
}

// Forward sends r to the engine route of worker id through the inference
// proxy, counted in the worker's requests in flight and busy state as the
// per-worker routes are (the OpenAI endpoint uses it). An error (unknown
// worker, not ready) is returned before anything is written.
func (s *Supervisor) Forward(w http.ResponseWriter, r *http.Request, id, route string) error {
	s.mu.Lock()
	wk := s.workers[id]
	if wk == nil {
		s.mu.Unlock()
		return workerNotFound(id)
	}
	if wk.state != StateIdle && wk.state != StateBusy {
		st := wk.state
		s.mu.Unlock()
		return api.Errorf(http.StatusConflict, api.CodeConflict, "worker %s is %s, not ready for inference", id, st).
			WithDetails(map[string]any{"worker_id": id, "state": string(st)})
	}
	r0 := wk.run
	target := ProxyTarget{WorkerID: id, Backend: wk.backend, Model: wk.modelRef, Served: wk.served, Token: wk.token,
		API: string(wk.backendCfg.API), Route: route}
	workerURL := wk.url // a restart may move the worker to another port
	checkPort := r0 != nil && !r0.portOwned
	s.mu.Unlock()
	if s.deps.Proxy == nil {
		return api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "no inference proxy configured")
	}
	if checkPort {
		if err := s.proxyPortCheck(wk, r0); err != nil {
			return err
		}
	}
	u, err := url.Parse(workerURL)
	if err != nil {
		return err
	}
	target.URL = u
	// counted says this request holds one of wk.inFlight (guarded by s.mu):
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
		wk.inFlight++
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
		if wk.run != r0 || wk.inFlight == 0 {
			return
		}
		wk.inFlight--
		if wk.inFlight == 0 && wk.state == StateBusy {
			s.setState(wk, StateIdle, "inference done")
		}
	}
	defer target.OnEnd()
	s.deps.Proxy.Forward(w, r, target)
	return nil
}

// CheckPort is the proxy's port check for callers that connect to a worker
// themselves (the served-model router): nil when the worker's current run
// holds its port, or nothing listens yet (the connect then fails on its
// own); a 502 *api.Error when another process holds it. Cheap after the
// first success of a run.
func (s *Supervisor) CheckPort(id string) error {
	s.mu.Lock()
	wk := s.workers[id]
	if wk == nil || wk.run == nil {
		s.mu.Unlock()
		return workerNotFound(id)
	}
	r0, owned := wk.run, wk.run.portOwned
	s.mu.Unlock()
	if owned {
		return nil
	}
	return s.proxyPortCheck(wk, r0)
}

// proxyPortCheck runs at the first request to a run after its readiness
// (and after a failed health check): the proxy connects only to a port the
// run holds. Once it holds it, no other uid can bind the same address
// (SO_REUSEPORT groups need one uid), so later requests are not checked.
func (s *Supervisor) proxyPortCheck(wk *worker, r0 *run) error {
	err := s.portHeld(wk, r0)
	if err == nil {
		s.mu.Lock()
		r0.portOwned = true
		s.mu.Unlock()
		return nil
	}
	if errors.Is(err, procfs.ErrSquatter) {
		s.mu.Lock()
		first := !r0.squatterLogged
		r0.squatterLogged = true
		s.mu.Unlock()
		if first {
			s.m.portSquatters.Inc()
		}
		wk.log.Error("request not proxied: another process listens on the worker's port", slog.Int("port", wk.port), slog.Any("err", err))
		return api.Errorf(http.StatusBadGateway, api.CodeUpstream, "worker %s: its port %d is held by another process", wk.id, wk.port)
	}
	// Nothing listens, or the check failed: the proxy's own connect
	// error tells the caller; the next request checks again.
	return nil
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

// ReadyRequest is the body of POST /v1/workers/ready.
type ReadyRequest struct {
	WorkerID string `json:"worker_id"`
	URL      string `json:"url"`
	ModelRef string `json:"model_ref"`
	Backend  string `json:"backend"`
	Device   *int64 `json:"device"`
}

// HandleReady answers POST /v1/workers/ready (auth class worker-token):
// apiAuth accepts the API token, and a worker's own token is accepted for
// that worker. An unknown worker id is a 404: a silent 200 would hide a
// worker that talks to the wrong hive.
func (s *Supervisor) HandleReady(apiAuth api.AuthFunc) api.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error { return s.ready(w, r, apiAuth) }
}

func (s *Supervisor) ready(w http.ResponseWriter, r *http.Request, auth api.AuthFunc) error {
	self, aerr := s.workerAuth(r, auth)
	if aerr != nil {
		return aerr
	}
	var req ReadyRequest
	if err := api.DecodeJSON(w, r, &req); err != nil {
		return err
	}
	if msg := checkIdentifier(req.WorkerID, 256); msg != "" {
		return badField("worker_id", "%s", msg)
	}
	if msg := checkModelRef(req.ModelRef); msg != "" {
		return badField("model_ref", "%s", msg)
	}
	if msg := checkIdentifier(req.Backend, 64); msg != "" {
		return badField("backend", "%s", msg)
	}
	if req.Device == nil {
		return api.Errorf(http.StatusUnprocessableEntity, api.CodeValidation, "missing field `device`").
			WithDetails(map[string]any{"field": "device"})
	}
	if self != "" && self != req.WorkerID {
		return forbiddenFor(self, req.WorkerID)
	}
	s.mu.Lock()
	wk := s.workers[req.WorkerID]
	if wk == nil || (wk.run == nil && !wk.startInFlight) {
		s.mu.Unlock()
		return workerNotFound(req.WorkerID)
	}
	if wk.run == nil {
		// Called back before its start was registered: apply it then.
		if wk.earlyFields == nil {
			wk.earlyFields = make(map[string]string)
		}
		wk.earlyFields[workerproto.KeyReady] = "1"
		wk.earlyReadyVia = "POST /v1/workers/ready"
	} else {
		s.markReady(wk, "POST /v1/workers/ready")
	}
	s.mu.Unlock()
	api.WriteJSON(w, http.StatusOK, map[string]string{"message": "Worker registered as ready"})
	return nil
}

// HeartbeatRequest is the body of POST /v1/heartbeat.
type HeartbeatRequest struct {
	WorkerID     string `json:"worker_id"`
	Timestamp    string `json:"timestamp"`
	HealthStatus string `json:"health_status"`
}

// HandleHeartbeat answers POST /v1/heartbeat (auth class worker-token),
// authenticated as HandleReady is.
func (s *Supervisor) HandleHeartbeat(apiAuth api.AuthFunc) api.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error { return s.heartbeatCallback(w, r, apiAuth) }
}

func (s *Supervisor) heartbeatCallback(w http.ResponseWriter, r *http.Request, auth api.AuthFunc) error {
	self, aerr := s.workerAuth(r, auth)
	if aerr != nil {
		s.m.heartbeatsRejected.WithLabelValues(rejectUnauthorized).Inc()
		return aerr
	}
	var req HeartbeatRequest
	if err := api.DecodeJSON(w, r, &req); err != nil {
		s.m.heartbeatsRejected.WithLabelValues(rejectInvalid).Inc()
		return err
	}
	if req.WorkerID == "" || len(req.WorkerID) > 256 {
		s.m.heartbeatsRejected.WithLabelValues(rejectInvalid).Inc()
		return api.Errorf(http.StatusUnprocessableEntity, api.CodeValidation, "worker_id must be 1 to 256 characters").
			WithDetails(map[string]any{"field": "worker_id"})
	}
	if h := workerproto.HealthStatus(req.HealthStatus); h != workerproto.Healthy && h != workerproto.Degraded {
		s.m.heartbeatsRejected.WithLabelValues(rejectInvalid).Inc()
		return api.Errorf(http.StatusUnprocessableEntity, api.CodeValidation,
			"health_status must be \"healthy\" or \"degraded\", got %q", req.HealthStatus).WithDetails(map[string]any{"field": "health_status"})
	}
	if self != "" && self != req.WorkerID {
		s.m.heartbeatsRejected.WithLabelValues(rejectUnauthorized).Inc()
		return forbiddenFor(self, req.WorkerID)
	}
	s.mu.Lock()
	wk := s.workers[req.WorkerID]
	if wk == nil || wk.state.terminal() {
		s.mu.Unlock()
		s.m.heartbeatsRejected.WithLabelValues(rejectUnknownWorker).Inc()
		return workerNotFound(req.WorkerID)
	}
	wk.reportedHealth = req.HealthStatus
	s.heartbeat(wk)
	s.mu.Unlock()
	api.WriteJSON(w, http.StatusOK, map[string]string{"message": "Heartbeat received"})
	return nil
}
