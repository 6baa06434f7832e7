package sim

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"mime"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// state is what the HTTP side and the heartbeat share.
type state struct {
	cfg       Config
	ready     atomic.Bool
	hung      chan struct{} // closed when --hang-after fires
	hangOnce  sync.Once
	active    atomic.Int64
	tokensOut atomic.Int64
	requests  atomic.Int64
	held      [][]byte // --alloc-mib: the "model", alive as long as the worker
}

func newState(cfg Config) *state { return &state{cfg: cfg, hung: make(chan struct{})} }

func (s *state) hang() { s.hangOnce.Do(func() { close(s.hung) }) }

// Handler is the llm-worker-rbee route table.
func (s *state) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", s.health)
	mux.Handle("GET /v1/ready", s.auth(http.HandlerFunc(s.readyz)))
	mux.Handle("GET /v1/loading/progress", s.auth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "Model not loading", http.StatusServiceUnavailable)
	})))
	mux.Handle("POST /v1/inference", s.auth(http.HandlerFunc(s.inference)))
	s.openAIRoutes(mux)
	return s.wedge(correlation(mux))
}

// wedge makes every request hang once --hang-after fired: connections are
// accepted (the kernel does that) but nothing is ever answered.
func (s *state) wedge(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-s.hung:
			<-r.Context().Done()
			return
		default:
		}
		next.ServeHTTP(w, r)
	})
}

func correlation(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("X-Correlation-ID")
		if id == "" || len(id) > 128 || strings.ContainsAny(id, "\r\n") {
			id = fmt.Sprintf("%016x", rand.Uint64())
		}
		w.Header().Set("X-Correlation-ID", id)
		next.ServeHTTP(w, r)
	})
}

// auth requires "Authorization: Bearer <token>" when a token is
// configured; without one the routes are open (rejecting everything would
// make an unconfigured simworker useless).
func (s *state) auth(next http.Handler) http.Handler {
	if s.cfg.APIToken == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := strings.TrimSpace(r.Header.Get("Authorization"))
		tok, ok := strings.CutPrefix(h, "Bearer ")
		tok = strings.TrimSpace(tok)
		if len(h) > 8192 || !ok || tok == "" || strings.ContainsFunc(tok, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			writeJSON(w, http.StatusUnauthorized, map[string]any{"error": map[string]string{"code": "MISSING_API_KEY", "message": "Missing API key"}})
			return
		}
		if subtle.ConstantTimeCompare([]byte(tok), []byte(s.cfg.APIToken)) != 1 {
			writeJSON(w, http.StatusUnauthorized, map[string]any{"error": map[string]string{"code": "INVALID_API_KEY", "message": "Invalid or missing API key"}})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// health: 503 while loading, 200 after, like llama-server, so the hive's
// HTTP health mode can be tested against it.
func (s *state) health(w http.ResponseWriter, r *http.Request) {
	if !s.ready.Load() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "loading", "vram_bytes": 0})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "healthy", "vram_bytes": 0})
}

