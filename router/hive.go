// Package router is the host's OpenAI endpoint: it maps a request's "model"
// to a served model, picks a ready worker of it, starts one when none is
// (one load per model however many requests wait), holds requests in a
// bounded per-model queue meanwhile, makes room by stopping idle workers of
// other models when admission refuses, and stops idle workers after their
// ttl. It knows nothing of processes or cgroups: the hive implements Hive,
// and a Forwarder carries a request to the chosen worker.
package router

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/rbee/rbee-hive/config"
)

// State is a worker's state as the router needs it.
type State int

const (
	// StateOther is any state that neither serves nor will: stopping,
	// restarting, stale, failed. Such a worker counts toward nothing.
	StateOther State = iota
	// StateLoading workers will serve; they count toward max_workers. A
	// worker the hive is restarting is loading too: requests wait for it
	// rather than start another.
	StateLoading
	// StateReady workers serve requests.
	StateReady
)

func (s State) String() string {
	switch s {
	case StateLoading:
		return "loading"
	case StateReady:
		return "ready"
	}
	return "other"
}

// Worker is one worker of a served model, as the hive sees it now.
type Worker struct {
	ID    string
	URL   *url.URL // base URL; the OpenAI routes are appended to it
	State State
	// Slots is how many requests the worker serves at once (llama-server's
	// --parallel); 0 means 1.
	Slots int
	// InFlight is the hive's own count of requests on the worker; the
	// router takes the larger of it and its own count, so requests that
	// reach the worker through the hive's per-worker API are respected.
	InFlight int
}

// Hive is what the router needs from the hive. Implementations must be safe
// for concurrent use.
type Hive interface {
	// Workers lists the workers of the served model, in any state.
	Workers(ctx context.Context, served string) ([]Worker, error)
	// Spawn starts one worker of the served model (its config.Served
	// says model, backend, memory limit and context size) and returns
	// once it is ready, or the error that ended it. A refusal by
	// admission for lack of RAM or VRAM is (or wraps) a *NoRoomError.
	// ctx ending abandons the wait; the hive stops the worker then.
	Spawn(ctx context.Context, served string) (Worker, error)
	// Stop stops the worker and returns once it is gone.
	Stop(ctx context.Context, id string) error
}

// NoRoomError is admission's refusal for lack of memory: the router makes
// room by stopping idle workers of other models and tries again.
type NoRoomError struct {
	Resource string // "vram" or "ram"
	Detail   string // admission's own words, for the client
}

func (e *NoRoomError) Error() string {
	return fmt.Sprintf("not enough %s: %s", e.Resource, e.Detail)
}

// Target is the worker a request is forwarded to.
type Target struct {
	Served   string // served model name (a bounded label)
	Backend  string
	WorkerID string
	URL      *url.URL
}

// Forwarder carries an OpenAI request to a worker and its answer back to
// the client, streamed or not. r's body is the client's body, already read
// once (bounded) and replayable; route is "/v1/chat/completions" or
// "/v1/completions". It returns when the exchange is over. Failures after
// the first byte must end the stream with an error event: the client's
// status line is gone by then. The hive's OpenAI proxy fits it as
//
//	ForwarderFunc(func(w http.ResponseWriter, r *http.Request, t Target, route string) {
//		p.ServeOpenAI(w, r, t.URL, proxy.Route(route), proxy.Labels{Backend: t.Backend, Model: t.Served}, hooksFor(t.WorkerID))
//	})
type Forwarder interface {
	Forward(w http.ResponseWriter, r *http.Request, t Target, route string)
}

// ForwarderFunc adapts a function to Forwarder.
type ForwarderFunc func(w http.ResponseWriter, r *http.Request, t Target, route string)

// Forward calls f.
func (f ForwarderFunc) Forward(w http.ResponseWriter, r *http.Request, t Target, route string) {
	f(w, r, t, route)
}

// Model is one served model's settings, from config.Served.
type Model struct {
	Name        string
	Backend     string
	Autoload    bool
	TTL         time.Duration // 0: never
	Pinned      bool
	MaxWorkers  int
	Queue       int
	LoadTimeout time.Duration
}

// ModelsFromConfig turns the config's served tables into Models.
func ModelsFromConfig(cfg *config.Config) []Model {
	var out []Model
	for _, name := range cfg.ServedNames() {
		s := cfg.Served[name]
		out = append(out, Model{
			Name: name, Backend: s.Backend, Autoload: s.AutoloadOn(), TTL: s.TTL.D(), Pinned: s.Pinned,
			MaxWorkers: s.MaxWorkers, Queue: s.Queue, LoadTimeout: s.LoadTimeout.D(),
		})
	}
	return out
}

// Errors the router returns; the HTTP layer maps them (see status).
var (
	ErrUnknownModel = errors.New("model not found")
	ErrQueueFull    = errors.New("too many requests are waiting for this model")
	ErrLoadTimeout  = errors.New("no worker of this model became ready in time")
	ErrNotLoaded    = errors.New("model is not loaded and autoload is off")
)

// UnavailableError is a request the router cannot serve now; the client
// may retry after RetryAfter.
type UnavailableError struct {
	Model      string
	Code       string // queue_full, load_timeout, no_room, load_failed, model_not_loaded
	RetryAfter time.Duration
	Err        error
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("model %s unavailable (%s): %v", e.Model, e.Code, e.Err)
}

func (e *UnavailableError) Unwrap() error { return e.Err }
