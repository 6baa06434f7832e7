package proxy

// The OpenAI-compatible side of the proxy: engines such as llama.cpp's
// llama-server, vLLM, SGLang and TGI speak POST /v1/chat/completions and
// /v1/completions (llama-server also its native /completion). Requests pass
// through unchanged but for one field: a streamed OpenAI request that does
// not ask for usage gets stream_options.include_usage, so the engine reports
// its token counts, and the usage-only chunk that adds is not forwarded.
//
// Metrics come from what the engine sends: time to first token at the first
// content delta; tokens from usage, else llama-server's timings (predicted_n,
// predicted_per_second, prompt_n), else the counted content deltas. A stream
// that breaks gets an OpenAI-shaped error event, then [DONE]:
//
//	data: {"error":{"message":"...","type":"server_error","code":"WORKER_STREAM_ERROR"}}

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"syscall"
	"time"

	"github.com/rbee/rbee-hive/api"
)

// Route is an engine endpoint the OpenAI proxy forwards to.
type Route string

// The routes an OpenAI-compatible engine may serve.
const (
	RouteChatCompletions Route = "/v1/chat/completions"
	RouteCompletions     Route = "/v1/completions"
	RouteNativeComplete  Route = "/completion" // llama.cpp's own; no [DONE], final event has "stop":true
)

// Valid reports whether r is one of the routes above.
func (r Route) Valid() bool {
	return r == RouteChatCompletions || r == RouteCompletions || r == RouteNativeComplete
}

// maxJSONResponse bounds a non-streamed engine answer.
const maxJSONResponse = 32 << 20

// Values of the reason label on rbee_hive_inference_finish_reasons_total;
// anything else an engine says is recorded as FinishOther.
const (
	FinishStop          = "stop"
	FinishLength        = "length"
	FinishToolCalls     = "tool_calls"
	FinishContentFilter = "content_filter"
	FinishOther         = "other"
)

func finishLabel(s string) string {
	switch s {
	case FinishStop, FinishLength, FinishToolCalls, FinishContentFilter:
		return s
	case "eos", "word": // llama-server's native stop_type
		return FinishStop
	case "limit":
		return FinishLength
	}
	return FinishOther
}

