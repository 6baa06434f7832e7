package api

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// AuthFunc authenticates a request; nil means allowed.
type AuthFunc func(r *http.Request) *Error

// HandlerFunc answers one request. A returned error is written by the
// Router as the JSON envelope (and logged when it is not an *Error); a
// handler that already wrote its response returns nil.
type HandlerFunc func(w http.ResponseWriter, r *http.Request) error

// AuthClass is who may call a route.
type AuthClass string

// Auth classes.
const (
	// AuthPublic needs no token (health, metrics).
	AuthPublic AuthClass = "public"
	// AuthToken needs the API token; the Router checks it.
	AuthToken AuthClass = "token"
	// AuthWorkerToken takes the API token or the calling worker's own
	// RBEE_WORKER_TOKEN. The handler decides, since the token says which
	// worker may be reported on; without a valid one it answers 401.
	AuthWorkerToken AuthClass = "worker-token"
)

// Route is one entry of a route table: a Go 1.22 pattern ("GET /v1/health"),
// who may call it, and its handler.
type Route struct {
	Pattern string
	Auth    AuthClass
	Handler HandlerFunc
}

// Router is a net/http ServeMux whose every failure, 404, 405 and panics
// included, is a JSON envelope, and whose routes declare their
// authentication. It never redirects.
type Router struct {
	mux    *http.ServeMux
	log    *slog.Logger
	errors *prometheus.CounterVec // nil until CountErrors
	routes []Route
	// rejections samples the log line of refused requests: an
	// unauthenticated flood must not fill the journal.
	rejections sampler
}

// rejectionLogEvery is how often at most one rejected request is logged;
// rbee_hive_errors_total counts every one.
const rejectionLogEvery = 10 * time.Second

// NewRouter returns an empty Router.
func NewRouter(log *slog.Logger) *Router {
	return &Router{mux: http.NewServeMux(), log: log, rejections: sampler{every: rejectionLogEvery}}
}

// CountErrors exports rbee_hive_errors_total{type}: every error answer, by
// its error code (a fixed, small set).
func (rt *Router) CountErrors(reg prometheus.Registerer) error {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "rbee_hive_errors_total",
		Help: "API requests answered with an error envelope, by error code.",
	}, []string{"type"})
	for _, code := range []string{CodeBadRequest, CodeValidation, CodeInvalidAPIKey, CodeMissingAPIKey, CodeNotFound, CodeInternal,
		CodeInsufficientMemory, CodeInsufficientVRAM, CodeInsufficientDisk} {
		c.WithLabelValues(code)
	}
	if err := reg.Register(c); err != nil {
		return err
	}
	rt.errors = c
	return nil
}

// Register adds a route table. token checks the API token for AuthToken
// routes. An unknown auth class, or AuthToken without a token check, is an
// error: a route must not end up unguarded by mistake.
func (rt *Router) Register(token AuthFunc, routes ...Route) error {
	for _, r := range routes {
		var auth AuthFunc
		switch r.Auth {
		case AuthPublic, AuthWorkerToken:
		case AuthToken:
			if token == nil {
				return fmt.Errorf("route %q: auth class %q without a token check", r.Pattern, r.Auth)
			}
			auth = token
		default:
			return fmt.Errorf("route %q: unknown auth class %q", r.Pattern, r.Auth)
		}
		if r.Handler == nil {
			return fmt.Errorf("route %q: no handler", r.Pattern)
		}
		rt.handle(r.Pattern, auth, r.Handler)
		rt.routes = append(rt.routes, r)
	}
	return nil
}

// Routes returns the registered route table, in registration order.
func (rt *Router) Routes() []Route { return append([]Route(nil), rt.routes...) }

// Handle registers h for a pattern with an optional auth check, outside a
// route table (tests and benchmarks that mount a single handler).
func (rt *Router) Handle(pattern string, auth AuthFunc, h http.Handler) {
	rt.handle(pattern, auth, Plain(h))
}

// Plain adapts a handler that writes its own answers, errors included (with
// WriteError), to a HandlerFunc.
func Plain(h http.Handler) HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		h.ServeHTTP(w, r)
		return nil
	}
}

// HandleFunc is Handle for a function.
func (rt *Router) HandleFunc(pattern string, auth AuthFunc, h http.HandlerFunc) {
	rt.Handle(pattern, auth, h)
}

// routeHandler is every handler the Router registers, so that ServeHTTP
// tells its own routes from the mux's fallbacks (404, 405, redirects).
type routeHandler struct {
	rt   *Router
	auth AuthFunc
	h    HandlerFunc
}

func (rt *Router) handle(pattern string, auth AuthFunc, h HandlerFunc) {
	rt.mux.Handle(pattern, &routeHandler{rt: rt, auth: auth, h: h})
}

// ServeHTTP is the one error path of every route: authentication, the
// handler's error, a panic.
func (rh *routeHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rt := rh.rt
	if rh.auth != nil {
		if err := rh.auth(r); err != nil {
			rt.logRejection(r, err)
			WriteError(w, err)
			return
		}
	}
	defer func() {
		v := recover()
		if v == nil {
			return
		}
		if v == http.ErrAbortHandler {
			panic(v)
		}
		rt.log.LogAttrs(r.Context(), slog.LevelError, "panic in HTTP handler", slog.Any("panic", v),
			slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.String("stack", string(debug.Stack())))
		rt.writeErrorIfUnstarted(w, r, Errorf(http.StatusInternalServerError, CodeInternal, "internal error"))
	}()
	if err := rh.h(w, r); err != nil {
		var ae *Error
		if !errors.As(err, &ae) {
			rt.log.LogAttrs(r.Context(), slog.LevelError, "request failed",
				slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.Any("err", err))
		}
		rt.writeErrorIfUnstarted(w, r, err)
	}
}

