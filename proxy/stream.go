package proxy

import (
	"bytes"
	"encoding/json"
	"math"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// stream is what the proxy learns from the worker's SSE as it passes:
// the SSE framing (data lines joined until a blank line, per the
// EventSource rules) and the fields of the worker's inference events
// (docs/api.md#inference-proxy) that feed the metrics.
type stream struct {
	ttft prometheus.Observer

	data     []byte // data lines of the event being read
	hasData  bool
	overlong bool // the current line did not fit the reader; not parsed
	tooBig   bool // the current event's data passed maxLine; not parsed

	tokens       int
	firstTokenAt time.Time
	ended        bool
	endAt        time.Time
	tokensOut    *int64
	decodeMs     *float64
	workerErr    string // code of the worker's error event
	done         bool   // [DONE] seen
}

// event holds the fields of the worker's events that the proxy reads;
// unknown types (narration, started) and fields are ignored.
type event struct {
	Type         string   `json:"type"`
	TokensOut    *int64   `json:"tokens_out"`
	DecodeTimeMs *float64 `json:"decode_time_ms"`
	Code         string   `json:"code"`
}

var (
	doneMarker  = []byte("[DONE]")
	tokenPrefix = []byte(`{"type":"token",`)
)

// feed takes one line as read (complete: it ends in '\n'; otherwise a
// fragment of an overlong line or the stream's unterminated tail) and
// reports whether [DONE] has been seen.
func (s *stream) feed(line []byte, complete bool, start, now time.Time) bool {
	if !complete || s.overlong {
		// Fragments are forwarded but never parsed; the line's end resets.
		s.overlong = !complete
		return false
	}
	line = bytes.TrimRight(line, "\r\n")
	if len(line) == 0 {
		if s.hasData {
			s.dispatch(start, now)
		}
		s.data, s.hasData, s.tooBig = s.data[:0], false, false
		return s.done
	}
	field, value, found := bytes.Cut(line, []byte(":"))
	if !found || !bytes.Equal(field, []byte("data")) {
		return false // comments (":..."), event:, id:, retry: carry nothing we count
	}
	value = bytes.TrimPrefix(value, []byte(" "))
	if s.tooBig || len(s.data)+1+len(value) > maxLine {
		// Data lines with no blank line between them would grow the event
		// without bound; like an overlong line it is forwarded, not parsed.
		s.data, s.hasData, s.tooBig = s.data[:0], true, true
		return false
	}
	if s.hasData {
		s.data = append(s.data, '\n')
	}
	s.data = append(s.data, value...)
	s.hasData = true
	return false
}

// closesEarly reports whether line, a complete line read at an event
// boundary, is the worker's [DONE] with neither an end nor an error event
// before it: the client must get the proxy's error event before that
// [DONE], since nothing may follow it.
func (s *stream) closesEarly(line []byte) bool {
	if s.overlong || s.hasData || s.ended || s.workerErr != "" {
		return false
	}
	v, ok := bytes.CutPrefix(bytes.TrimRight(line, "\r\n"), []byte("data:"))
	return ok && bytes.Equal(bytes.TrimPrefix(v, []byte(" ")), doneMarker)
}

func (s *stream) dispatch(start, now time.Time) {
	if s.tooBig {
		return
	}
	if bytes.Equal(s.data, doneMarker) {
		s.done = true
		return
	}
	var ev event
	if bytes.HasPrefix(s.data, tokenPrefix) {
		// The workers' own encoding of the hot event: skip the JSON decoder.
		ev.Type = "token"
	} else if json.Unmarshal(s.data, &ev) != nil {
		return // not ours to judge; the client gets it verbatim
	}
	switch ev.Type {
	case "token":
		s.tokens++
		if s.tokens == 1 {
			s.firstTokenAt = now
			s.ttft.Observe(now.Sub(start).Seconds())
		}
	case "end":
		s.ended, s.endAt = true, now
		s.tokensOut, s.decodeMs = ev.TokensOut, ev.DecodeTimeMs
	case "error":
		s.workerErr = ev.Code
		if s.workerErr == "" {
			s.workerErr = "UNKNOWN"
		}
	}
}

// tokensPerSecond prefers the worker's own decode figures and falls back
// to the hive's view: tokens over the time from first token to end.
func (s *stream) tokensPerSecond() (float64, bool) {
	if s.tokensOut != nil && s.decodeMs != nil && *s.tokensOut > 0 && *s.decodeMs > 0 {
		// A worker's absurd figures (decode_time_ms 1e-300) would put +Inf
		// into the histogram's sum for good; fall back to the hive's view.
		if tps := float64(*s.tokensOut) / (*s.decodeMs / 1000); !math.IsInf(tps, 0) {
			return tps, true
		}
	}
	if s.tokens > 0 && !s.firstTokenAt.IsZero() {
		if d := s.endAt.Sub(s.firstTokenAt).Seconds(); d > 0 {
			return float64(s.tokens) / d, true
		}
	}
	return 0, false
}

// clientWriter writes to the client, remembering the first failure so that
// nothing more is attempted once the client is gone, and the SSE framing
// so that an appended error event starts on a fresh event.
type clientWriter struct {
	w            http.ResponseWriter
	rc           *http.ResponseController
	writeTimeout time.Duration
	deadlineAt   time.Time // when the write deadline was last pushed
	err          error
	written      bool
	trailingNL   int  // newlines at the end of all that was written
	errorSent    bool // the proxy's own error event went out
}

func newClientWriter(w http.ResponseWriter, writeTimeout time.Duration) *clientWriter {
	return &clientWriter{w: w, rc: http.NewResponseController(w), writeTimeout: writeTimeout}
}

func (c *clientWriter) write(b []byte) {
	if c.err != nil || len(b) == 0 {
		return
	}
	if c.writeTimeout > 0 {
		// Push the deadline at most twice per timeout: cheap, still bounded.
		if now := time.Now(); now.Sub(c.deadlineAt) > c.writeTimeout/2 {
			_ = c.rc.SetWriteDeadline(now.Add(c.writeTimeout)) // unsupported writers just lack the guard
			c.deadlineAt = now
		}
	}
	if _, err := c.w.Write(b); err != nil {
		c.err = err
		return
	}
	c.written = true
	// Count the newlines ending what was written, across writes, so that
	// finish knows whether the client is mid-line, mid-event or between events.
	n, all := 0, true
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == '\r' {
			continue
		}
		if b[i] != '\n' {
			all = false
			break
		}
		n++
	}
	if all {
		c.trailingNL += n
	} else {
		c.trailingNL = n
	}
}

