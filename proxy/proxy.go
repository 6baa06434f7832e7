// Package proxy forwards inference requests from the hive's API to a
// worker's POST /v1/inference and streams the worker's SSE answer back
// event by event, recording latency, time to first token, decode rate,
// tokens and outcomes as Prometheus metrics labelled by backend and model.
//
// The stream is passed through unchanged (narration, started, token, end,
// error events and the final "data: [DONE]"), line by line, and flushed
// whenever the worker pauses, so a client sees each token as soon as the
// hive has it. When the stream breaks the proxy appends an event of the
// worker's own error shape, then [DONE]:
//
//	data: {"type":"error","code":"WORKER_STREAM_ERROR","message":"..."}
//	data: {"type":"error","code":"TIMEOUT","message":"..."}
//	data: {"type":"error","code":"HIVE_SHUTTING_DOWN","message":"..."}
//
// The last one is sent to every stream still open when the hive, shutting
// down, calls Drain.
//
// Failures before the first byte of the stream are JSON error envelopes
// (api.WriteError) with the status the client should see.
package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/api"
)

// Error codes the proxy adds to the api envelope and to SSE error events.
const (
	CodeWorkerUnreachable = "WORKER_UNREACHABLE"   // 502: no HTTP response from the worker
	CodeWorkerTimeout     = "WORKER_TIMEOUT"       // 504: no response headers before the timeout
	CodeWorkerBadResponse = "WORKER_BAD_RESPONSE"  // 502: 200 but not text/event-stream
	CodeStreamError       = "WORKER_STREAM_ERROR"  // SSE: the stream ended before the end event
	CodeStreamTimeout     = "TIMEOUT"              // SSE: the worker's own code for a timeout
	CodeRequestTimeout    = api.CodeRequestTimeout // 408: the client's body did not arrive in time
	CodeShuttingDown      = "HIVE_SHUTTING_DOWN"   // SSE: Drain ended the stream
)

// Defaults for Options' zero values.
const (
	DefaultTimeout      = 10 * time.Minute
	DefaultIdleTimeout  = 2 * time.Minute
	DefaultWriteTimeout = 30 * time.Second
)

// maxLine is the longest SSE line that is parsed; longer lines are
// forwarded intact but not counted.
const maxLine = 32 << 10

const earlyEndMessage = "the worker's stream ended before its end event"

// maxErrorBody bounds how much of a worker's non-200 answer is read and
// passed on in the error details.
const maxErrorBody = 64 << 10

// Labels name the worker behind a request, for metrics only: both values
// must come from a bounded set (the config's backends, the catalog's
// models), never from the request. Past 100 distinct pairs the model is
// recorded as OtherModel.
type Labels struct {
	Backend string
	Model   string
}

// Hooks are called once per Serve call. OnStart runs before anything else,
// OnEnd when Serve returns, always and exactly once after OnStart, so a
// caller that counts them knows whether a worker has requests in flight.
// Prepare, if set, may edit the outbound request, e.g. to add the worker's
// own bearer token: the client's Authorization header (the hive's token) is
// never forwarded.
type Hooks struct {
	OnStart func()
	OnEnd   func()
	Prepare func(*http.Request)
}

// Options tune a Proxy; the zero value is usable.
type Options struct {
	// Transport carries requests to workers; nil means a clone of
	// http.DefaultTransport with keep-alives sized for many streams.
	Transport http.RoundTripper
	// Timeout bounds a whole request, stream included (DefaultTimeout if
	// 0, none if negative).
	Timeout time.Duration
	// IdleTimeout bounds the worker's silence: before its response headers
	// and between two reads of the stream (DefaultIdleTimeout if 0, none if
	// negative). A hung worker is cut off after it.
	IdleTimeout time.Duration
	// WriteTimeout bounds each write to the client, so a stalled client
	// cannot hold a worker (DefaultWriteTimeout if 0, none if negative).
	WriteTimeout time.Duration
	// MaxBodyBytes caps the request body (api.MaxBodyBytes if 0).
	MaxBodyBytes int64
	// Logger receives one line per failed request; nil discards.
	Logger *slog.Logger
}

