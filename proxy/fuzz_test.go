package proxy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"math"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// refCount is an independent reading of an SSE body with no overlong line:
// split into lines, join data lines per event, count token events and
// whether a [DONE] event came, stopping there as the proxy does.
func refCount(body []byte) (tokens int, done bool) {
	var data [][]byte
	flush := func() {
		if data == nil {
			return
		}
		ev := bytes.Join(data, []byte("\n"))
		data = nil
		if len(ev) > maxLine {
			return
		}
		if string(ev) == "[DONE]" {
			done = true
			return
		}
		var e struct {
			Type string `json:"type"`
		}
		if bytes.HasPrefix(ev, []byte(`{"type":"token",`)) || (json.Unmarshal(ev, &e) == nil && e.Type == "token") {
			tokens++
		}
	}
	lines := bytes.SplitAfter(body, []byte("\n"))
	for _, l := range lines {
		if !bytes.HasSuffix(l, []byte("\n")) {
			break // an unterminated tail is never parsed
		}
		l = bytes.TrimRight(l, "\r\n")
		if len(l) == 0 {
			flush()
			if done {
				return
			}
			continue
		}
		if v, ok := bytes.CutPrefix(l, []byte("data:")); ok {
			data = append(data, bytes.TrimPrefix(v, []byte(" ")))
		}
	}
	return
}

// FuzzStream feeds a worker's SSE body to the proxy's parser the way pump
// reads it (lines of at most maxLine through a bufio.Reader) and checks it
// against refCount, its bounded buffer, and the tokens/s it would export.
func FuzzStream(f *testing.F) {
	for _, s := range []string{
		"data: {\"type\":\"started\"}\n\ndata: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\ndata: {\"type\":\"end\",\"tokens_out\":1,\"decode_time_ms\":10}\n\ndata: [DONE]\n\n",
		"data: {\"type\":\"error\",\"code\":\"X\"}\n\ndata: [DONE]\n\n",
		"data: {\"type\":\n" + "data: \"token\"}\n\n",
		": comment\nevent: x\nid: 1\nretry: 5\ndata:[DONE]\r\n\r\n",
		"data: {\"type\":\"end\",\"tokens_out\":-1,\"decode_time_ms\":0}\n\n",
		"data: {\"type\":\"end\",\"tokens_out\":9223372036854775807,\"decode_time_ms\":1e-300}\n\n",
		"data: [DONE]",
		"\n\n\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		st := &stream{ttft: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "x"})}
		start := time.Unix(1000, 0)
		now := start
		br := bufio.NewReaderSize(bytes.NewReader(body), maxLine)
		overlong := false
		for {
			line, err := br.ReadSlice('\n')
			if len(line) > 0 {
				now = now.Add(time.Millisecond)
				if err != nil {
					overlong = true
				}
				if st.feed(line, err == nil, start, now) {
					break
				}
				if len(st.data) > maxLine {
					t.Fatalf("event buffer grew to %d bytes", len(st.data))
				}
			}
			if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
				if !errors.Is(err, io.EOF) {
					t.Fatal(err)
				}
				break
			}
		}
		if tps, ok := st.tokensPerSecond(); ok && (tps <= 0 || math.IsNaN(tps) || math.IsInf(tps, 0)) {
			t.Fatalf("tokens/s %v reported", tps)
		}
		if overlong {
			return // overlong lines are forwarded unparsed; refCount does not model that
		}
		tokens, done := refCount(body)
		if st.tokens != tokens || st.done != done {
			t.Fatalf("parser: %d tokens, done=%v; reference: %d tokens, done=%v", st.tokens, st.done, tokens, done)
		}
	})
}
