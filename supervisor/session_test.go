package supervisor

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// procGroups reads a process's group and session ids from /proc/<pid>/stat.
func procGroups(pid int) (pgrp, sid int, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// The command name is in parentheses and may hold spaces: fields
	// count from after the last ')': state, ppid, pgrp, session, ...
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 4 {
		return 0, 0, fmt.Errorf("short stat %q", b)
	}
	if pgrp, err = strconv.Atoi(f[2]); err != nil {
		return 0, 0, err
	}
	sid, err = strconv.Atoi(f[3])
	return pgrp, sid, err
}

// TestWorkerHasOwnSession: a worker leads a session and process group of
// its own, so a terminal's Ctrl-C (SIGINT to the hive's foreground process
// group) reaches the hive only, and the hive drains its workers in order.
func TestWorkerHasOwnSession(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	if wi.PID == nil {
		t.Fatal("idle worker without pid")
	}
	pid := *wi.PID
	hivePgrp, hiveSid, err := procGroups(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	pgrp, sid, err := procGroups(pid)
	if err != nil {
		t.Fatal(err)
	}
	if pgrp == hivePgrp || sid == hiveSid {
		t.Errorf("worker %d: pgrp %d sid %d; hive pgrp %d sid %d: shared", pid, pgrp, sid, hivePgrp, hiveSid)
	}
	if sid != pid || pgrp != pid {
		t.Errorf("worker %d is not its own session leader: pgrp %d sid %d", pid, pgrp, sid)
	}
}