// Proxy is the inference proxy. It is safe for concurrent use.
type Proxy struct {
	client       *http.Client
	timeout      time.Duration
	idleTimeout  time.Duration
	writeTimeout time.Duration
	maxBody      int64
	log          *slog.Logger
	m            *metrics
	readers      sync.Pool // *bufio.Reader: a stream's line buffer, reused
	// drained ends with Drain. It is not the client's context: a
	// stream ended by Drain still gets its error event and [DONE].
	drained context.Context
	drain   context.CancelFunc
}

// Causes set on the upstream context, to tell a timeout from a client leaving.
var (
	errDeadline = errors.New("inference deadline exceeded")
	errIdle     = errors.New("worker idle timeout")
	errDrain    = errors.New("the hive is shutting down")
)

// New builds a Proxy whose metrics are registered in reg.
func New(reg prometheus.Registerer, opts Options) (*Proxy, error) {
	if reg == nil {
		return nil, errors.New("proxy: nil registerer")
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	tr := opts.Transport
	if tr == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = 64 // workers are few and local; reuse connections
		t.DisableCompression = true
		// Workers are on this host or its network: an HTTP_PROXY in the
		// hive's environment (meant for model downloads) must not get the
		// prompts and the worker's bearer token, as it did for any
		// worker_host that is not a loopback address.
		t.Proxy = nil
		tr = t
	}
	p := &Proxy{
		client: &http.Client{
			Transport: tr,
			// A redirect from a worker is a misconfiguration; surface it.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		timeout:      orDefault(opts.Timeout, DefaultTimeout),
		idleTimeout:  orDefault(opts.IdleTimeout, DefaultIdleTimeout),
		writeTimeout: orDefault(opts.WriteTimeout, DefaultWriteTimeout),
		maxBody:      opts.MaxBodyBytes,
		log:          opts.Logger,
		m:            m,
	}
	p.drained, p.drain = context.WithCancel(context.Background())
	if p.maxBody <= 0 {
		p.maxBody = api.MaxBodyBytes
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	return p, nil
}

// Drain ends every open stream now: its worker request is cancelled and
// the client gets a HIVE_SHUTTING_DOWN error event, then [DONE], so that a
// stream longer than the hive's shutdown drain ends in a way the client can
// tell from a broken connection. Requests that arrive later get 503.
// Call it shortly before the HTTP server's shutdown deadline.
func (p *Proxy) Drain() { p.drain() }

func orDefault(d, def time.Duration) time.Duration {
	switch {
	case d == 0:
		return def
	case d < 0:
		return 0
	}
	return d
}

// outcome is how a request ended, for metrics and the log.
type outcome struct {
	status    string // Status*
	errorType string // ErrorType*, "" unless status is error or cancelled
	err       error
}

// Serve forwards r's body to upstream's /v1/inference (upstream's path is
// kept as a prefix) and streams the answer to w. It never panics on a
// broken worker or client and writes nothing after the client has gone.
func (p *Proxy) Serve(w http.ResponseWriter, r *http.Request, upstream *url.URL, labels Labels, hooks Hooks) {
	start := time.Now()
	labels, a := p.begin(labels, hooks)
	defer a.end()

	st := &stream{ttft: p.m.ttft.WithLabelValues(labels.Backend, labels.Model)}
	o := p.serve(w, r, upstream, hooks, st, start)
	p.record(labels, st, o, start)
}

// active is a request in flight: begin counts it, end (deferred) uncounts
// it and runs the OnEnd hook.
type active struct {
	inFlight prometheus.Gauge
	onEnd    func()
}

// begin runs the OnStart hook and counts the request in flight; it returns
// the labels with their defaults filled in.
func (p *Proxy) begin(labels Labels, hooks Hooks) (Labels, active) {
	if hooks.OnStart != nil {
		hooks.OnStart()
	}
	labels = p.m.labels(labels)
	a := active{inFlight: p.m.inFlight.WithLabelValues(labels.Backend, labels.Model), onEnd: hooks.OnEnd}
	a.inFlight.Inc()
	return labels, a
}

func (a active) end() {
	a.inFlight.Dec()
	if a.onEnd != nil {
		a.onEnd()
	}
}

func (p *Proxy) serve(w http.ResponseWriter, r *http.Request, upstream *url.URL, hooks Hooks, st *stream, start time.Time) outcome {
	if upstream == nil {
		api.WriteError(w, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "no worker address"))
		return outcome{status: StatusError, errorType: ErrorTypeUnreachable, err: errors.New("nil upstream URL")}
	}
	if p.drained.Err() != nil {
		api.WriteError(w, api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "the hive is shutting down"))
		return outcome{status: StatusError, errorType: ErrorTypeShutdown, err: errDrain}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, p.maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			api.WriteError(w, api.Errorf(http.StatusRequestEntityTooLarge, api.CodePayloadTooLarge, "request body exceeds %d bytes", p.maxBody))
			return outcome{status: StatusRejected, err: fmt.Errorf("read request body: %w", err)}
		}
		// A body cut short (the client half-closed before Content-Length
		// bytes) or too slow for the server's read timeout is the
		// request's fault: answer it with an envelope, like every other
		// bad body. A client that is really gone never reads the answer.
		if api.IsReadTimeout(err) {
			api.WriteError(w, api.Errorf(http.StatusRequestTimeout, CodeRequestTimeout, "the request body did not arrive in time"))
		} else {
			api.WriteError(w, api.Errorf(http.StatusBadRequest, api.CodeInvalidJSON, "request body incomplete: %v", err))
		}
		return outcome{status: StatusRejected, err: fmt.Errorf("read request body: %w", err)}
	}

	uc := p.upstreamContext(r, true)
	defer uc.release()
	ctx, idle := uc.ctx, uc.idle

	req, o, ok := newUpstreamRequest(ctx, w, r, upstream.JoinPath("/v1/inference").String(), body, true, hooks, "X-Correlation-ID", "X-Deadline")
	if !ok {
		return o
	}

	resp, err := p.client.Do(req)
	if err != nil {
		return p.failBeforeStream(ctx, w, r, err)
	}
	defer resp.Body.Close()
	idle()

	if resp.StatusCode != http.StatusOK {
		return writeWorkerError(w, resp)
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "text/event-stream" {
		api.WriteError(w, api.Errorf(http.StatusBadGateway, CodeWorkerBadResponse,
			"worker answered %q, not an event stream", resp.Header.Get("Content-Type")))
		return outcome{status: StatusError, errorType: ErrorTypeStream, err: fmt.Errorf("worker content type %q", resp.Header.Get("Content-Type"))}
	}

	cw := newClientWriter(w, p.writeTimeout)
	startEventStream(w, cw, resp.Header.Get("X-Correlation-ID"))

	readErr := p.pump(cw, resp.Body, st, idle, start)
	if cw.err == nil && st.hasData && !st.overlong {
		// finish will close this half-sent event, so the client does
		// receive it: count what it carries.
		st.dispatch(start, time.Now())
	}

	switch {
	case st.workerErr != "":
		cw.finish(st, "", "")
		return outcome{status: StatusError, errorType: ErrorTypeWorker, err: fmt.Errorf("worker error event: %s", st.workerErr)}
	case st.ended:
		cw.finish(st, "", "")
		return outcome{status: StatusOK}
	case cw.err != nil || r.Context().Err() != nil:
		return outcome{status: StatusCancelled, errorType: ErrorTypeClientCancel, err: errors.Join(cw.err, r.Context().Err())}
	case errors.Is(context.Cause(ctx), errDrain):
		cw.finish(st, CodeShuttingDown, errDrain.Error())
		return outcome{status: StatusError, errorType: ErrorTypeShutdown, err: errDrain}
	case isTimeout(ctx):
		cw.finish(st, CodeStreamTimeout, "the worker did not finish in time: "+context.Cause(ctx).Error())
		return outcome{status: StatusError, errorType: ErrorTypeTimeout, err: context.Cause(ctx)}
	default:
		if readErr == nil {
			readErr = io.ErrUnexpectedEOF
		}
		cw.finish(st, CodeStreamError, earlyEndMessage)
		return outcome{status: StatusError, errorType: ErrorTypeStream, err: fmt.Errorf("worker stream: %w", readErr)}
	}
}