// writeErrorIfUnstarted writes the envelope unless the handler had already
// begun its response (an SSE stream that failed midway): then the error is
// only logged and counted.
func (rt *Router) writeErrorIfUnstarted(w http.ResponseWriter, r *http.Request, err error) {
	if sw := findStatusWriter(w); sw != nil && sw.status != 0 {
		ae := AsError(err)
		sw.recordErrorCode(ae.Code)
		rt.log.LogAttrs(r.Context(), slog.LevelWarn, "error after the response began",
			slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.String("code", ae.Code))
		return
	}
	WriteError(w, err)
}

// logRejection logs a refused request, sampled: the first, then at most one
// per rejectionLogEvery with how many were not logged in between.
func (rt *Router) logRejection(r *http.Request, err *Error) {
	suppressed, ok := rt.rejections.allow(time.Now())
	if !ok {
		return
	}
	rt.log.LogAttrs(r.Context(), slog.LevelWarn, "request rejected",
		slog.String("method", r.Method), slog.String("path", r.URL.Path),
		slog.String("code", err.Code), slog.String("remote", r.RemoteAddr),
		slog.Uint64("suppressed_since_last", suppressed))
}

// sampler lets one event through per interval and counts the others.
type sampler struct {
	every      time.Duration
	mu         sync.Mutex
	last       time.Time
	suppressed uint64
}

// allow reports whether the event at now is to be logged, and how many were
// suppressed since the last one that was.
func (s *sampler) allow(now time.Time) (uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.last.IsZero() && now.Sub(s.last) < s.every {
		s.suppressed++
		return 0, false
	}
	n := s.suppressed
	s.last, s.suppressed = now, 0
	return n, true
}

// ServeHTTP dispatches, turning the mux's own answers (plain-text 404 and
// 405, redirects) into envelopes.
func (rt *Router) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	h, _ := rt.mux.Handler(r)
	if _, ours := h.(*routeHandler); ours {
		// Through the mux again, not h: only ServeMux.ServeHTTP fills in
		// r.PathValue for the pattern's wildcards.
		rt.mux.ServeHTTP(sw, r)
	} else {
		rt.fallback(sw, r, h)
	}
	if sw.errorCode != "" && rt.errors != nil {
		rt.errors.WithLabelValues(sw.errorCode).Inc()
	}
	rt.log.LogAttrs(r.Context(), slog.LevelDebug, "http request",
		slog.String("method", r.Method), slog.String("path", r.URL.Path),
		slog.Int("status", sw.Status()), slog.Duration("duration", time.Since(start)))
}

// fallback answers a request no route takes. The mux would answer 404, 405
// with Allow, or a redirect (to the cleaned path, or to "path/"); an API
// call is never redirected: a path that is not clean (dot segments, double
// slashes) is a 400, any other redirect a 404.
func (rt *Router) fallback(sw *statusWriter, r *http.Request, h http.Handler) {
	rec := &captureWriter{header: http.Header{}}
	h.ServeHTTP(rec, r)
	switch {
	case rec.status == http.StatusMethodNotAllowed:
		sw.Header().Set("Allow", rec.header.Get("Allow"))
		WriteError(sw, Errorf(http.StatusMethodNotAllowed, CodeMethodNotAllowed,
			"method %s not allowed on %s", r.Method, r.URL.Path).WithDetails(map[string]any{"allow": rec.header.Get("Allow")}))
	case rec.status >= 300 && rec.status < 400 && !cleanPath(r.URL.Path):
		WriteError(sw, Errorf(http.StatusBadRequest, CodeBadRequest,
			"path %q is not canonical (dot segments or empty segments)", r.URL.Path))
	default:
		WriteError(sw, NotFound(r.URL.Path))
	}
}

// cleanPath reports whether p is what path.Clean makes of it (a trailing
// slash aside), i.e. whether the mux would leave it alone.
func cleanPath(p string) bool {
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c == p
}

// captureWriter records what the mux's fallback handlers write.
type captureWriter struct {
	header http.Header
	status int
}

func (c *captureWriter) Header() http.Header { return c.header }
func (c *captureWriter) Write(b []byte) (int, error) {
	if c.status == 0 {
		c.status = http.StatusOK
	}
	return len(b), nil
}
func (c *captureWriter) WriteHeader(s int) {
	if c.status == 0 {
		c.status = s
	}
}

// statusWriter remembers the status for the access log; Unwrap keeps
// http.ResponseController (flushing SSE) working through it.
type statusWriter struct {
	http.ResponseWriter
	status    int
	errorCode string
}

func (s *statusWriter) recordErrorCode(code string) { s.errorCode = code }

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Status is the status written so far (200 if only a body was written).
func (s *statusWriter) Status() int {
	if s.status == 0 {
		return http.StatusOK
	}
	return s.status
}

// findStatusWriter finds the Router's writer under any wrappers that Unwrap.
func findStatusWriter(w http.ResponseWriter) *statusWriter {
	for w != nil {
		if sw, ok := w.(*statusWriter); ok {
			return sw
		}
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return nil
		}
		w = u.Unwrap()
	}
	return nil
}