func (c *clientWriter) flush() {
	if c.err != nil {
		return
	}
	if err := c.rc.Flush(); err != nil && err != http.ErrNotSupported {
		c.err = err
	}
}

// finish ends the client's stream: an error event first when code is set,
// then [DONE] if the worker did not send it.
func (c *clientWriter) finish(s *stream, code, message string) {
	if c.err != nil {
		return
	}
	if !s.done { // nothing may follow the worker's [DONE]
		if code != "" {
			c.errorEvent(code, message)
		}
		c.closeEvent()
		c.write([]byte("data: [DONE]\n\n"))
	}
	c.flush()
}

// closeEvent ends an open line and event, so what follows stands alone.
func (c *clientWriter) closeEvent() {
	for c.err == nil && c.written && c.trailingNL < 2 {
		c.write([]byte("\n"))
	}
}

// errorEvent writes the proxy's error event, once, as an event of its own.
func (c *clientWriter) errorEvent(code, message string) {
	if c.errorSent {
		return
	}
	c.errorSent = true
	c.closeEvent()
	b, _ := json.Marshal(struct {
		Type    string `json:"type"`
		Code    string `json:"code"`
		Message string `json:"message"`
	}{"error", code, message})
	c.write([]byte("data: "))
	c.write(append(b, '\n', '\n'))
}