// startEventStream sends the client the headers of an event stream (with
// the worker's correlation ID unless it is "") and flushes them through cw,
// w's writer. (The caller makes cw, so that it can stay on the stack.)
func startEventStream(w http.ResponseWriter, cw *clientWriter, correlationID string) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // tell nginx-style fronts not to buffer
	if correlationID != "" {
		h.Set("X-Correlation-ID", correlationID)
	}
	w.WriteHeader(http.StatusOK)
	cw.flush()
}

// upstreamCtx bounds a worker request: by the client's context, the
// proxy's total timeout and idle timeout and, where drain is set, Drain.
type upstreamCtx struct {
	ctx       context.Context
	cancel    context.CancelCauseFunc
	cancelT   context.CancelFunc // the total timeout's, or nil
	stopDrain func() bool        // or nil
	timer     *time.Timer        // the idle timeout's, or nil
	idleAfter time.Duration
}

func (p *Proxy) upstreamContext(r *http.Request, drain bool) upstreamCtx {
	ctx, cancel := context.WithCancelCause(r.Context())
	u := upstreamCtx{ctx: ctx, cancel: cancel, idleAfter: p.idleTimeout}
	if drain {
		u.stopDrain = context.AfterFunc(p.drained, func() { cancel(errDrain) })
	}
	if p.timeout > 0 {
		u.ctx, u.cancelT = context.WithTimeoutCause(u.ctx, p.timeout, errDeadline)
	}
	if p.idleTimeout > 0 {
		u.timer = time.AfterFunc(p.idleTimeout, func() { cancel(errIdle) })
	}
	return u
}

