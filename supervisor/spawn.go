package supervisor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/rbee/rbee-hive/api"
)

// SpawnResult is the response to POST /v1/workers/spawn.
type SpawnResult struct {
	WorkerID string `json:"worker_id"`
	URL      string `json:"url"`
	State    State  `json:"state"`
}

// spawn failure reasons (rbee_hive_worker_spawn_failures_total{reason}).
const (
	failCgroup = "cgroup"
	failExec   = "exec"
	failModel  = "model"
	failPorts  = "ports"
	// failAdmission: a GPU worker whose downloaded model does not fit.
	failAdmission = "admission"
)

var spawnFailReasons = []string{failCgroup, failExec, failModel, failPorts, failAdmission}

// spawnError is a failed process start, with its metric reason.
type spawnError struct {
	reason string
	err    error
}

func (e *spawnError) Error() string { return e.err.Error() }
func (e *spawnError) Unwrap() error { return e.err }

// errNotStarted: startRun found the worker stopped (a DELETE that raced a
// restart or the end of a download) or the hive shutting down. Nothing
// failed, so it is neither a spawn failure nor an exit.
var errNotStarted = errors.New("worker not started: it was stopped, or the hive is shutting down")

// safe environment every worker starts from; never the hive's own.
const safePath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// errShuttingDown answers a spawn while the hive shuts down.
func errShuttingDown() *api.Error {
	return api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "the hive is shutting down")
}

// Spawn validates req, admits it, registers the worker and starts it (or
// its model download). It returns as soon as the process runs; readiness is
// reported later. A failed spawn leaves nothing behind.
func (s *Supervisor) Spawn(ctx context.Context, req SpawnRequest) (SpawnResult, error) {
	p, err := s.validateSpawn(ctx, &req)
	if err != nil {
		return SpawnResult{}, err
	}
	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()
	if closing {
		return SpawnResult{}, errShuttingDown()
	}
	id, err := newWorkerID()
	if err != nil {
		return SpawnResult{}, fmt.Errorf("worker id: %w", err)
	}
	modelPath, wait, modelRel, err := s.resolveModel(ctx, p)
	if err != nil {
		s.m.spawnFailures.WithLabelValues(failModel).Inc()
		return SpawnResult{}, err
	}
	local := wait == nil
	claim, err := s.admit(ctx, id, p, pathIf(local, modelPath))
	if err != nil {
		modelRel()
		return SpawnResult{}, err
	}
	// undo releases what this spawn holds when it fails before registering.
	undo := func() {
		releaseClaim(claim)
		modelRel()
	}
	token, err := randomHex(32)
	if err != nil {
		undo()
		return SpawnResult{}, fmt.Errorf("worker token: %w", err)
	}
	port, err := s.allocPort(id)
	if err != nil {
		undo()
		s.m.spawnFailures.WithLabelValues(failPorts).Inc()
		return SpawnResult{}, err
	}
	w := s.newWorker(id, p, modelPath, port, token, claim, modelRel)
	if !local {
		if !s.register(w, StateDownloading, func(w *worker) { s.startDownload(w, wait) }) {
			undo()
			return SpawnResult{}, errShuttingDown()
		}
		return SpawnResult{WorkerID: id, URL: w.url, State: StateDownloading}, nil
	}
	if !s.register(w, StateLoading, nil) {
		undo()
		return SpawnResult{}, errShuttingDown()
	}
	if err := s.startRun(w, "spawned"); err != nil {
		s.mu.Lock()
		s.removeLocked(w)
		s.unlock()
		undo()
		return SpawnResult{}, s.spawnFailed(w, err)
	}
	return SpawnResult{WorkerID: id, URL: w.url, State: StateLoading}, nil
}

// admit asks the admitter (if any) for the resources of a new worker.
// modelPath is "" while the model is still to be downloaded.
func (s *Supervisor) admit(ctx context.Context, id string, p *spawnPlan, modelPath string) (Claim, error) {
	if s.deps.Admitter == nil {
		return nil, nil
	}
	c, err := s.deps.Admitter.Admit(ctx, AdmitRequest{WorkerID: id, Backend: p.backend, Device: p.device,
		GPUUUID: p.gpuUUID, CUDA: p.backendCfg.CUDA, MemoryBytes: p.memoryLimit, VRAMBytes: p.vramRequested,
		ModelRef: p.modelRef, ModelPath: modelPath, ContextSize: p.contextSize, Parallel: p.backendCfg.Parallel})
	if err != nil {
		return nil, fmt.Errorf("admission: %w", err) // a 507 *api.Error keeps its status and code
	}
	return c, nil
}

