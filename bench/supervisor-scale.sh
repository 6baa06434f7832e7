#!/bin/sh
# What workers cost the hive at rest and per heartbeat (run as root, real
# cgroups), each against a baseline from the same run:
#   - heartbeat intake: datagrams from another process through the real
#     notify socket into the listener and the supervisor (attribution, the
#     fields, the stale deadline), allocations per datagram and CPU per
#     datagram against a raw ReadMsgUnix receiver in alternating rounds
#     (hive/raw is the ratio);
#   - idle workers: goroutines, OS threads and anonymous RSS per sleeping
#     worker at 100 and 1000 workers, against the same hive before them;
#   - one resource-monitor pass over 50 workers: CPU and allocations (the
#     allocations left are the cgroup Stats reads).
# Usage: bench/supervisor-scale.sh [rounds]   (default 3 heartbeat rounds)
set -eu
cd "$(dirname "$0")/.."
n="${1:-3}"
go test ./supervisor/ -run '^$' -bench 'HeartbeatIntake' -benchmem -benchtime 20000x -count "$n"
go test ./supervisor/ -run '^$' -bench 'IdleWorkers' -benchtime 1x -count 1 -timeout 20m
go test ./supervisor/ -run '^$' -bench 'MonitorPass/cpu/pass' -benchmem -count 1