// oaiChunk holds the fields of OpenAI chunks, OpenAI responses and
// llama-server's native events that feed the metrics.
type oaiChunk struct {
	Choices []struct {
		Delta *struct {
			Content          string `json:"content"`
			ReasoningContent string `json:"reasoning_content"`
		} `json:"delta"`
		Text         string  `json:"text"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     *int64 `json:"prompt_tokens"`
		CompletionTokens *int64 `json:"completion_tokens"`
	} `json:"usage"`
	Timings *struct {
		PromptN            *int64   `json:"prompt_n"`
		PredictedN         *int64   `json:"predicted_n"`
		PredictedPerSecond *float64 `json:"predicted_per_second"`
	} `json:"timings"`
	// llama-server's native /completion.
	Content         *string         `json:"content"`
	Stop            *bool           `json:"stop"`
	StopType        string          `json:"stop_type"`
	TokensPredicted *int64          `json:"tokens_predicted"`
	TokensEvaluated *int64          `json:"tokens_evaluated"`
	Error           json.RawMessage `json:"error"`
}

// oaiState is what one OpenAI request learned, beside the shared stream.
type oaiState struct {
	route        Route
	prompt       *int64
	completion   *int64
	tps          *float64
	finish       []string
	stripUsage   bool // the client did not ask for usage; drop the usage-only chunk
	engineErr    bool // the engine sent an error event
	stopSeen     bool // native: the final event
	finishedSeen bool // OpenAI: a finish_reason
}

// take records one parsed chunk; it reports whether the chunk had content.
func (o *oaiState) take(c *oaiChunk) (content bool) {
	for _, ch := range c.Choices {
		if ch.Text != "" || (ch.Delta != nil && (ch.Delta.Content != "" || ch.Delta.ReasoningContent != "")) {
			content = true
		}
		if ch.FinishReason != nil && *ch.FinishReason != "" {
			o.finish = append(o.finish, *ch.FinishReason)
			o.finishedSeen = true
		}
	}
	if c.Content != nil && *c.Content != "" {
		content = true
	}
	if c.Usage != nil {
		if c.Usage.PromptTokens != nil {
			o.prompt = c.Usage.PromptTokens
		}
		if c.Usage.CompletionTokens != nil {
			o.completion = c.Usage.CompletionTokens
		}
	}
	if t := c.Timings; t != nil {
		if o.prompt == nil && t.PromptN != nil {
			o.prompt = t.PromptN
		}
		if o.completion == nil && t.PredictedN != nil {
			o.completion = t.PredictedN
		}
		if t.PredictedPerSecond != nil && *t.PredictedPerSecond > 0 {
			o.tps = t.PredictedPerSecond
		}
	}
	if o.route == RouteNativeComplete {
		if o.prompt == nil && c.TokensEvaluated != nil {
			o.prompt = c.TokensEvaluated
		}
		if o.completion == nil && c.TokensPredicted != nil {
			o.completion = c.TokensPredicted
		}
		if c.Stop != nil && *c.Stop {
			o.stopSeen = true
			if c.StopType != "" {
				o.finish = append(o.finish, c.StopType)
			}
		}
	}
	if len(c.Error) > 0 && !bytes.Equal(c.Error, []byte("null")) {
		o.engineErr = true
	}
	return content
}

// ServeOpenAI forwards r to the engine's route under upstream and passes the
// answer back: streamed (SSE, one flush per event) when the request says
// "stream": true, else the engine's JSON. It shares Serve's metrics, hooks,
// timeouts and error envelopes.
func (p *Proxy) ServeOpenAI(w http.ResponseWriter, r *http.Request, upstream *url.URL, route Route, labels Labels, hooks Hooks) {
	start := time.Now()
	labels, a := p.begin(labels, hooks)
	defer a.end()

	st := &stream{ttft: p.m.ttft.WithLabelValues(labels.Backend, labels.Model)}
	oa := &oaiState{route: route}
	o := p.serveOpenAI(w, r, upstream, route, hooks, st, oa, start)
	if oa.completion != nil && *oa.completion >= 0 {
		st.tokensOut = oa.completion
	}
	if oa.tps != nil && st.tokensOut != nil && *st.tokensOut > 0 {
		ms := float64(*st.tokensOut) / *oa.tps * 1000
		st.decodeMs = &ms
	}
	p.record(labels, st, o, start)
	if oa.prompt != nil && *oa.prompt > 0 {
		p.m.promptTokens.WithLabelValues(labels.Backend, labels.Model).Add(float64(*oa.prompt))
	}
	for _, f := range oa.finish {
		p.m.finish.WithLabelValues(labels.Backend, labels.Model, finishLabel(f)).Inc()
	}
}

func (p *Proxy) serveOpenAI(w http.ResponseWriter, r *http.Request, upstream *url.URL, route Route, hooks Hooks, st *stream, oa *oaiState, start time.Time) outcome {
	if upstream == nil || !route.Valid() {
		api.WriteError(w, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "no worker address or route"))
		return outcome{status: StatusError, errorType: ErrorTypeUnreachable, err: fmt.Errorf("upstream %v route %q", upstream, route)}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, p.maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			api.WriteError(w, api.Errorf(http.StatusRequestEntityTooLarge, api.CodePayloadTooLarge, "request body exceeds %d bytes", p.maxBody))
			return outcome{status: StatusRejected, err: fmt.Errorf("read request body: %w", err)}
		}
		return outcome{status: StatusCancelled, errorType: ErrorTypeClientCancel, err: fmt.Errorf("read request body: %w", err)}
	}
	body, streaming, strip, err := prepareOpenAIBody(body, route)
	if err != nil {
		api.WriteError(w, api.Errorf(http.StatusBadRequest, api.CodeInvalidJSON, "%v", err))
		return outcome{status: StatusRejected, err: err}
	}
	oa.stripUsage = strip

	uc := p.upstreamContext(r, false)
	defer uc.release()
	ctx, idle := uc.ctx, uc.idle

	req, o, ok := newUpstreamRequest(ctx, w, r, upstream.JoinPath(string(route)).String(), body, streaming, hooks, "X-Correlation-ID", "X-Request-ID")
	if !ok {
		return o
	}
	resp, err := p.doStaleRetry(req)
	if err != nil {
		return p.failBeforeStream(ctx, w, r, err)
	}
	defer resp.Body.Close()
	idle()
	if resp.StatusCode != http.StatusOK {
		return writeWorkerError(w, resp)
	}
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if !streaming || mt != "text/event-stream" {
		return p.passJSON(ctx, w, r, resp, st, oa, start)
	}

	cw := newClientWriter(w, p.writeTimeout)
	startEventStream(w, cw, "")

	readErr := p.pumpOpenAI(cw, resp.Body, st, oa, idle, start)
	switch {
	case oa.engineErr:
		cw.finishOpenAI(st, oa, "", "")
		return outcome{status: StatusError, errorType: ErrorTypeWorker, err: errors.New("engine error event")}
	case st.done || (route == RouteNativeComplete && oa.stopSeen):
		st.ended = true
		if st.endAt.IsZero() {
			st.endAt = time.Now()
		}
		cw.finishOpenAI(st, oa, "", "")
		return outcome{status: StatusOK}
	case cw.err != nil || r.Context().Err() != nil:
		return outcome{status: StatusCancelled, errorType: ErrorTypeClientCancel, err: errors.Join(cw.err, r.Context().Err())}
	case isTimeout(ctx):
		cw.finishOpenAI(st, oa, CodeStreamTimeout, "the worker did not finish in time: "+context.Cause(ctx).Error())
		return outcome{status: StatusError, errorType: ErrorTypeTimeout, err: context.Cause(ctx)}
	default:
		if readErr == nil {
			readErr = io.ErrUnexpectedEOF
		}
		cw.finishOpenAI(st, oa, CodeStreamError, earlyEndMessage)
		return outcome{status: StatusError, errorType: ErrorTypeStream, err: fmt.Errorf("worker stream: %w", readErr)}
	}
}

// doStaleRetry sends req once more when it failed on a reused keep-alive
// connection without any answer: llama-server (cpp-httplib) closes idle
// connections after 5 s, and a POST that races that close gets EOF, which
// the transport does not retry for a non-idempotent method. The engine
// closed that connection, so it holds no work of this request.
func (p *Proxy) doStaleRetry(req *http.Request) (*http.Response, error) {
	var reused bool
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }}
	resp, err := p.client.Do(req.WithContext(httptrace.WithClientTrace(req.Context(), trace)))
	if err == nil || !reused || req.Context().Err() != nil || req.GetBody == nil ||
		!(errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)) {
		return resp, err
	}
	body, gerr := req.GetBody()
	if gerr != nil {
		return nil, err
	}
	retry := req.Clone(req.Context())
	retry.Body = body
	return p.client.Do(retry)
}

// prepareOpenAIBody checks that body is a JSON object and, for a streamed
// OpenAI request without usage, asks for it. strip says the client did not.
func prepareOpenAIBody(body []byte, route Route) (out []byte, streaming, strip bool, err error) {
	var req map[string]json.RawMessage
	if err := json.Unmarshal(body, &req); err != nil || req == nil {
		return nil, false, false, errors.New("the request body must be a JSON object")
	}
	if s, ok := req["stream"]; ok {
		if err := json.Unmarshal(s, &streaming); err != nil {
			return nil, false, false, errors.New(`"stream" must be a boolean`)
		}
	}
	if !streaming || route == RouteNativeComplete {
		return body, streaming, false, nil
	}
	var so map[string]json.RawMessage
	if raw, ok := req["stream_options"]; ok && !bytes.Equal(raw, []byte("null")) {
		if err := json.Unmarshal(raw, &so); err != nil {
			return nil, false, false, errors.New(`"stream_options" must be an object`)
		}
	}
	var asked bool
	if v, ok := so["include_usage"]; ok {
		_ = json.Unmarshal(v, &asked)
	}
	if asked {
		return body, true, false, nil
	}
	if so == nil {
		so = map[string]json.RawMessage{}
	}
	so["include_usage"] = json.RawMessage("true")
	req["stream_options"], _ = json.Marshal(so)
	out, err = json.Marshal(req)
	if err != nil {
		return nil, false, false, fmt.Errorf("re-encode request: %w", err)
	}
	return out, true, true, nil
}

// passJSON forwards a non-streamed answer and reads its usage, timings and
// finish reasons.
func (p *Proxy) passJSON(ctx context.Context, w http.ResponseWriter, r *http.Request, resp *http.Response, st *stream, oa *oaiState, start time.Time) outcome {
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxJSONResponse+1))
	switch {
	case err != nil && r.Context().Err() != nil:
		return outcome{status: StatusCancelled, errorType: ErrorTypeClientCancel, err: err}
	case err != nil && isTimeout(ctx):
		api.WriteError(w, api.Errorf(http.StatusGatewayTimeout, CodeWorkerTimeout, "the worker did not finish in time"))
		return outcome{status: StatusError, errorType: ErrorTypeTimeout, err: err}
	case err != nil:
		api.WriteError(w, api.Errorf(http.StatusBadGateway, CodeWorkerBadResponse, "the worker's answer broke off"))
		return outcome{status: StatusError, errorType: ErrorTypeStream, err: fmt.Errorf("read worker answer: %w", err)}
	case len(raw) > maxJSONResponse:
		api.WriteError(w, api.Errorf(http.StatusBadGateway, CodeWorkerBadResponse, "the worker's answer exceeds %d bytes", maxJSONResponse))
		return outcome{status: StatusError, errorType: ErrorTypeStream, err: errors.New("worker answer too large")}
	}
	var c oaiChunk
	if json.Unmarshal(raw, &c) != nil {
		api.WriteError(w, api.Errorf(http.StatusBadGateway, CodeWorkerBadResponse, "the worker answered %q that is not JSON", resp.Header.Get("Content-Type")))
		return outcome{status: StatusError, errorType: ErrorTypeStream, err: errors.New("worker answer is not JSON")}
	}
	oa.take(&c)
	st.ended, st.endAt = true, time.Now()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(raw)
	if oa.engineErr {
		return outcome{status: StatusError, errorType: ErrorTypeWorker, err: errors.New("engine answered an error")}
	}
	return outcome{status: StatusOK}
}

// pumpOpenAI passes the engine's stream to the client an event at a time,
// flushing after each (llama-server writes one event per chunk, so holding
// an event until its blank line delays nothing). Lines too long to parse
// are forwarded as they come.
func (p *Proxy) pumpOpenAI(cw *clientWriter, body io.Reader, st *stream, oa *oaiState, idle func(), start time.Time) error {
	br := p.getReader(body)
	defer p.putReader(br)
	var ev []byte     // the event's raw lines, held until its blank line
	var data []byte   // its data, joined
	var isError bool  // an "error:" field (llama-server's stream errors)
	var unparsed bool // part of it was too long to parse
	emit := func(now time.Time) {
		drop := false
		if !unparsed && (len(data) > 0 || isError) {
			drop = p.oaiEvent(data, isError, st, oa, start, now)
		}
		if !drop {
			cw.write(ev)
			cw.flush()
		}
		ev, data, isError, unparsed = ev[:0], data[:0], false, false
	}
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			idle()
			switch {
			case err != nil:
				// An overlong line or the unterminated tail: pass it on.
				cw.write(ev)
				cw.write(line)
				cw.flush()
				ev, data, unparsed = ev[:0], data[:0], true
			case len(bytes.TrimRight(line, "\r\n")) == 0:
				ev = append(ev, line...)
				emit(time.Now())
				if st.done {
					return nil
				}
			default:
				ev = append(ev, line...)
				field, value, _ := bytes.Cut(bytes.TrimRight(line, "\r\n"), []byte(":"))
				value = bytes.TrimPrefix(value, []byte(" "))
				switch string(field) {
				case "data", "error":
					if len(data)+len(value) > maxLine {
						unparsed = true
						break
					}
					if len(data) > 0 {
						data = append(data, '\n')
					}
					data = append(data, value...)
					isError = isError || string(field) == "error"
				}
			}
			if cw.err != nil {
				return nil
			}
		}
		switch {
		case err == nil, errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			if len(ev) > 0 {
				emit(time.Now()) // a last event without its blank line
			}
			return nil
		default:
			return err
		}
	}
}

// oaiEvent takes one event's data; it reports whether the client must not
// see it (the usage chunk the proxy asked for).
func (p *Proxy) oaiEvent(data []byte, isError bool, st *stream, oa *oaiState, start, now time.Time) bool {
	if bytes.Equal(data, doneMarker) {
		st.done = true
		if st.endAt.IsZero() {
			st.endAt = now
		}
		return false
	}
	var c oaiChunk
	if json.Unmarshal(data, &c) != nil {
		if isError {
			oa.engineErr = true
		}
		return false
	}
	if isError {
		oa.engineErr = true
	}
	if oa.take(&c) {
		st.tokens++
		if st.tokens == 1 {
			st.firstTokenAt = now
			st.ttft.Observe(now.Sub(start).Seconds())
		}
		st.endAt = now
	}
	if oa.stopSeen || oa.finishedSeen {
		if st.endAt.IsZero() || oa.stopSeen {
			st.endAt = now
		}
	}
	return oa.stripUsage && c.Usage != nil && len(c.Choices) == 0
}

// finishOpenAI ends the client's stream: an OpenAI-shaped error event first
// when code is set, then [DONE] unless the engine sent it or the route has
// none (llama.cpp's native /completion).
func (c *clientWriter) finishOpenAI(s *stream, oa *oaiState, code, message string) {
	if c.err != nil {
		return
	}
	if code != "" && !c.errorSent {
		c.errorSent = true
		c.closeEvent()
		b, _ := json.Marshal(map[string]any{"error": map[string]string{"message": message, "type": "server_error", "code": code}})
		c.write([]byte("data: "))
		c.write(append(b, '\n', '\n'))
	}
	if !s.done && oa.route != RouteNativeComplete {
		c.closeEvent()
		c.write([]byte("data: [DONE]\n\n"))
	}
	c.flush()
}
