package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

type envelopeT struct {
	Error struct {
		Code    string         `json:"code"`
		Message string         `json:"message"`
		Details map[string]any `json:"details"`
	} `json:"error"`
}

func decodeEnvelope(t *testing.T, rec *httptest.ResponseRecorder) envelopeT {
	t.Helper()
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("content type %q, body %q", ct, rec.Body.String())
	}
	var e envelopeT
	if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil {
		t.Fatalf("body is not the envelope: %v: %q", err, rec.Body.String())
	}
	return e
}

func testRouter(t *testing.T, logs *bytes.Buffer) *Router {
	t.Helper()
	rt := NewRouter(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	auth := Authenticator{Token: "s3cret-token"}
	check := func(r *http.Request) *Error { return auth.Check(r) }
	rt.HandleFunc("GET /public", nil, func(w http.ResponseWriter, r *http.Request) { WriteJSON(w, 200, map[string]string{"ok": "yes"}) })
	rt.HandleFunc("GET /private", check, func(w http.ResponseWriter, r *http.Request) { WriteJSON(w, 200, map[string]string{"ok": "yes"}) })
	rt.HandleFunc("POST /echo", check, func(w http.ResponseWriter, r *http.Request) {
		var in struct {
			N int `json:"n"`
		}
		if err := DecodeJSON(w, r, &in); err != nil {
			WriteError(w, err)
			return
		}
		WriteJSON(w, 200, in)
	})
	rt.HandleFunc("GET /items/{id}", nil, func(w http.ResponseWriter, r *http.Request) {
		WriteJSON(w, 200, map[string]string{"id": r.PathValue("id")})
	})
	rt.HandleFunc("GET /boom", nil, func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, fmt.Errorf("wrapped: %w", errors.New("disk on fire at /secret/path")))
	})
	rt.HandleFunc("GET /full", nil, func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, fmt.Errorf("admit: %w", Errorf(507, CodeInsufficientMemory, "no room").WithDetails(map[string]any{"requested_bytes": 5})))
	})
	return rt
}

func TestAuth(t *testing.T) {
	var logs bytes.Buffer
	rt := testRouter(t, &logs)
	tests := []struct {
		name   string
		header string
		status int
		code   string
	}{
		{"none", "", 401, CodeMissingAPIKey},
		{"not bearer", "Basic dXNlcjpwYXNz", 401, CodeMissingAPIKey},
		{"lowercase scheme", "bearer s3cret-token", 200, ""},
		{"uppercase scheme", "BEARER s3cret-token", 200, ""},
		{"empty token", "Bearer ", 401, CodeMissingAPIKey},
		{"control char", "Bearer s3cret\x01token", 401, CodeMissingAPIKey},
		{"wrong", "Bearer nope", 401, CodeInvalidAPIKey},
		{"prefix of right", "Bearer s3cret", 401, CodeInvalidAPIKey},
		{"huge", "Bearer " + strings.Repeat("a", 9000), 401, CodeMissingAPIKey},
		{"right", "Bearer s3cret-token", 200, ""},
		{"right with spaces", "Bearer   s3cret-token  ", 200, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest("GET", "/private", nil)
			if tc.header != "" {
				req.Header.Set("Authorization", tc.header)
			}
			rec := httptest.NewRecorder()
			rt.ServeHTTP(rec, req)
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.status, rec.Body)
			}
			if tc.status == 401 {
				if got := decodeEnvelope(t, rec).Error.Code; got != tc.code {
					t.Errorf("code %q, want %q", got, tc.code)
				}
				if !strings.HasPrefix(rec.Header().Get("WWW-Authenticate"), "Bearer") {
					t.Errorf("401 without WWW-Authenticate: Bearer")
				}
			}
		})
	}
	if strings.Contains(logs.String(), "s3cret") {
		t.Errorf("the token leaked into the logs:\n%s", logs.String())
	}
	// Public routes need nothing.
	rec := httptest.NewRecorder()
	rt.ServeHTTP(rec, httptest.NewRequest("GET", "/public", nil))
	if rec.Code != 200 {
		t.Errorf("public route: %d", rec.Code)
	}
}

