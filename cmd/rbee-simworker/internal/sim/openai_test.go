package sim

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestOpenAIRoutes(t *testing.T) {
	s := newState(Config{Model: "/m/tiny.gguf"})
	s.ready.Store(true)
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	post := func(path, body string) (*http.Response, string) {
		t.Helper()
		resp, err := http.Post(srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		buf := make([]byte, 4096)
		for {
			n, err := resp.Body.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
		}
		return resp, b.String()
	}
	tests := []struct {
		name, path, body string
		status           int
		want, wantNot    []string
	}{
		{"chat", "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"say three words"}],"max_tokens":3}`, 200,
			[]string{`"object":"chat.completion"`, `"role":"assistant"`, `"finish_reason":"length"`, `"prompt_tokens":3`, `"completion_tokens":3`, `"total_tokens":6`}, nil},
		{"chat stream with usage", "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true}}`, 200,
			[]string{`"object":"chat.completion.chunk"`, `"delta":{"content":`, `"finish_reason":"length"`, `"completion_tokens":4`, "data: [DONE]\n\n"}, nil},
		{"chat stream without usage", "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true}`, 200,
			[]string{"data: [DONE]"}, []string{`"usage"`}},
		{"completion", "/v1/completions", `{"model":"m","prompt":"one two","max_tokens":5}`, 200,
			[]string{`"object":"text_completion"`, `"text":`, `"completion_tokens":5`, `"prompt_tokens":2`}, nil},
		{"completion stream", "/v1/completions", `{"prompt":"x","max_tokens":2,"stream":true}`, 200,
			[]string{`"object":"text_completion"`, `"model":"/m/tiny.gguf"`, "data: [DONE]"}, nil},
		{"bad json", "/v1/chat/completions", `{`, 400, []string{"invalid_request_error"}, nil},
		{"no messages", "/v1/chat/completions", `{"model":"m"}`, 400, []string{"messages"}, nil},
		{"no prompt", "/v1/completions", `{"model":"m"}`, 400, []string{"prompt"}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := post(tc.path, tc.body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
			for _, w := range tc.want {
				if !strings.Contains(body, w) {
					t.Errorf("body lacks %q:\n%s", w, body)
				}
			}
			for _, w := range tc.wantNot {
				if strings.Contains(body, w) {
					t.Errorf("body has %q:\n%s", w, body)
				}
			}
			if strings.Contains(tc.body, `"stream":true`) {
				// Every event is one JSON object on a data: line.
				for _, ev := range strings.Split(strings.TrimSpace(body), "\n\n") {
					data, ok := strings.CutPrefix(ev, "data: ")
					if !ok || (data != "[DONE]" && !json.Valid([]byte(data))) {
						t.Errorf("bad event %q", ev)
					}
				}
			}
		})
	}
	s.ready.Store(false)
	if resp, body := post("/v1/completions", `{"prompt":"x"}`); resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("loading worker answered %d: %s", resp.StatusCode, body)
	}
}