func (s *state) readyz(w http.ResponseWriter, r *http.Request) {
	if !s.ready.Load() {
		writeJSON(w, http.StatusOK, map[string]any{"ready": false, "state": "loading", "progress_url": "/v1/loading/progress"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"ready": true, "state": "idle", "model_loaded": true})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// InferenceRequest is the body of POST /v1/inference. Pointers tell "absent"
// from zero for the required fields and the defaults.
type InferenceRequest struct {
	JobID             *string  `json:"job_id"`
	Prompt            *string  `json:"prompt"`
	MaxTokens         *uint32  `json:"max_tokens"`
	Temperature       *float32 `json:"temperature"`
	Seed              *uint64  `json:"seed"`
	TopP              *float32 `json:"top_p"`
	TopK              *uint32  `json:"top_k"`
	RepetitionPenalty *float32 `json:"repetition_penalty"`
	Stop              []string `json:"stop"`
	MinP              *float32 `json:"min_p"`
}

// FieldError is one entry of the 400 body {"errors":[...]}.
type FieldError struct {
	Field      string  `json:"field"`
	Constraint string  `json:"constraint"`
	Message    string  `json:"message"`
	Value      *string `json:"value,omitempty"`
}

func strp(s string) *string { return &s }

// Validate returns every violation, in field order (spec: all are listed).
// The prompt is never echoed.
func (q *InferenceRequest) Validate() []FieldError {
	var errs []FieldError
	if *q.JobID == "" {
		errs = append(errs, FieldError{"job_id", "non_empty", "job_id must not be empty", nil})
	}
	if n := utf8.RuneCountInString(*q.Prompt); n == 0 {
		errs = append(errs, FieldError{"prompt", "length(1..=32768)", "prompt must not be empty", nil})
	} else if n > 32768 {
		errs = append(errs, FieldError{"prompt", "length(1..=32768)", fmt.Sprintf("prompt must be at most 32768 characters (got %d)", n), nil})
	}
	if m := *q.MaxTokens; m < 1 {
		errs = append(errs, FieldError{"max_tokens", "range(1..=2048)", fmt.Sprintf("max_tokens must be at least 1 (got %d)", m), strp(fmt.Sprint(m))})
	} else if m > 2048 {
		errs = append(errs, FieldError{"max_tokens", "range(1..=2048)", fmt.Sprintf("max_tokens must be at most 2048 (got %d)", m), strp(fmt.Sprint(m))})
	}
	floatRange := func(name string, v *float32, hi float32) {
		if v == nil {
			return
		}
		c := fmt.Sprintf("range(0.0..=%.1f)", hi)
		if *v < 0 {
			errs = append(errs, FieldError{name, c, fmt.Sprintf("%s must be at least 0.0 (got %v)", name, *v), strp(fmt.Sprint(*v))})
		} else if *v > hi {
			errs = append(errs, FieldError{name, c, fmt.Sprintf("%s must be at most %.1f (got %v)", name, hi, *v), strp(fmt.Sprint(*v))})
		}
	}
	floatRange("temperature", q.Temperature, 2)
	floatRange("top_p", q.TopP, 1)
	floatRange("repetition_penalty", q.RepetitionPenalty, 2)
	if len(q.Stop) > 4 {
		errs = append(errs, FieldError{"stop", "max_count(4)", fmt.Sprintf("stop must have at most 4 sequences (got %d)", len(q.Stop)), strp(fmt.Sprint(len(q.Stop)))})
	}
	for i, st := range q.Stop {
		name := fmt.Sprintf("stop[%d]", i)
		if st == "" {
			errs = append(errs, FieldError{name, "non_empty", name + " must not be empty", nil})
		} else if len(st) > 100 {
			errs = append(errs, FieldError{name, "max_length(100)", fmt.Sprintf("%s must be at most 100 bytes (got %d)", name, len(st)), strp(fmt.Sprint(len(st)))})
		}
	}
	floatRange("min_p", q.MinP, 1)
	return errs
}

// words are the fake vocabulary; tokens are drawn from it by seed.
var words = [...]string{" the", " bee", " hive", " buzz", " honey", " queen", " worker", " comb", " flower", " sun", ".", ","}

// tokenText is token i of the stream for seed: deterministic, so tests and
// stop sequences are reproducible.
func tokenText(seed uint64, i int) string {
	r := rand.New(rand.NewPCG(seed, uint64(i)))
	return words[r.IntN(len(words))]
}

func (s *state) inference(w http.ResponseWriter, r *http.Request) {
	// Rejections are plain text, as llm-worker-rbee answers them.
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
		http.Error(w, "Expected request with `Content-Type: application/json`", http.StatusUnsupportedMediaType)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20+1))
	if err != nil {
		http.Error(w, "Failed to buffer the request body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if len(body) > 1<<20 {
		http.Error(w, "Failed to buffer the request body: length limit exceeded", http.StatusRequestEntityTooLarge)
		return
	}
	if !json.Valid(body) {
		http.Error(w, "Failed to parse the request body as JSON: invalid JSON", http.StatusBadRequest)
		return
	}
	var q InferenceRequest
	if err := json.Unmarshal(body, &q); err != nil {
		http.Error(w, "Failed to deserialize the JSON body into the target type: "+err.Error(), http.StatusUnprocessableEntity)
		return
	}
	// serde names the first missing field in declaration order; a map's
	// random order named any of them.
	for _, f := range []struct {
		name    string
		missing bool
	}{{"job_id", q.JobID == nil}, {"prompt", q.Prompt == nil}, {"max_tokens", q.MaxTokens == nil}} {
		if f.missing {
			http.Error(w, "Failed to deserialize the JSON body into the target type: missing field `"+f.name+"`", http.StatusUnprocessableEntity)
			return
		}
	}
	if errs := q.Validate(); len(errs) > 0 {
		writeJSON(w, http.StatusBadRequest, map[string]any{"errors": errs})
		return
	}
	if !s.ready.Load() {
		http.Error(w, "Model loading", http.StatusServiceUnavailable)
		return
	}
	seed := uint64(42)
	if q.Seed != nil {
		seed = *q.Seed
	}
	s.active.Add(1)
	defer s.active.Add(-1)
	s.requests.Add(1)
	s.stream(r.Context(), w, *q.JobID, int(*q.MaxTokens), seed, q.Stop)
}

// Event shapes of the SSE stream, field for field as llm-worker-rbee sends them.
type startedEvent struct {
	Type      string `json:"type"`
	JobID     string `json:"job_id"`
	Model     string `json:"model"`
	StartedAt string `json:"started_at"`
}

type tokenEvent struct {
	Type string `json:"type"`
	T    string `json:"t"`
	I    int    `json:"i"`
}

type endEvent struct {
	Type                string  `json:"type"`
	TokensOut           int     `json:"tokens_out"`
	DecodeTimeMs        int64   `json:"decode_time_ms"`
	StopReason          string  `json:"stop_reason"`
	StopSequenceMatched *string `json:"stop_sequence_matched,omitempty"`
}

func (s *state) stream(ctx context.Context, w http.ResponseWriter, jobID string, maxTokens int, seed uint64, stops []string) {
	e := startSSE(w)
	start := time.Now()
	if !e.send(startedEvent{"started", jobID, s.cfg.modelName(), itoa(start.Unix())}) {
		return
	}
	end := endEvent{Type: "end", StopReason: "MAX_TOKENS"}
	_, m, matched, ok := s.tokens(ctx, start, maxTokens, seed, stops, func(i int, tok string) bool {
		if !e.send(tokenEvent{"token", tok, i}) {
			return false
		}
		end.TokensOut++
		return true
	})
	if !ok {
		return
	}
	if matched {
		end.StopReason, end.StopSequenceMatched = "STOP_SEQUENCE", &m
	}
	end.DecodeTimeMs = time.Since(start).Milliseconds()
	if !e.send(end) {
		return
	}
	e.done()
}

// tokens produces up to maxTokens tokens of seed, paced at the configured
// rate from start, calling each (if set) per token, until one of stops
// matches the text (matched, and which). ok is false when ctx ended, the
// worker wedged or each failed.
func (s *state) tokens(ctx context.Context, start time.Time, maxTokens int, seed uint64, stops []string, each func(i int, tok string) bool) (text, stop string, matched, ok bool) {
	var gap time.Duration
	if s.cfg.TokensPerSecond > 0 {
		gap = time.Duration(float64(time.Second) / s.cfg.TokensPerSecond)
	}
	var b strings.Builder
	next := start
	for i := 0; i < maxTokens; i++ {
		if gap > 0 {
			next = next.Add(gap)
			if d := time.Until(next); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-ctx.Done():
					t.Stop()
					return "", "", false, false
				case <-s.hung:
					t.Stop()
					<-ctx.Done() // a wedged worker stops mid-stream
					return "", "", false, false
				case <-t.C:
				}
			}
		}
		tok := tokenText(seed, i)
		if each != nil && !each(i, tok) {
			return "", "", false, false
		}
		s.tokensOut.Add(1)
		b.WriteString(tok)
		if m, ok := matchStop(b.String(), stops); ok {
			return b.String(), m, true, true
		}
	}
	return b.String(), "", false, true
}

// sse writes a server-sent event stream: one JSON object per event, each
// flushed.
type sse struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func startSSE(w http.ResponseWriter) sse {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	return sse{w: w, rc: http.NewResponseController(w)}
}

// send reports whether the event reached the client.
func (e sse) send(v any) bool {
	b, err := json.Marshal(v)
	if err != nil {
		return false
	}
	if _, err := fmt.Fprintf(e.w, "data: %s\n\n", b); err != nil {
		return false
	}
	return e.rc.Flush() == nil
}

// done ends the stream with [DONE].
func (e sse) done() {
	if _, err := io.WriteString(e.w, "data: [DONE]\n\n"); err == nil {
		_ = e.rc.Flush()
	}
}

func matchStop(text string, stops []string) (string, bool) {
	for _, st := range stops {
		// Only the tail can hold a new match: the last token plus len(st).
		if st != "" && strings.Contains(text[max(0, len(text)-len(st)-16):], st) {
			return st, true
		}
	}
	return "", false
}
