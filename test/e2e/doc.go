// Package e2e holds end-to-end tests of the real rbee-hive daemon: the built
// binary with a temporary config, real cgroups, real worker processes
// (rbee-simworker), a real systemd-journald (systemd/journaltest) and a real
// Prometheus scraping the hive and evaluating the shipped dashboard and alert
// rules. The package has no code of its own; see the _test.go files.
//
// The tests need root (cgroups, mount namespaces), journald and journalctl
// (Debian "systemd"), prometheus and promtool (Debian "prometheus"). Without
// them they skip and say why, except under CI (CI set), where a missing
// prerequisite is a failure. They run one at a time: each starts its own
// hive, journald and Prometheus.
//
//	go test ./test/e2e/
//	go test -run '^$' -bench Metrics ./test/e2e/   # /metrics latency with 0/100/1000 workers
package e2e
