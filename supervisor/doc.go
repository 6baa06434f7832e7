// Package supervisor is rbee-hive's worker supervisor: the registry of
// workers and their state machine, spawning each worker into its own cgroup
// leaf, readiness (notify, http, callback), heartbeats and stale detection,
// stop and shutdown, the restart policy, worker output capture, the worker
// HTTP API and the worker metrics.
//
// Concurrency: one mutex (Supervisor.mu) guards the registry and every
// mutable field of every worker; it is never held across process starts,
// kills, HTTP calls or sleeps, nor across the model store's release or log
// file removal (queued for Supervisor.unlock). One loop (Run) owns time: load timeouts, stale
// deadlines and restart backoffs are deadlines on the workers, and the loop
// sleeps until the earliest one (no polling). Each process has exactly one
// goroutine calling cmd.Wait, which then kills what is left of the tree,
// removes the leaf and reports the exit. A second goroutine of Run, the
// monitor, samples every running worker each resources.sample_interval
// (cgroup memory and CPU; for cuda workers the GPU's per-process memory of
// the pids in the leaf), stores the sample on the run for the API and
// /metrics, and applies resources.vram_limit_action.
//
// Decisions where the original differs or is silent:
//   - model_path in a spawn request is accepted and ignored, as in the
//     original; {model_path} comes from the ModelStore, or without one is the
//     part after "provider:" (so file:/m/x.gguf gives /m/x.gguf).
//   - The process is started inside the spawn request (a few ms) so a
//     missing binary is a 500 at once and leaves nothing behind; readiness
//     is never waited for. A model that must be downloaded answers
//     state "downloading" and starts when the download ends.
//   - POST /v1/workers/ready with an unknown worker id is a JSON 404 (the
//     original answered a silent 200). Ready and heartbeat accept the API
//     token or the worker's own RBEE_WORKER_TOKEN, the latter for itself only
//     (403 otherwise).
//   - Readiness follows the backend's health mode: READY=1 counts in notify
//     and callback mode, the HTTP probe alone in http mode; POST
//     /v1/workers/ready is accepted in every mode.
//   - DELETE /v1/workers/{id} stops the worker (SIGTERM, grace, cgroup kill)
//     and removes it from the registry; a second DELETE is a 404. Workers
//     that end by themselves (stopped, failed) stay listed with their
//     exit_reason until deleted (at most 256 are kept).
//   - Every unplanned exit, a clean one under restart=always included,
//     counts towards the backoff and the circuit breaker.
package supervisor
