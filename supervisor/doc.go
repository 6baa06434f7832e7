// Package supervisor is rbee-hive's worker supervisor: the registry of
// workers and their state machine, spawning each worker into its own cgroup
// leaf, readiness (notify, http, callback), heartbeats and stale detection,
// stop and shutdown, the restart policy, worker output capture, the worker
// HTTP API and the worker metrics.
//
// Concurrency: one mutex (Supervisor.mu) guards the registry and every
// mutable field of every worker; it is never held across process starts,
// kills, HTTP calls or sleeps. One loop (Run) owns time: load timeouts, stale
// deadlines and restart backoffs are deadlines on the workers, and the loop
// sleeps until the earliest one (no polling). Each process has exactly one
// goroutine calling cmd.Wait, which then kills what is left of the tree,
// removes the leaf and reports the exit.
package supervisor
