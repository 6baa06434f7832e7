package api

import (
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// AuthFunc authenticates a request; nil means allowed.
type AuthFunc func(r *http.Request) *Error

// Router is a net/http ServeMux whose every failure, 404 and 405 included,
// is a JSON envelope, and whose routes declare their authentication.
type Router struct {
	mux    *http.ServeMux
	log    *slog.Logger
	errors *prometheus.CounterVec // nil until CountErrors
}

// NewRouter returns an empty Router.
func NewRouter(log *slog.Logger) *Router {
	return &Router{mux: http.NewServeMux(), log: log}
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

// Handle registers h for a Go 1.22 pattern ("GET /v1/health"). With a nil
// auth the route is public.
func (rt *Router) Handle(pattern string, auth AuthFunc, h http.Handler) {
	if auth != nil {
		inner := h
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if err := auth(r); err != nil {
				rt.log.LogAttrs(r.Context(), slog.LevelWarn, "request rejected",
					slog.String("method", r.Method), slog.String("path", r.URL.Path),
					slog.String("code", err.Code), slog.String("remote", r.RemoteAddr))
				WriteError(w, err)
				return
			}
			inner.ServeHTTP(w, r)
		})
	}
	rt.mux.Handle(pattern, h)
}

// HandleFunc is Handle for a function.
func (rt *Router) HandleFunc(pattern string, auth AuthFunc, h http.HandlerFunc) {
	rt.Handle(pattern, auth, h)
}

// ServeHTTP dispatches, turning the mux's plain-text 404/405 into envelopes.
func (rt *Router) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	h, pattern := rt.mux.Handler(r)
	sw := &statusWriter{ResponseWriter: w}
	if pattern == "" {
		// The mux answers unmatched requests itself (404, 405 with Allow, or a
		// redirect); capture that and re-emit it in our shape.
		rec := &captureWriter{header: http.Header{}}
		h.ServeHTTP(rec, r)
		switch rec.status {
		case http.StatusNotFound:
			WriteError(sw, NotFound(r.URL.Path))
		case http.StatusMethodNotAllowed:
			sw.Header().Set("Allow", rec.header.Get("Allow"))
			WriteError(sw, Errorf(http.StatusMethodNotAllowed, CodeMethodNotAllowed,
				"method %s not allowed on %s", r.Method, r.URL.Path).WithDetails(map[string]any{"allow": rec.header.Get("Allow")}))
		default:
			for k, v := range rec.header {
				sw.Header()[k] = v
			}
			sw.WriteHeader(rec.status)
		}
	} else {
		// Through the mux again, not h: only ServeMux.ServeHTTP fills in
		// r.PathValue for the pattern's wildcards.
		rt.mux.ServeHTTP(sw, r)
	}
	if sw.errorCode != "" && rt.errors != nil {
		rt.errors.WithLabelValues(sw.errorCode).Inc()
	}
	rt.log.LogAttrs(r.Context(), slog.LevelDebug, "http request",
		slog.String("method", r.Method), slog.String("path", r.URL.Path),
		slog.Int("status", sw.Status()), slog.Duration("duration", time.Since(start)))
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
