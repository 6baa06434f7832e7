package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/config"
)

// fuzzSupervisor is a supervisor over a real (empty) cgroup root with the
// test backends: the fuzz targets below only reach its validation, so no
// worker is ever started.
func fuzzSupervisor(f *testing.F) *Supervisor {
	f.Helper()
	s, err := New(testConfig(f), Deps{Cgroups: newCgroups(f), SelfDir: simDir})
	if err != nil {
		f.Fatal(err)
	}
	return s
}

// clientError checks that err is the envelope of a 4xx: bad input must
// never become a 5xx or an untyped error.
func clientError(t *testing.T, err error) {
	t.Helper()
	var ae *api.Error
	if !errors.As(err, &ae) {
		t.Fatalf("error %v (%T) is not an *api.Error", err, err)
	}
	if ae.Status < 400 || ae.Status > 499 {
		t.Fatalf("status %d for bad input: %v", ae.Status, err)
	}
}

// FuzzSpawnBody decodes a spawn body and validates it as POST
// /v1/workers/spawn does before admission: either a 4xx envelope or a plan
// that keeps the rules (positive limit, known policy, only allowed env).
func FuzzSpawnBody(f *testing.F) {
	for _, s := range []string{
		`{"model_ref":"hf:a/b","backend":"sim","device":0}`,
		`{"model_ref":"hf:a/b","backend":"sim","device":0,"memory_limit_bytes":1048576,"restart":"always","env":{"RBEE_SIM_ALLOC_MIB":"8"},"vram_bytes":0}`,
		`{"model_ref":"file:/x","backend":"gpu","device":1}`,
		`{"model_ref":"hf:a/b","backend":"sim","device":-1}`,
		`{"model_ref":"hf:a/b","backend":"sim","device":0,"env":{"PATH":"/"}}`,
		`{"model_ref":"hf:a/b","backend":"sim","device":0,"restart":"sometimes"}`,
		`{"model_ref":"","backend":"","device":null}`,
		`{"model_ref":1}`, `[]`, `{}`, ``, `{"a":1}{}`, `{"device":9223372036854775807}`,
	} {
		f.Add([]byte(s))
	}
	s := fuzzSupervisor(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		r := httptest.NewRequest(http.MethodPost, "/v1/workers/spawn", bytes.NewReader(body))
		var req SpawnRequest
		if err := api.DecodeJSON(httptest.NewRecorder(), r, &req); err != nil {
			clientError(t, err)
			return
		}
		plan, err := s.validateSpawn(context.Background(), &req)
		if err != nil {
			clientError(t, err)
			return
		}
		be, ok := s.cfg.Backends[plan.backend]
		switch {
		case !ok:
			t.Fatalf("plan for unknown backend %q", plan.backend)
		case plan.memoryLimit < 1<<20:
			t.Fatalf("memory limit %d accepted", plan.memoryLimit)
		case plan.device < 0 || (!be.CUDA && plan.device != 0):
			t.Fatalf("device %d accepted for %q", plan.device, plan.backend)
		case plan.policy != RestartNever && plan.policy != RestartOnFailure && plan.policy != RestartAlways:
			t.Fatalf("policy %q accepted", plan.policy)
		case plan.provider == "" || plan.reference == "" || plan.provider+":"+plan.reference != req.ModelRef:
			t.Fatalf("model_ref %q split as %q %q", req.ModelRef, plan.provider, plan.reference)
		}
		for k, v := range plan.env {
			if config.ReservedEnv(k) || !contains(be.EnvAllow, k) || strings.IndexByte(v, 0) >= 0 {
				t.Fatalf("env %q=%q accepted", k, v)
			}
		}
	})
}

// fuzzWorkerCallback posts body to a worker callback route of a supervisor
// with no workers, through the real router: every answer must be a JSON
// envelope with a 4xx (the worker is unknown, so never 200).
func fuzzWorkerCallback(f *testing.F, path string, seeds []string) {
	for _, s := range seeds {
		f.Add([]byte(s), "application/json")
	}
	f.Add([]byte(`{}`), "text/plain")
	f.Add([]byte(`{}`), "application/json; charset=\"")
	s := fuzzSupervisor(f)
	rt := api.NewRouter(slog.New(slog.NewTextHandler(io.Discard, nil)))
	auth := func(r *http.Request) *api.Error { return api.Authenticator{Token: "fuzz-api-token"}.Check(r) }
	if err := rt.Register(auth, workerRoutes(s, auth)...); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte, contentType string) {
		r := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
		r.Header.Set("Content-Type", contentType)
		w := httptest.NewRecorder()
		rt.ServeHTTP(w, r)
		if w.Code < 400 || w.Code > 499 {
			t.Fatalf("status %d for %q (%q): %s", w.Code, body, contentType, w.Body)
		}
		var env struct {
			Error struct {
				Code    string `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal(w.Body.Bytes(), &env); err != nil || env.Error.Code == "" || env.Error.Message == "" {
			t.Fatalf("status %d without an error envelope (%v): %s", w.Code, err, w.Body)
		}
	})
}

// FuzzHeartbeatBody: POST /v1/heartbeat.
func FuzzHeartbeatBody(f *testing.F) {
	fuzzWorkerCallback(f, "/v1/heartbeat", []string{
		`{"worker_id":"w-1","timestamp":"2024-01-01T00:00:00Z","health_status":"healthy"}`,
		`{"worker_id":"w-1","health_status":"degraded"}`,
		`{"worker_id":"","health_status":"healthy"}`,
		`{"worker_id":"w-1","health_status":"sick"}`,
		`{"worker_id":7}`, `null`, ``, `{"worker_id":"w"} x`,
	})
}

// FuzzReadyBody: POST /v1/workers/ready.
func FuzzReadyBody(f *testing.F) {
	fuzzWorkerCallback(f, "/v1/workers/ready", []string{
		`{"worker_id":"w-1","url":"http://127.0.0.1:1","model_ref":"hf:a/b","backend":"sim","device":0}`,
		`{"worker_id":"w-1","model_ref":"hf:a/b","backend":"sim"}`,
		`{"worker_id":"../x","model_ref":"hf:a/b","backend":"sim","device":0}`,
		`{"worker_id":"w-1","model_ref":"nope","backend":"sim","device":0}`,
		`{"device":"0"}`, `[1]`, ``,
	})
}
