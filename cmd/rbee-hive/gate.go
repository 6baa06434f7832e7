package main

// gateRan runs the cgroup spawn gate when this process was re-executed as one;
// it must be the first thing main does.
func gateRan() bool { return false }