func TestErrorEnvelopes(t *testing.T) {
	var logs bytes.Buffer
	rt := testRouter(t, &logs)
	authz := "Bearer s3cret-token"
	tests := []struct {
		name, method, path, ctype string
		body                      io.Reader
		status                    int
		code                      string
	}{
		{"unknown route", "GET", "/nope", "", nil, 404, CodeNotFound},
		{"wrong method", "DELETE", "/public", "", nil, 405, CodeMethodNotAllowed},
		{"malformed json", "POST", "/echo", "application/json", strings.NewReader(`{"n":`), 400, CodeInvalidJSON},
		{"empty body", "POST", "/echo", "application/json", strings.NewReader(``), 400, CodeInvalidJSON},
		{"trailing data", "POST", "/echo", "application/json", strings.NewReader(`{"n":1} {"n":2}`), 400, CodeInvalidJSON},
		{"wrong field type", "POST", "/echo", "application/json", strings.NewReader(`{"n":"x"}`), 422, CodeValidation},
		{"wrong content type", "POST", "/echo", "text/plain", strings.NewReader(`{"n":1}`), 415, CodeUnsupportedMedia},
		{"body too large", "POST", "/echo", "application/json", strings.NewReader(`{"n":1,"pad":"` + strings.Repeat("x", MaxBodyBytes) + `"}`), 413, CodePayloadTooLarge},
		{"internal error hides text", "GET", "/boom", "", nil, 500, CodeInternal},
		{"typed error keeps status", "GET", "/full", "", nil, 507, CodeInsufficientMemory},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(tc.method, tc.path, tc.body)
			req.Header.Set("Authorization", authz)
			if tc.ctype != "" {
				req.Header.Set("Content-Type", tc.ctype)
			}
			rec := httptest.NewRecorder()
			rt.ServeHTTP(rec, req)
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.status, rec.Body)
			}
			e := decodeEnvelope(t, rec)
			if e.Error.Code != tc.code || e.Error.Message == "" {
				t.Errorf("envelope %+v, want code %s", e, tc.code)
			}
			if strings.Contains(rec.Body.String(), "/secret/path") {
				t.Errorf("internal error text leaked: %s", rec.Body)
			}
		})
	}
	// 405 keeps Allow; 507 keeps details.
	rec := httptest.NewRecorder()
	rt.ServeHTTP(rec, httptest.NewRequest("DELETE", "/public", nil))
	if !strings.Contains(rec.Header().Get("Allow"), "GET") {
		t.Errorf("405 lost its Allow header: %v", rec.Header())
	}
	rec = httptest.NewRecorder()
	rt.ServeHTTP(rec, httptest.NewRequest("GET", "/full", nil))
	if d := decodeEnvelope(t, rec).Error.Details; d["requested_bytes"] != float64(5) {
		t.Errorf("details lost: %v", d)
	}
	// A good request still works through the same code paths.
	req := httptest.NewRequest("POST", "/echo", strings.NewReader(`{"n":7,"unknown":true}`))
	req.Header.Set("Authorization", authz)
	rec = httptest.NewRecorder()
	rt.ServeHTTP(rec, req)
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"n":7`) {
		t.Errorf("echo: %d %s", rec.Code, rec.Body)
	}
}

func TestErrorsCounted(t *testing.T) {
	var logs bytes.Buffer
	rt := testRouter(t, &logs)
	reg := prometheus.NewRegistry()
	if err := rt.CountErrors(reg); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/nope", "/nope", "/full", "/public"} {
		rt.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", p, nil))
	}
	rt.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/private", nil))
	for code, want := range map[string]float64{CodeNotFound: 2, CodeInsufficientMemory: 1, CodeMissingAPIKey: 1, CodeInternal: 0} {
		if got := testutil.ToFloat64(rt.errors.WithLabelValues(code)); got != want {
			t.Errorf("errors_total{type=%q} = %v, want %v", code, got, want)
		}
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
}

func TestPathValues(t *testing.T) {
	var logs bytes.Buffer
	rt := testRouter(t, &logs)
	rec := httptest.NewRecorder()
	rt.ServeHTTP(rec, httptest.NewRequest("GET", "/items/w-abc123", nil))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"id":"w-abc123"`) {
		t.Errorf("path wildcard lost: %d %s", rec.Code, rec.Body)
	}
}

func TestFingerprint(t *testing.T) {
	a, b := Fingerprint("token-a"), Fingerprint("token-b")
	if len(a) != 6 || a == b || a != Fingerprint("token-a") || strings.Contains(a, "token") {
		t.Errorf("fingerprints %q %q", a, b)
	}
	if TokenEqual("", "") {
		t.Error("an empty expected token must never match")
	}
}
