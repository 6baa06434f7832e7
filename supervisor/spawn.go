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
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/cgroup"
)

// SpawnResult is the original spawn response.
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
		return SpawnResult{}, api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "the hive is shutting down")
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
	var claim Claim
	if s.deps.Admitter != nil {
		c, err := s.deps.Admitter.Admit(ctx, AdmitRequest{WorkerID: id, Backend: p.backend, Device: p.device,
			GPUUUID: p.gpuUUID, CUDA: p.be.CUDA, MemoryBytes: p.memLimit, VRAMBytes: p.vram,
			ModelRef: p.modelRef, ModelPath: pathIf(local, modelPath), ContextSize: p.be.ContextSize, Parallel: p.be.Parallel})
		if err != nil {
			modelRel()
			return SpawnResult{}, fmt.Errorf("admission: %w", err) // a 507 *api.Error keeps its status and code
		}
		claim = c
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
	w := &worker{
		id: id, backend: p.backend, be: p.be, device: p.device, gpuUUID: p.gpuUUID,
		modelRef: p.modelRef, modelPath: modelPath, port: port,
		url:   "http://" + net.JoinHostPort(s.cfg.WorkerHost, strconv.Itoa(port)),
		token: token, policy: p.policy, memLimit: p.memLimit, vram: p.vram, reqEnv: p.env,
		created: time.Now(), claim: claim, modelRel: modelRel,
		log: s.log.With(slog.String("worker_id", id), slog.String("backend", p.backend), slog.Int("device", p.device)),
	}
	if p.be.CUDA {
		w.vramExpected = uint64(p.vram)
		if w.vramExpected == 0 && claim != nil {
			w.vramExpected = claim.VRAMBytes()
		}
	}
	w.logs = newLogSink(id, s.logDir, int64(s.cfg.Workers.LogMaxBytes), s.cfg.Workers.LogFiles, s.deps.LineSink)
	s.mu.Lock()
	if s.closing {
		delete(s.ports, port)
		s.mu.Unlock()
		undo()
		return SpawnResult{}, api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "the hive is shutting down")
	}
	s.workers[id] = w
	s.tokens[tokenKey(token)] = id
	w.state = StateLoading
	if !local {
		w.state = StateDownloading
	}
	w.lastActivity = w.created
	w.log.Info("worker registered", slog.String("model_ref", w.modelRef), slog.String("state", string(w.state)),
		slog.String("url", w.url), slog.String("restart", w.policy), slog.Int64("memory_limit_bytes", w.memLimit))
	if !local {
		dctx, cancel := context.WithCancel(context.Background())
		w.cancelPre = cancel
		s.wg.Add(1)
		s.mu.Unlock()
		go s.download(dctx, w, wait)
		return SpawnResult{WorkerID: id, URL: w.url, State: StateDownloading}, nil
	}
	s.mu.Unlock()
	if err := s.startRun(w, "spawned"); err != nil {
		s.mu.Lock()
		s.removeLocked(w)
		s.unlock()
		undo()
		if errors.Is(err, errNotStarted) {
			return SpawnResult{}, api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "worker %s was stopped before it started, or the hive is shutting down", id)
		}
		s.m.spawnFailures.WithLabelValues(spawnReason(err)).Inc()
		w.log.Error("worker spawn failed", slog.Any("err", err))
		return SpawnResult{}, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "Failed to spawn worker: %v", err).
			WithDetails(map[string]any{"reason": spawnReason(err)})
	}
	return SpawnResult{WorkerID: id, URL: w.url, State: StateLoading}, nil
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
	w.cancelPre = nil
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
	readmit := s.deps.Admitter != nil && w.be.CUDA && w.vram == 0
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
	req := AdmitRequest{WorkerID: w.id, Backend: w.backend, Device: w.device, GPUUUID: w.gpuUUID, CUDA: w.be.CUDA,
		MemoryBytes: w.memLimit, VRAMBytes: w.vram, ModelRef: w.modelRef, ModelPath: w.modelPath, ContextSize: w.be.ContextSize, Parallel: w.be.Parallel}
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
	if w.be.CUDA && w.vram == 0 {
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

// expandArgs substitutes the backend template's placeholders; never a shell.
func (s *Supervisor) expandArgs(w *worker) []string {
	r := strings.NewReplacer("{port}", strconv.Itoa(w.port), "{model_path}", w.modelPath, "{model_ref}", w.modelRef,
		"{worker_id}", w.id, "{device}", strconv.Itoa(w.device), "{self_dir}", s.deps.SelfDir)
	out := make([]string, len(w.be.Command))
	for i, a := range w.be.Command {
		out[i] = r.Replace(a)
	}
	return out
}

// workerEnv builds the environment from an allow-list: a fixed safe base,
// the backend's env, the request's env, then the hive's contract variables,
// which nothing overrides.
func (s *Supervisor) workerEnv(w *worker) []string {
	env := map[string]string{"PATH": safePath, "HOME": "/", "LANG": "C.UTF-8"}
	for k, v := range w.be.Env {
		env[k] = v
	}
	for k, v := range w.reqEnv {
		env[k] = v
	}
	env["RBEE_WORKER_ID"] = w.id
	env["WATCHDOG_USEC"] = strconv.FormatInt(s.cfg.Heartbeat.StaleThreshold.D().Microseconds(), 10)
	env["RBEE_WORKER_TOKEN"] = w.token
	delete(env, "NOTIFY_SOCKET")
	delete(env, "WATCHDOG_PID")
	if w.be.Health != "callback" {
		// callback workers get no socket, so they use the HTTP fallback.
		env["NOTIFY_SOCKET"] = s.cfg.Heartbeat.NotifySocket
	}
	delete(env, "RBEE_HIVE_URL")
	if s.deps.HiveURL != "" {
		env["RBEE_HIVE_URL"] = s.deps.HiveURL
	}
	delete(env, "CUDA_VISIBLE_DEVICES")
	delete(env, "CUDA_DEVICE_ORDER")
	if w.be.CUDA {
		env["CUDA_VISIBLE_DEVICES"] = w.gpuUUID
		env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// createLeaf makes the worker's leaf; a leaf left by an earlier run of the
// same worker (a failed delete) is emptied and replaced.
func (s *Supervisor) createLeaf(w *worker) (cgroup.Leaf, error) {
	lim := cgroup.Limits{MemoryMax: w.memLimit, PidsMax: s.cfg.Workers.PidsMax}
	leaf, err := s.deps.Cgroups.Create(w.id, lim)
	if err == nil {
		return leaf, nil
	}
	old, lerr := s.deps.Cgroups.Load(w.id)
	if lerr != nil {
		return nil, fmt.Errorf("create cgroup leaf: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if kerr := old.Kill(ctx); kerr != nil {
		return nil, fmt.Errorf("create cgroup leaf: %w (emptying the old one: %v)", err, kerr)
	}
	if derr := old.Delete(); derr != nil {
		return nil, fmt.Errorf("create cgroup leaf: %w (deleting the old one: %v)", err, derr)
	}
	leaf, err = s.deps.Cgroups.Create(w.id, lim)
	if err != nil {
		return nil, fmt.Errorf("create cgroup leaf: %w", err)
	}
	return leaf, nil
}

// startRun starts one process of w inside a fresh leaf. Callers check the
// worker's state before they let go of s.mu, so it is checked again here: a
// worker stopped in between gets no process (errNotStarted).
func (s *Supervisor) startRun(w *worker, why string) error {
	s.mu.Lock()
	if s.closing || w.state.terminal() || w.state == StateStopping {
		s.mu.Unlock()
		return errNotStarted
	}
	s.starting.Add(1)
	w.starting, w.early = true, nil
	argv := s.expandArgs(w)
	env := s.workerEnv(w)
	s.mu.Unlock()
	defer s.starting.Done()
	defer func() {
		s.mu.Lock()
		w.starting, w.early = false, nil
		s.mu.Unlock()
	}()

	leaf, err := s.createLeaf(w)
	if err != nil {
		return &spawnError{reason: failCgroup, err: err}
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Dir = "/"
	outR, outW, err := os.Pipe()
	if err != nil {
		_ = leaf.Delete()
		return &spawnError{reason: failExec, err: fmt.Errorf("stdout pipe: %w", err)}
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		_ = leaf.Delete()
		return &spawnError{reason: failExec, err: fmt.Errorf("stderr pipe: %w", err)}
	}
	// *os.File outputs: Wait does not wait for our readers, so a grandchild
	// holding the pipe cannot delay exit handling.
	cmd.Stdout, cmd.Stderr = outW, errW
	rctx, cancel := context.WithCancel(context.Background())
	r := &run{leaf: leaf, cmd: cmd, cancel: cancel, done: make(chan struct{})}
	oom := &oomWatch{seen: make(chan struct{})}
	if ch, err := leaf.OOMEvents(rctx); err != nil {
		w.log.Warn("OOM events unavailable; relying on the leaf's counters", slog.Any("err", err))
	} else {
		go oom.drain(ch)
	}
	if err := leaf.Start(cmd); err != nil {
		cancel()
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		_ = leaf.Delete()
		return &spawnError{reason: failExec, err: fmt.Errorf("start %s: %w", argv[0], err)}
	}
	outW.Close()
	errW.Close()
	r.pid = cmd.Process.Pid
	r.started = time.Now()
	var readers sync.WaitGroup
	readers.Add(2)
	go func() { defer readers.Done(); w.logs.pump("stdout", outR) }()
	go func() { defer readers.Done(); w.logs.pump("stderr", errR) }()

	s.mu.Lock()
	w.run = r
	s.mainPID[r.pid] = w
	if w.state.terminal() || w.state == StateStopping {
		// Stopped while we were starting: this run must not live.
		w.pending, w.noRestart = ReasonStopped, true
		s.mu.Unlock()
		s.killRun(r)
		s.wg.Add(1)
		go s.wait(w, r, oom, &readers)
		return nil
	}
	w.pending, w.noRestart = "", false
	w.healthFails = 0
	w.exitCode = nil
	// What a run reported dies with it: a restarted worker must not show
	// its predecessor's health, status or figures (RBEE_VRAM_BYTES feeds
	// resources), and its own STOPPING=1 is logged again.
	w.health, w.status, w.figures, w.notedStopping = "", "", nil, false
	s.setState(w, StateLoading, why)
	s.setDeadline(w, dlLoad, r.started.Add(w.be.LoadTimeout.D()))
	if w.early != nil {
		s.applyFields(w, w.early)
	}
	w.starting, w.early = false, nil
	s.mu.Unlock()
	w.log.Info("worker started", slog.Int("pid", r.pid), slog.Int("port", w.port))

	if w.be.Health == "http" {
		go s.pollHealth(rctx, w, r)
	}
	s.wg.Add(1)
	go s.wait(w, r, oom, &readers)
	return nil
}

// oomWatch collects the leaf's OOM events for one run.
type oomWatch struct {
	once sync.Once
	seen chan struct{} // closed at the first OOM event
	n    atomic.Uint64
}

func (o *oomWatch) drain(ch <-chan cgroup.OOMEvent) {
	for range ch {
		o.n.Add(1)
		o.once.Do(func() { close(o.seen) })
	}
}

// startFailed handles a start that failed after the spawn request returned
// (after a download, or at a restart): it counts as a failed run.
func (s *Supervisor) startFailed(w *worker, err error) {
	if errors.Is(err, errNotStarted) {
		s.mu.Lock()
		defer s.unlock()
		if !w.state.terminal() { // the hive is closing
			s.finish(w, StateStopped, ReasonStopped)
		}
		return
	}
	s.m.spawnFailures.WithLabelValues(spawnReason(err)).Inc()
	s.m.exits.WithLabelValues(ReasonSpawnFailed).Inc()
	s.mu.Lock()
	defer s.unlock()
	w.log.Error("worker start failed", slog.Any("err", err))
	if w.state.terminal() {
		return // stopped while we were starting it
	}
	w.exitReason = ReasonSpawnFailed
	w.exitCode = nil
	if s.closing || w.noRestart || w.state == StateStopping {
		s.finish(w, StateStopped, ReasonStopped)
		return
	}
	s.afterFailure(w, ReasonSpawnFailed, time.Now(), time.Now(), err.Error())
}
