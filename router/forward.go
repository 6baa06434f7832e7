package router

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
)

// HTTPForwarder is a plain streaming reverse proxy to the worker's OpenAI
// routes, with no metrics: the hive's OpenAI proxy is the one to mount in
// production; this one serves tests, benchmarks and engines without it.
type HTTPForwarder struct {
	Client *http.Client // nil: http.DefaultClient
}

// Forward implements Forwarder.
func (f *HTTPForwarder) Forward(w http.ResponseWriter, r *http.Request, t Target, route string) {
	c := f.Client
	if c == nil {
		c = http.DefaultClient
	}
	out, err := http.NewRequestWithContext(r.Context(), http.MethodPost, t.URL.JoinPath(route).String(), r.Body)
	if err != nil {
		writeError(w, http.StatusBadGateway, "server_error", "worker_unreachable", err.Error(), 0)
		return
	}
	out.ContentLength = r.ContentLength
	out.Header.Set("Content-Type", "application/json")
	if a := r.Header.Get("Accept"); a != "" {
		out.Header.Set("Accept", a)
	}
	resp, err := c.Do(out)
	if err != nil {
		if r.Context().Err() == nil {
			writeError(w, http.StatusBadGateway, "server_error", "worker_unreachable", "worker "+t.WorkerID+": "+err.Error(), 0)
		}
		return
	}
	defer resp.Body.Close()
	for _, h := range []string{"Content-Type", "Cache-Control"} {
		if v := resp.Header.Get(h); v != "" {
			w.Header().Set(h, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	stream := strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream")
	rc := http.NewResponseController(w)
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			if stream {
				_ = rc.Flush()
			}
		}
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			if stream && r.Context().Err() == nil {
				// The status line is gone: end the stream with an event.
				var b errorBody
				b.Error.Message = "worker " + t.WorkerID + " broke off the stream: " + err.Error()
				b.Error.Type, b.Error.Code = "server_error", "worker_stream_broken"
				data, _ := json.Marshal(b)
				_, _ = io.WriteString(w, "\n\ndata: "+string(data)+"\n\n")
				_ = rc.Flush()
			}
			return
		}
	}
}
