package main

import "github.com/rbee/rbee-hive/cgroup"

// runGate becomes a worker when this process was re-executed as the cgroup
// spawn gate (v1 hosts start workers through it), and returns at once
// otherwise. It must be the first thing main does.
func runGate() { cgroup.MaybeRunGate() }