// idle pushes the idle deadline back; a no-op without one.
func (u upstreamCtx) idle() {
	if u.timer != nil {
		u.timer.Reset(u.idleAfter)
	}
}

// release undoes upstreamContext, in the reverse order of its steps.
func (u upstreamCtx) release() {
	if u.timer != nil {
		u.timer.Stop()
	}
	if u.cancelT != nil {
		u.cancelT()
	}
	if u.stopDrain != nil {
		u.stopDrain()
	}
	u.cancel(nil)
}

// newUpstreamRequest builds the POST of body to a worker URL, with the
// client's headers named in pass and the Prepare hook applied; a bad URL
// is answered (500) and its outcome returned with ok false.
func newUpstreamRequest(ctx context.Context, w http.ResponseWriter, r *http.Request, url string, body []byte, stream bool, hooks Hooks, pass ...string) (req *http.Request, o outcome, ok bool) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		api.WriteError(w, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "bad worker address"))
		return nil, outcome{status: StatusError, errorType: ErrorTypeUnreachable, err: fmt.Errorf("build upstream request: %w", err)}, false
	}
	req.Header.Set("Content-Type", "application/json")
	if stream {
		req.Header.Set("Accept", "text/event-stream")
	}
	// Compression would make the transport buffer; tokens must flow.
	req.Header.Set("Accept-Encoding", "identity")
	for _, h := range pass {
		if v := r.Header.Get(h); v != "" {
			req.Header.Set(h, v)
		}
	}
	if hooks.Prepare != nil {
		hooks.Prepare(req)
	}
	return req, outcome{}, true
}

func isTimeout(ctx context.Context) bool {
	c := context.Cause(ctx)
	return errors.Is(c, errDeadline) || errors.Is(c, errIdle)
}

// failBeforeStream answers a request whose worker gave no response.
func (p *Proxy) failBeforeStream(ctx context.Context, w http.ResponseWriter, r *http.Request, err error) outcome {
	switch {
	case r.Context().Err() != nil:
		return outcome{status: StatusCancelled, errorType: ErrorTypeClientCancel, err: err}
	case errors.Is(context.Cause(ctx), errDrain):
		api.WriteError(w, api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "the hive is shutting down"))
		return outcome{status: StatusError, errorType: ErrorTypeShutdown, err: fmt.Errorf("worker request: %w", err)}
	case isTimeout(ctx):
		api.WriteError(w, api.Errorf(http.StatusGatewayTimeout, CodeWorkerTimeout, "the worker did not answer in time"))
		return outcome{status: StatusError, errorType: ErrorTypeTimeout, err: fmt.Errorf("worker request: %w", err)}
	default:
		msg := "the worker cannot be reached"
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Op != "" {
			msg += " (" + oe.Op + ")"
		}
		api.WriteError(w, api.Errorf(http.StatusBadGateway, CodeWorkerUnreachable, "%s", msg))
		return outcome{status: StatusError, errorType: ErrorTypeUnreachable, err: fmt.Errorf("worker request: %w", err)}
	}
}

