package supervisor

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/supervisor/notify"
)

// WedgeLoop blocks the Run loop until release is closed, so
// Alive fails as it would with a real bug. It returns once the loop is stuck.
func (s *Supervisor) WedgeLoop(ctx context.Context, release <-chan struct{}) error {
	select {
	case s.wedge <- release:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wedge: %w", ctx.Err())
	}
}

// HandleDatagram feeds one datagram to the notify intake as if the kernel
// had vouched for pid.
// The fields go in sorted order, so a test's datagram is reproducible.
func (s *Supervisor) HandleDatagram(pid int32, fields map[string]string) {
	s.HandleDatagramAs(pid, procUID(pid), fields)
}

// procUID is pid's real uid, as SCM_CREDENTIALS carries it by default; 0
// when the process is gone.
func procUID(pid int32) uint32 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Uid:"); ok {
			if f := strings.Fields(v); len(f) > 0 {
				n, _ := strconv.ParseUint(f[0], 10, 32)
				return uint32(n)
			}
		}
	}
	return 0
}

// HandleDatagramAs is HandleDatagram with the sender's uid given.
func (s *Supervisor) HandleDatagramAs(pid int32, uid uint32, fields map[string]string) {
	var b []byte
	for _, k := range slices.Sorted(maps.Keys(fields)) {
		b = append(append(append(append(b, k...), '='), fields[k]...), '\n')
	}
	var f notify.Fields
	if err := f.Parse(b); err != nil {
		panic(fmt.Sprintf("HandleDatagram: %v", err))
	}
	s.handleDatagram(pid, uid, &f)
}

// workerRoutes mounts the worker API the way cmd/rbee-hive's route table
// does, for this package's HTTP tests.
func workerRoutes(s *Supervisor, auth api.AuthFunc) []api.Route {
	return []api.Route{
		{Pattern: "POST /v1/workers/spawn", Auth: api.AuthToken, Handler: s.HandleSpawn},
		{Pattern: "GET /v1/workers/list", Auth: api.AuthToken, Handler: s.HandleList},
		{Pattern: "GET /v1/workers/{id}", Auth: api.AuthToken, Handler: s.HandleGet},
		{Pattern: "DELETE /v1/workers/{id}", Auth: api.AuthToken, Handler: s.HandleDelete},
		{Pattern: "GET /v1/workers/{id}/logs", Auth: api.AuthToken, Handler: s.HandleLogs},
		{Pattern: "POST /v1/workers/{id}" + RouteRbee, Auth: api.AuthToken, Handler: s.HandleWorkerRoute(RouteRbee)},
		{Pattern: "POST /v1/workers/{id}" + RouteChat, Auth: api.AuthToken, Handler: s.HandleWorkerRoute(RouteChat)},
		{Pattern: "POST /v1/workers/{id}" + RouteCompletion, Auth: api.AuthToken, Handler: s.HandleWorkerRoute(RouteCompletion)},
		{Pattern: "POST /v1/workers/{id}" + RouteNative, Auth: api.AuthToken, Handler: s.HandleWorkerRoute(RouteNative)},
		{Pattern: "POST /v1/workers/ready", Auth: api.AuthWorkerToken, Handler: s.HandleReady(auth)},
		{Pattern: "POST /v1/heartbeat", Auth: api.AuthWorkerToken, Handler: s.HandleHeartbeat(auth)},
	}
}
