package supervisor

import "os"

// testPorts is this test process's own window of worker ports inside
// 20000-29999. Every supervisor a test builds starts its scan at the low
// end, so two test processes on one host (go test ./... runs packages in
// parallel; several checkouts run suites at once) with the same window
// would hand out the same ports, and a worker whose port another process
// took exits 2 on every restart into the circuit breaker.
func testPorts() (lo, hi int) {
	lo = 20000 + (os.Getpid()%10)*1000
	return lo, lo + 999
}