// newWorker builds the record of a worker about to be registered.
func (s *Supervisor) newWorker(id string, p *spawnPlan, modelPath string, port int, token string, claim Claim, modelRel func()) *worker {
	w := &worker{
		id: id, backend: p.backend, backendCfg: p.backendCfg, device: p.device, gpuUUID: p.gpuUUID,
		modelRef: p.modelRef, modelPath: modelPath, port: port, served: p.served, contextSize: p.contextSize,
		url:   "http://" + net.JoinHostPort(s.cfg.WorkerHost, strconv.Itoa(port)),
		token: token, restartPolicy: p.policy, memoryLimit: p.memoryLimit, vramRequested: p.vramRequested, requestEnv: p.env,
		createdAt: time.Now(), claim: claim, releaseModel: modelRel,
		log: s.log.With(slog.String("worker_id", id), slog.String("backend", p.backend), slog.Int("device", p.device)),
	}
	if p.backendCfg.CUDA {
		w.vramExpected = w.vramRequested
		if w.vramExpected == 0 && claim != nil {
			w.vramExpected = claim.VRAMBytes()
		}
	}
	w.logs = newLogSink(id, s.logDir, int64(s.cfg.Workers.LogMaxBytes), s.cfg.Workers.LogFiles, s.deps.LineSink)
	w.logs.log, w.logs.dropped = w.log, s.m.logLinesDropped
	return w
}

// register adds w to the registry in state first, then runs then (if
// non-nil) under s.mu. It returns false, freeing w's port, when the hive
// is shutting down.
func (s *Supervisor) register(w *worker, first State, then func(w *worker)) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		delete(s.ports, w.port)
		return false
	}
	s.workers[w.id] = w
	s.tokens[tokenKey(w.token)] = w.id
	w.state = first
	w.lastActivity = w.createdAt
	w.log.Info("worker registered", slog.String("model_ref", w.modelRef), slog.String("state", string(w.state)),
		slog.String("url", w.url), slog.String("restart", string(w.restartPolicy)), slog.Int64("memory_limit_bytes", w.memoryLimit))
	if then != nil {
		then(w)
	}
	return true
}

// startDownload waits for w's model in the background. Caller holds s.mu.
func (s *Supervisor) startDownload(w *worker, wait <-chan ModelResult) {
	dctx, cancel := context.WithCancel(context.Background())
	w.cancelDownload = cancel
	s.wg.Add(1)
	go s.download(dctx, w, wait)
}

// spawnFailed is the answer to a spawn whose process did not start.
func (s *Supervisor) spawnFailed(w *worker, err error) error {
	if errors.Is(err, errNotStarted) {
		return api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "worker %s was stopped before it started, or the hive is shutting down", w.id)
	}
	s.m.spawnFailures.WithLabelValues(spawnReason(err)).Inc()
	w.log.Error("worker spawn failed", slog.Any("err", err))
	return api.Errorf(http.StatusInternalServerError, api.CodeInternal, "Failed to spawn worker: %v", err).
		WithDetails(map[string]any{"reason": spawnReason(err)})
}

func pathIf(ok bool, p string) string {
	if ok {
		return p
	}
	return ""
}

func releaseClaim(c Claim) {
	if c != nil {
		c.Release()
	}
}

func spawnReason(err error) string {
	var se *spawnError
	if errors.As(err, &se) {
		return se.reason
	}
	return failExec
}

// resolveModel finds the model's path or starts its download (wait non-nil).
// Without a model store, file:<path> is the path and any other reference
// is passed through. The returned release ends the in-use mark.
func (s *Supervisor) resolveModel(ctx context.Context, p *spawnPlan) (string, <-chan ModelResult, func(), error) {
	if s.deps.Models == nil {
		return p.reference, nil, func() {}, nil
	}
	release := s.deps.Models.Acquire(p.modelRef)
	path, wait, err := s.deps.Models.Ensure(ctx, p.modelRef)
	if err != nil {
		release()
		return "", nil, nil, fmt.Errorf("model %s: %w", p.modelRef, err)
	}
	return path, wait, release, nil
}

