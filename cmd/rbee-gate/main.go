// Command rbee-gate is the cgroup spawn gate installed beside rbee-hive
// (package cgroup finds it there and starts every gated worker through it):
// a small binary that starts in a fraction of the time a re-exec of the whole
// hive takes. It is only ever started by package cgroup with the gate
// protocol's argv and environment (see cgroup/gate).
package main

import (
	"os"

	"github.com/rbee/rbee-hive/cgroup/gate"
)

func main() {
	gate.MaybeRun()
	_, _ = os.Stderr.WriteString("rbee-gate: started by rbee-hive to place workers in their cgroups; not to be run by hand\n")
	os.Exit(2)
}
