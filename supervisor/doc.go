// Package supervisor is rbee-hive's worker supervisor: it spawns each worker
// into its own cgroup leaf, learns when it is ready and alive, stops and
// restarts it, captures its output, serves the worker HTTP API and exports
// the worker metrics.
//
// Where things are:
//   - state.go: the worker states, exit reasons and the table of allowed
//     transitions that setState enforces.
//   - worker.go: the worker record and one run (process) of it.
//   - registry.go: keeping and dropping workers (terminal ones are kept for
//     inspection, at most maxTerminal).
//   - validate.go, spawn.go: checking a spawn request, admission, the model,
//     registration; start.go: starting one run (argv, environment, leaf);
//     output_pipes.go, output_poller.go (one goroutine and one epoll for
//     every run's pipes), output_lines.go (cutting lines) and logs.go: the
//     run's stdout/stderr and the log sink.
//   - notify_intake.go: sd_notify datagrams, attributed by the sender's
//     cgroup; readiness.go: ready and heartbeat; health.go: the http-mode
//     probe.
//   - deadlines.go: the load, stale and restart deadlines the Run loop fires.
//   - exit.go: waiting for a run (watchExit: internal/reaper's one epoll
//     loop reports every exit), then onExit(w, r, status): tree kill, leaf
//     removal, the exit classified (OOM from the leaf's counter); restart.go: the restart policy, backoff and circuit breaker;
//     stop.go: stop, shutdown and leftover cleanup.
//   - monitor.go: resource samples and the VRAM limit; metrics.go; api.go:
//     the HTTP handlers.
//
// Concurrency: one mutex (Supervisor.mu) guards the registry and every
// mutable field of every worker; it is never held across process starts,
// kills, HTTP calls or sleeps, nor across the model store's release or log
// file removal (queued for Supervisor.unlock). One loop (Run) owns time: load
// timeouts, stale deadlines and restart backoffs are deadlines on the
// workers, and the loop sleeps until the earliest one (no polling). Each
// process has exactly one goroutine waiting for the reaper's report of its
// exit (parked on a channel; the reaper's loop is the one thread blocked for
// all of them), which then kills what is left of the tree, removes the leaf
// and reports the exit; that and, in http mode, the health poller are all
// an idle worker's goroutines (its output is read by the shared poller,
// notify datagrams by the listener). A second
// goroutine of Run, the monitor, samples every running worker each
// resources.sample_interval (cgroup memory and CPU; for cuda workers the
// GPU's per-process memory of the pids in the leaf), stores the sample on the
// run for the API and /metrics, and applies resources.vram_limit_action.
//
// Behaviour worth knowing:
//   - The process is started inside the spawn request (a few ms), so a
//     missing binary is a 500 at once and leaves nothing behind; readiness
//     is never waited for. A model that must be downloaded answers state
//     "downloading" and starts when the download ends.
//   - Readiness follows the backend's health mode: READY=1 counts in notify
//     and callback mode, the HTTP probe alone in http mode; POST
//     /v1/workers/ready is accepted in every mode. Ready and heartbeat
//     accept the API token or the worker's own RBEE_WORKER_TOKEN, the latter
//     for itself only.
//   - DELETE /v1/workers/{id} stops the worker (SIGTERM, grace, cgroup kill)
//     and removes it from the registry. Workers that end by themselves
//     (stopped, failed) stay listed with their exit_reason until deleted.
//   - Every unplanned exit, a clean one under restart=always included,
//     counts towards the backoff and the circuit breaker.
package supervisor
