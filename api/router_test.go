package api

import (
	"bytes"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func tableRouter(t *testing.T, logs *bytes.Buffer) *Router {
	t.Helper()
	rt := NewRouter(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err := rt.CountErrors(prometheus.NewRegistry()); err != nil {
		t.Fatal(err)
	}
	auth := Authenticator{Token: "s3cret-token"}
	ok := func(w http.ResponseWriter, r *http.Request) error {
		WriteJSON(w, http.StatusOK, map[string]string{"ok": "yes"})
		return nil
	}
	err := rt.Register(auth.Check,
		Route{"GET /open", AuthPublic, ok},
		Route{"GET /closed", AuthToken, ok},
		Route{"DELETE /v1/models/{ref...}", AuthPublic, ok},
		Route{"GET /dir/", AuthPublic, ok},
		Route{"GET /plain-error", AuthPublic, func(w http.ResponseWriter, r *http.Request) error {
			return errors.New("disk on fire at /secret/path")
		}},
		Route{"GET /api-error", AuthPublic, func(w http.ResponseWriter, r *http.Request) error {
			return Errorf(http.StatusConflict, CodeConflict, "busy")
		}},
		Route{"GET /panic", AuthPublic, func(w http.ResponseWriter, r *http.Request) error {
			panic("handler bug")
		}},
		Route{"GET /late-error", AuthPublic, func(w http.ResponseWriter, r *http.Request) error {
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte("data: 1\n\n"))
			return errors.New("stream broke")
		}},
	)
	if err != nil {
		t.Fatal(err)
	}
	return rt
}

func TestRegisterRefusesUnguardedRoutes(t *testing.T) {
	rt := NewRouter(slog.New(slog.DiscardHandler))
	h := func(w http.ResponseWriter, r *http.Request) error { return nil }
	if err := rt.Register(nil, Route{"GET /x", AuthToken, h}); err == nil {
		t.Error("an AuthToken route without a token check was registered")
	}
	if err := rt.Register(nil, Route{"GET /y", AuthClass("tokn"), h}); err == nil {
		t.Error("a route with an unknown auth class was registered")
	}
	if err := rt.Register(nil, Route{"GET /z", "", h}); err == nil {
		t.Error("a route without an auth class was registered")
	}
	if n := len(rt.Routes()); n != 0 {
		t.Errorf("%d refused routes in the table", n)
	}
}

// TestOneErrorPath: a handler's plain error is a 500 whose text is logged,
// not sent; an API error keeps its status and is not logged as a failure;
// a panic is a 500, logged with its stack and counted.
func TestOneErrorPath(t *testing.T) {
	var logs bytes.Buffer
	rt := tableRouter(t, &logs)
	for _, tc := range []struct {
		path    string
		status  int
		code    string
		logWant string
	}{
		{"/plain-error", 500, CodeInternal, "disk on fire at /secret/path"},
		{"/api-error", 409, CodeConflict, ""},
		{"/panic", 500, CodeInternal, "goroutine"},
	} {
		logs.Reset()
		rec := httptest.NewRecorder()
		rt.ServeHTTP(rec, httptest.NewRequest("GET", tc.path, nil))
		if rec.Code != tc.status {
			t.Fatalf("%s: status %d, want %d: %s", tc.path, rec.Code, tc.status, rec.Body)
		}
		if e := decodeEnvelope(t, rec); e.Error.Code != tc.code {
			t.Errorf("%s: code %q, want %q", tc.path, e.Error.Code, tc.code)
		}
		if strings.Contains(rec.Body.String(), "secret") {
			t.Errorf("%s: internal text leaked: %s", tc.path, rec.Body)
		}
		if tc.logWant != "" && !strings.Contains(logs.String(), tc.logWant) {
			t.Errorf("%s: log lacks %q:\n%s", tc.path, tc.logWant, logs.String())
		}
		if tc.logWant == "" && strings.Contains(logs.String(), "level=ERROR") {
			t.Errorf("%s: an API error was logged as a failure:\n%s", tc.path, logs.String())
		}
	}
	if got := testutil.ToFloat64(rt.errors.WithLabelValues(CodeInternal)); got != 2 {
		t.Errorf("errors_total{type=INTERNAL_ERROR} = %v, want 2", got)
	}
	// An error after the response began cannot become an envelope: the
	// stream is kept as written and the error is logged and counted.
	rec := httptest.NewRecorder()
	rt.ServeHTTP(rec, httptest.NewRequest("GET", "/late-error", nil))
	if rec.Code != 200 || rec.Body.String() != "data: 1\n\n" {
		t.Errorf("late error rewrote the response: %d %q", rec.Code, rec.Body)
	}
	if got := testutil.ToFloat64(rt.errors.WithLabelValues(CodeInternal)); got != 3 {
		t.Errorf("errors_total{type=INTERNAL_ERROR} = %v after the late error, want 3", got)
	}
}

// TestNeverRedirects: a path the mux would clean, or complete with a
// slash, gets a JSON envelope, never a redirect to another resource.
func TestNeverRedirects(t *testing.T) {
	var logs bytes.Buffer
	rt := tableRouter(t, &logs)
	for _, tc := range []struct {
		method, path string
		status       int
	}{
		{"DELETE", "/v1/models/hf:../../x", 400},
		{"DELETE", "/v1/models//x", 400},
		{"GET", "/open/./", 400},
		{"GET", "/dir", 404},
	} {
		rec := httptest.NewRecorder()
		rt.ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path, nil))
		if rec.Code != tc.status || rec.Header().Get("Location") != "" {
			t.Errorf("%s %s: %d Location=%q, want %d and no Location", tc.method, tc.path, rec.Code, rec.Header().Get("Location"), tc.status)
			continue
		}
		decodeEnvelope(t, rec)
	}
}

// TestRejectionsSampled: a flood of unauthenticated requests is counted in
// full but logged once per interval.
func TestRejectionsSampled(t *testing.T) {
	var logs bytes.Buffer
	rt := tableRouter(t, &logs)
	const n = 50
	for i := 0; i < n; i++ {
		rec := httptest.NewRecorder()
		rt.ServeHTTP(rec, httptest.NewRequest("GET", "/closed", nil))
		if rec.Code != 401 {
			t.Fatalf("status %d", rec.Code)
		}
	}
	if got := strings.Count(logs.String(), "request rejected"); got != 1 {
		t.Errorf("%d rejection lines for %d rejections, want 1:\n%s", got, n, logs.String())
	}
	if got := testutil.ToFloat64(rt.errors.WithLabelValues(CodeMissingAPIKey)); got != n {
		t.Errorf("errors_total{type=MISSING_API_KEY} = %v, want %d", got, n)
	}
}

func TestSampler(t *testing.T) {
	s := sampler{every: 10 * time.Second}
	t0 := time.Unix(1000, 0)
	if n, ok := s.allow(t0); !ok || n != 0 {
		t.Fatalf("first: %d %v", n, ok)
	}
	for i := 1; i <= 3; i++ {
		if _, ok := s.allow(t0.Add(time.Duration(i) * time.Second)); ok {
			t.Fatalf("event %d inside the interval was let through", i)
		}
	}
	if n, ok := s.allow(t0.Add(11 * time.Second)); !ok || n != 3 {
		t.Errorf("after the interval: suppressed %d ok %v, want 3 true", n, ok)
	}
}