// writeWorkerError maps a worker's non-200 answer to the envelope. A
// refusal of the request itself keeps its status (the client must fix the
// request); anything else is the hive's upstream failing, a 502.
func writeWorkerError(w http.ResponseWriter, resp *http.Response) outcome {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	details := map[string]any{"worker_status": resp.StatusCode}
	var parsed any
	if json.Unmarshal(raw, &parsed) == nil {
		details["worker_body"] = parsed
	} else if s := strings.TrimSpace(string(raw)); s != "" {
		details["worker_body"] = s
	}
	o := outcome{status: StatusError, errorType: ErrorTypeWorker, err: fmt.Errorf("worker answered %d", resp.StatusCode)}
	var e *api.Error
	switch resp.StatusCode {
	case http.StatusBadRequest, http.StatusUnprocessableEntity:
		e = api.Errorf(resp.StatusCode, api.CodeValidation, "the worker rejected the request")
		o = outcome{status: StatusRejected, err: o.err}
	case http.StatusRequestEntityTooLarge:
		e = api.Errorf(resp.StatusCode, api.CodePayloadTooLarge, "the worker rejected the request as too large")
		o = outcome{status: StatusRejected, err: o.err}
	case http.StatusTooManyRequests, http.StatusServiceUnavailable:
		e = api.Errorf(resp.StatusCode, api.CodeUnavailable, "the worker is busy or not ready")
	default:
		e = api.Errorf(http.StatusBadGateway, api.CodeUpstream, "the worker answered %d %s", resp.StatusCode, http.StatusText(resp.StatusCode))
	}
	api.WriteError(w, e.WithDetails(details))
	return o
}

// record turns the outcome into metrics and, for failures, a log line.
func (p *Proxy) record(l Labels, st *stream, o outcome, start time.Time) {
	p.m.requests.WithLabelValues(l.Backend, l.Model, o.status).Inc()
	if o.errorType != "" {
		p.m.errors.WithLabelValues(l.Backend, l.Model, o.errorType).Inc()
	}
	tokens := float64(st.tokens)
	if st.ended && st.tokensOut != nil && *st.tokensOut >= 0 {
		tokens = float64(*st.tokensOut) // the worker's own count is authoritative
	}
	if tokens > 0 {
		p.m.tokens.WithLabelValues(l.Backend, l.Model).Add(tokens)
	}
	if o.status == StatusOK {
		p.m.duration.WithLabelValues(l.Backend, l.Model).Observe(st.endAt.Sub(start).Seconds())
		if tps, ok := st.tokensPerSecond(); ok {
			p.m.tps.WithLabelValues(l.Backend, l.Model).Observe(tps)
		}
	}
	if o.err != nil && o.status != StatusOK {
		p.log.Warn("inference request failed",
			slog.String("backend", l.Backend), slog.String("model", l.Model),
			slog.String("status", o.status), slog.String("error_type", o.errorType),
			slog.Int("tokens", st.tokens), slog.Duration("duration", time.Since(start)),
			slog.String("error", o.err.Error()))
	}
}

// pump copies the worker's stream to the client line by line, parsing
// events as they pass. It returns the upstream read error, nil after
// [DONE] or a clean EOF, and stops early when the client is gone.
func (p *Proxy) pump(cw *clientWriter, body io.Reader, st *stream, idle func(), start time.Time) error {
	br := p.getReader(body)
	defer p.putReader(br)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			idle()
			if err == nil && st.closesEarly(line) {
				cw.errorEvent(CodeStreamError, earlyEndMessage)
			}
			cw.write(line)
			if st.feed(line, err == nil, start, time.Now()) {
				cw.flush()
				return nil // [DONE]: the protocol's last word
			}
			// Flush when the worker pauses: batches bursts, never holds a token.
			if br.Buffered() == 0 {
				cw.flush()
			}
			if cw.err != nil {
				return nil
			}
		}
		switch {
		case err == nil, errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			return nil
		default:
			return err
		}
	}
}

// getReader is a pooled maxLine reader of body; putReader returns it.
func (p *Proxy) getReader(body io.Reader) *bufio.Reader {
	br, _ := p.readers.Get().(*bufio.Reader)
	if br == nil {
		return bufio.NewReaderSize(body, maxLine)
	}
	br.Reset(body)
	return br
}

func (p *Proxy) putReader(br *bufio.Reader) {
	br.Reset(nil) // drop the body before pooling
	p.readers.Put(br)
}
