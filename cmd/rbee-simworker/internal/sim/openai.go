package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"
)

// openAIRoutes adds the two OpenAI routes llama-server and vLLM serve, so
// the hive's OpenAI paths can be tested against a fast, scriptable worker.
func (s *state) openAIRoutes(mux *http.ServeMux) {
	mux.Handle("POST /v1/chat/completions", s.auth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.openAI(w, r, true) })))
	mux.Handle("POST /v1/completions", s.auth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.openAI(w, r, false) })))
}

// oaiRequest is the part of an OpenAI request the simulator honours.
type oaiRequest struct {
	Model    string `json:"model"`
	Messages []struct {
		Role    string `json:"role"`
		Content any    `json:"content"`
	} `json:"messages"`
	Prompt        any     `json:"prompt"`
	MaxTokens     *int    `json:"max_tokens"`
	Stream        bool    `json:"stream"`
	Seed          *uint64 `json:"seed"`
	Stop          any     `json:"stop"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

type oaiUsage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func oaiError(w http.ResponseWriter, code int, typ, msg string) {
	writeJSON(w, code, map[string]any{"error": map[string]any{"code": code, "type": typ, "message": msg}})
}

// promptTokens counts words, a stand-in for a tokenizer.
func (q *oaiRequest) promptTokens() int {
	n := 0
	count := func(v any) {
		switch t := v.(type) {
		case string:
			n += len(strings.Fields(t))
		case []any:
			for _, e := range t {
				if s, ok := e.(string); ok {
					n += len(strings.Fields(s))
				}
			}
		}
	}
	for _, m := range q.Messages {
		count(m.Content)
	}
	count(q.Prompt)
	return n
}

func (q *oaiRequest) stops() []string {
	switch t := q.Stop.(type) {
	case string:
		return []string{t}
	case []any:
		var out []string
		for _, e := range t {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

func (s *state) openAI(w http.ResponseWriter, r *http.Request, chat bool) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20+1))
	if err != nil || len(body) > 1<<20 {
		oaiError(w, http.StatusBadRequest, "invalid_request_error", "request body unreadable or over 1 MiB")
		return
	}
	var q oaiRequest
	if err := json.Unmarshal(body, &q); err != nil {
		oaiError(w, http.StatusBadRequest, "invalid_request_error", "invalid JSON: "+err.Error())
		return
	}
	if chat && len(q.Messages) == 0 {
		oaiError(w, http.StatusBadRequest, "invalid_request_error", "messages must not be empty")
		return
	}
	if !chat && q.Prompt == nil {
		oaiError(w, http.StatusBadRequest, "invalid_request_error", "prompt is required")
		return
	}
	maxTokens := 16
	if q.MaxTokens != nil {
		maxTokens = *q.MaxTokens
	}
	if maxTokens < 0 || maxTokens > 1<<20 {
		oaiError(w, http.StatusBadRequest, "invalid_request_error", "max_tokens out of range")
		return
	}
	if !s.ready.Load() {
		oaiError(w, http.StatusServiceUnavailable, "unavailable_error", "Loading model")
		return
	}
	seed := uint64(42)
	if q.Seed != nil {
		seed = *q.Seed
	}
	s.active.Add(1)
	defer s.active.Add(-1)
	s.requests.Add(1)
	g := oaiGen{s: s, chat: chat, model: q.Model, id: fmt.Sprintf("cmpl-%016x", rand.Uint64()), created: time.Now().Unix(),
		usage: oaiUsage{PromptTokens: q.promptTokens()}}
	if g.model == "" {
		g.model = s.cfg.modelName()
	}
	if q.Stream {
		g.stream(r.Context(), w, maxTokens, seed, q.stops(), q.StreamOptions != nil && q.StreamOptions.IncludeUsage)
		return
	}
	text, finish, ok := g.generate(r.Context(), maxTokens, seed, q.stops(), nil)
	if !ok {
		return
	}
	choice := map[string]any{"index": 0, "finish_reason": finish}
	object := "text_completion"
	if chat {
		object = "chat.completion"
		choice["message"] = map[string]string{"role": "assistant", "content": text}
	} else {
		choice["text"] = text
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": g.id, "object": object, "created": g.created, "model": g.model,
		"choices": []any{choice}, "usage": g.usage})
}

type oaiGen struct {
	s       *state
	chat    bool
	model   string
	id      string
	created int64
	usage   oaiUsage
}

// generate produces up to maxTokens tokens at the configured pace, calling
// each (if set) per token; ok is false when ctx ended or the worker wedged
// or each failed.
func (g *oaiGen) generate(ctx context.Context, maxTokens int, seed uint64, stops []string, each func(string) bool) (string, string, bool) {
	text, _, matched, ok := g.s.tokens(ctx, time.Now(), maxTokens, seed, stops, func(_ int, tok string) bool {
		if each != nil && !each(tok) {
			return false
		}
		g.usage.CompletionTokens++
		return true
	})
	if !ok {
		return "", "", false
	}
	finish := "length"
	if matched {
		finish = "stop"
	}
	g.usage.TotalTokens = g.usage.PromptTokens + g.usage.CompletionTokens
	return text, finish, true
}

func (g *oaiGen) chunk(choices []any) map[string]any {
	object := "text_completion"
	if g.chat {
		object = "chat.completion.chunk"
	}
	return map[string]any{"id": g.id, "object": object, "created": g.created, "model": g.model, "choices": choices}
}

func (g *oaiGen) delta(content *string, finish *string) map[string]any {
	c := map[string]any{"index": 0, "finish_reason": finish}
	switch {
	case g.chat && content == nil:
		c["delta"] = map[string]string{}
	case g.chat:
		c["delta"] = map[string]string{"content": *content}
	case content == nil:
		c["text"] = ""
	default:
		c["text"] = *content
	}
	return g.chunk([]any{c})
}

// stream sends one SSE chunk per token, a final chunk with the finish
// reason, the usage chunk if asked, and [DONE], as llama-server does.
func (g *oaiGen) stream(ctx context.Context, w http.ResponseWriter, maxTokens int, seed uint64, stops []string, usage bool) {
	e := startSSE(w)
	send := e.send
	if g.chat {
		first := g.chunk([]any{map[string]any{"index": 0, "delta": map[string]string{"role": "assistant", "content": ""}, "finish_reason": nil}})
		if !send(first) {
			return
		}
	}
	_, finish, ok := g.generate(ctx, maxTokens, seed, stops, func(tok string) bool { return send(g.delta(&tok, nil)) })
	if !ok || !send(g.delta(nil, &finish)) {
		return
	}
	if usage {
		u := g.chunk([]any{})
		u["usage"] = g.usage
		if !send(u) {
			return
		}
	}
	e.done()
}