// download waits for the model of a downloading worker, then starts it.
func (s *Supervisor) download(ctx context.Context, w *worker, wait <-chan ModelResult) {
	defer s.wg.Done()
	var res ModelResult
	select {
	case res = <-wait:
	case <-ctx.Done():
		res.Err = ctx.Err()
	}
	path, err := res.Path, res.Err
	s.mu.Lock()
	w.cancelDownload = nil
	if w.state != StateDownloading {
		s.mu.Unlock()
		return // stopped meanwhile
	}
	if err != nil {
		s.m.spawnFailures.WithLabelValues(failModel).Inc()
		w.exitReason = ReasonSpawnFailed
		s.finish(w, StateFailed, "model download failed: "+err.Error())
		s.unlock()
		return
	}
	w.modelPath = path
	readmit := s.deps.Admitter != nil && w.backendCfg.CUDA && w.vramRequested == 0
	s.mu.Unlock()
	if readmit {
		// At spawn the file did not exist, so its VRAM need could not be
		// estimated and only the margin was claimed; now it can.
		if err := s.admitAgain(ctx, w); err != nil {
			s.mu.Lock()
			defer s.unlock()
			if !w.state.terminal() {
				s.m.spawnFailures.WithLabelValues(failAdmission).Inc()
				w.exitReason = ReasonSpawnFailed
				s.finish(w, StateFailed, "admission after the model download: "+err.Error())
			}
			return
		}
	}
	if err := s.startRun(w, "model downloaded"); err != nil {
		s.startFailed(w, err)
	}
}

// admitAgain replaces w's claim with a fresh admission for its next run:
// after a download (the model file now exists, so its VRAM can be
// estimated) and before a restart (the dead run's memory was given back,
// and a reload needs it again). The old claim goes first so the new one is
// not judged against it. On error w holds no claim.
func (s *Supervisor) admitAgain(ctx context.Context, w *worker) error {
	s.mu.Lock()
	old := w.claim
	w.claim = nil
	req := AdmitRequest{WorkerID: w.id, Backend: w.backend, Device: w.device, GPUUUID: w.gpuUUID, CUDA: w.backendCfg.CUDA,
		MemoryBytes: w.memoryLimit, VRAMBytes: w.vramRequested, ModelRef: w.modelRef, ModelPath: w.modelPath, ContextSize: w.contextSize, Parallel: w.backendCfg.Parallel}
	s.mu.Unlock()
	releaseClaim(old)
	c, err := s.deps.Admitter.Admit(ctx, req)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if w.state.terminal() {
		releaseClaim(c) // stopped while admitting
		return errNotStarted
	}
	w.claim = c
	if w.backendCfg.CUDA && w.vramRequested == 0 {
		w.vramExpected = c.VRAMBytes()
	}
	return nil
}

// newWorkerID returns "w-" and 12 random lowercase letters and digits.
func newWorkerID() (string, error) {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "w-" + string(b), nil
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// allocPort reserves a port for id: not held by a registered worker and
// bindable right now. Each candidate is reserved in s.ports before it is
// probed, so concurrent spawns never get the same port, yet the bind probes
// (a thousand of them when the range is nearly full) run without s.mu. The
// scan starts after the last port handed out so a port just released is
// not reused at once.
func (s *Supervisor) allocPort(id string) (int, error) {
	lo, hi := s.cfg.Workers.PortMin, s.cfg.Workers.PortMax
	n := hi - lo + 1
	s.mu.Lock()
	start := s.nextPort
	s.mu.Unlock()
	if start < lo || start > hi {
		start = lo
	}
	for i := 0; i < n; i++ {
		p := lo + (start-lo+i)%n
		s.mu.Lock()
		if _, held := s.ports[p]; held {
			s.mu.Unlock()
			continue
		}
		s.ports[p] = id
		s.mu.Unlock()
		free := s.portFree(s.cfg.WorkerHost, p)
		s.mu.Lock()
		if free {
			s.nextPort = p + 1
			s.mu.Unlock()
			return p, nil
		}
		delete(s.ports, p)
		s.mu.Unlock()
	}
	return 0, api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "No available ports (%d-%d all in use)", lo, hi)
}

func portFree(host string, port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}
