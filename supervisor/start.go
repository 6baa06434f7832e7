package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
	workerproto "github.com/rbee/rbee-hive/worker"
)

// expandArgs substitutes the backend template's placeholders; never a shell.
func (s *Supervisor) expandArgs(w *worker) []string {
	r := strings.NewReplacer("{port}", strconv.Itoa(w.port), "{model_path}", w.modelPath, "{model_ref}", w.modelRef,
		"{worker_id}", w.id, "{device}", strconv.Itoa(w.device), "{self_dir}", s.deps.SelfDir)
	out := make([]string, len(w.backendCfg.Command))
	for i, a := range w.backendCfg.Command {
		out[i] = r.Replace(a)
	}
	return out
}

// workerEnv builds the environment from an allow-list: a fixed safe base,
// the backend's env, the request's env, then the hive's contract variables,
// which nothing overrides.
func (s *Supervisor) workerEnv(w *worker) []string {
	env := map[string]string{"PATH": safePath, "HOME": "/", "LANG": "C.UTF-8"}
	if w.home != "" {
		env["HOME"], env["XDG_CACHE_HOME"] = w.home, w.home+"/.cache"
	}
	for k, v := range w.backendCfg.Env {
		env[k] = v
	}
	for k, v := range w.requestEnv {
		env[k] = v
	}
	env[workerproto.EnvWorkerID] = w.id
	env[workerproto.EnvWatchdogUSec] = strconv.FormatInt(s.cfg.Heartbeat.StaleThreshold.D().Microseconds(), 10)
	env[workerproto.EnvWorkerToken] = w.token
	delete(env, workerproto.EnvNotifySocket)
	delete(env, workerproto.EnvWatchdogPID)
	if w.backendCfg.Health != config.HealthCallback {
		// callback workers get no socket, so they use the HTTP fallback.
		env[workerproto.EnvNotifySocket] = s.cfg.Heartbeat.NotifySocket
	}
	delete(env, workerproto.EnvHiveURL)
	if s.deps.HiveURL != "" {
		env[workerproto.EnvHiveURL] = s.deps.HiveURL
	}
	delete(env, "CUDA_VISIBLE_DEVICES")
	delete(env, "CUDA_DEVICE_ORDER")
	if w.backendCfg.CUDA {
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

// workerIdentity returns who w's next run is and makes its home on the
// first run. Caller holds s.mu (the home is a mkdir and two chowns).
func (s *Supervisor) workerIdentity(w *worker) (cgroup.Isolation, string, error) {
	if w.iso != nil {
		return *w.iso, w.home, nil
	}
	iso, err := s.ids.identity(w)
	if err != nil {
		return cgroup.Isolation{}, "", fmt.Errorf("worker identity: %w", err)
	}
	home, err := s.ids.home(w, iso)
	if err != nil {
		return cgroup.Isolation{}, "", err
	}
	w.iso, w.home = &iso, home
	w.log.Info("worker identity", slog.String("user", userName(w.backendCfg, w.iso)), slog.Uint64("uid", uint64(iso.UID)), slog.Uint64("gid", uint64(iso.GID)), slog.String("home", home))
	return iso, home, nil
}

// createLeaf makes the worker's leaf; a leaf left by an earlier run of the
// same worker (a failed delete) is emptied and replaced.
func (s *Supervisor) createLeaf(w *worker) (cgroup.Leaf, error) {
	lim := cgroup.Limits{MemoryMax: w.memoryLimit, PidsMax: s.cfg.Workers.PidsMax}
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
	if w.token == "" {
		// Adopted: the old process's token is not known in clear; this run
		// gets a new one.
		tok, err := randomHex(32)
		if err != nil {
			s.mu.Unlock()
			return &spawnError{reason: failExec, err: fmt.Errorf("worker token: %w", err)}
		}
		delete(s.tokens, w.tokenHash)
		w.token, w.tokenHash = tok, tokenKey(tok)
		s.tokens[w.tokenHash] = w.id
	}
	s.starting.Add(1)
	w.startInFlight, w.earlyFields = true, nil
	argv := s.expandArgs(w)
	iso, home, err := s.workerIdentity(w)
	if err != nil {
		w.startInFlight = false
		s.mu.Unlock()
		s.starting.Done()
		return &spawnError{reason: failExec, err: err}
	}
	env := s.workerEnv(w)
	noIsolation := s.noIsolation
	s.mu.Unlock()
	if w.backendCfg.User == userRoot {
		w.log.Warn("worker runs as root (backend user = \"root\"): it is not isolated from the hive", slog.String("home", home))
	}
	defer s.starting.Done()
	defer func() {
		s.mu.Lock()
		w.startInFlight, w.earlyFields = false, nil
		s.mu.Unlock()
	}()

	if err := canExec(argv[0], iso); err != nil {
		return &spawnError{reason: failExec, err: err}
	}
	leaf, err := s.createLeaf(w)
	if err != nil {
		return &spawnError{reason: failCgroup, err: err}
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Dir = "/"
	// A session of its own: Ctrl-C in the hive's terminal (make run) must
	// reach the hive alone, which then drains its workers in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := s.openOutput(w, cmd)
	if err != nil {
		_ = leaf.Delete()
		return &spawnError{reason: failExec, err: err}
	}
	rctx, cancel := context.WithCancel(context.Background())
	r := &run{leaf: leaf, cmd: cmd, cancel: cancel, done: make(chan struct{})}
	opts := []cgroup.StartOption{cgroup.WithIsolation(iso)}
	if noIsolation {
		opts = nil
	}
	if err := leaf.Start(cmd, opts...); err != nil {
		cancel()
		out.close()
		_ = leaf.Delete()
		return &spawnError{reason: failExec, err: fmt.Errorf("start %s: %w", argv[0], err)}
	}
	out.closeWriteEnds()
	r.pid = cmd.Process.Pid
	r.started = time.Now()
	r.argv = argv
	if s.proc != nil {
		r.pidStart, _ = s.proc.StartTime(r.pid) // 0 (not adoptable) if it already ended
	}
	s.pumpOutput(w, r, out)

	s.mu.Lock()
	w.run = r
	s.mainPID[r.pid] = w
	if w.state.terminal() || w.state == StateStopping {
		// Stopped while we were starting: this run must not live.
		w.killReason, w.noRestart = ReasonStopped, true
		s.mu.Unlock()
		s.killRun(r)
		s.watchExit(w, r)
		return nil
	}
	w.killReason, w.noRestart = "", false
	w.failedHealthChecks = 0
	w.exitCode = nil
	// What a run reported dies with it: a restarted worker must not show
	// its predecessor's health, status or figures (RBEE_VRAM_BYTES feeds
	// resources), and its own STOPPING=1 is logged again.
	w.reportedHealth, w.statusLine, w.figures, w.stoppingLogged = "", "", nil, false
	s.setState(w, StateLoading, why)
	s.setDeadline(w, dlLoad, r.started.Add(w.backendCfg.LoadTimeout.D()))
	s.persist(w)
	if w.earlyFields != nil {
		s.applyEarly(w)
	}
	w.startInFlight, w.earlyFields = false, nil
	s.mu.Unlock()
	w.log.Info("worker started", slog.Int("pid", r.pid), slog.Int("port", w.port))

	if w.backendCfg.Health == config.HealthHTTP {
		go s.pollHealth(rctx, w, r)
	}
	s.watchExit(w, r)
	return nil
}

// startFailed handles a start that failed after the spawn request returned
// (after a download, or at a restart): it counts as a failed run.
func (s *Supervisor) startFailed(w *worker, err error) {
	if errors.Is(err, errNotStarted) {
		s.mu.Lock()
		defer s.unlock()
		if !w.state.terminal() { // the hive is closing
			s.finish(w, StateStopped, string(ReasonStopped))
		}
		return
	}
	s.m.spawnFailures.WithLabelValues(spawnReason(err)).Inc()
	s.m.exits.WithLabelValues(string(ReasonSpawnFailed)).Inc()
	s.mu.Lock()
	defer s.unlock()
	w.log.Error("worker start failed", slog.Any("err", err))
	if w.state.terminal() {
		return // stopped while we were starting it
	}
	w.exitReason = ReasonSpawnFailed
	w.exitCode = nil
	if s.closing || w.noRestart || w.state == StateStopping {
		s.finish(w, StateStopped, string(ReasonStopped))
		return
	}
	s.afterFailure(w, ReasonSpawnFailed, time.Now(), time.Now(), err.Error())
}
