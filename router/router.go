package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Options tune a Router; the zero value is usable.
type Options struct {
	// Registry receives the router's metrics; nil: a private registry.
	Registry prometheus.Registerer
	// Logger gets one line per load, unload and refusal; nil discards.
	Logger *slog.Logger
	// MaxBodyBytes caps a request body (DefaultMaxBodyBytes if 0).
	MaxBodyBytes int64
	// StopTimeout bounds one Hive.Stop call (DefaultStopTimeout if 0).
	StopTimeout time.Duration
	// Poll is how often a waiting request looks at the hive's workers
	// again when what it waits for is not the router's own doing: a
	// worker loading or restarting under the hive, or slots held by
	// requests sent to a worker directly (DefaultPoll if 0).
	Poll time.Duration
}

// Defaults for Options' zero values.
const (
	DefaultMaxBodyBytes = 1 << 20
	DefaultStopTimeout  = time.Minute
	DefaultPoll         = 100 * time.Millisecond
)

// Load and unload reasons, the values of the metrics' reason label.
const (
	ReasonRequest = "request" // a request found no ready worker
	ReasonManual  = "manual"  // POST .../load or .../unload, or Load/Unload
	ReasonTTL     = "ttl"     // idle longer than the model's ttl
	ReasonEvicted = "evicted" // stopped to make room for another model
)

// Router routes requests by served model. It is safe for concurrent use.
type Router struct {
	hive   Hive
	fwd    Forwarder
	models map[string]*model
	names  []string
	log    *slog.Logger
	m      *metrics
	opts   Options

	// base ends loads still in flight when the router is closed.
	base   context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	tracked map[string]*tracked // worker id → the router's view of it
}

// model is a served model and its mutable routing state (under Router.mu).
type model struct {
	Model
	waiting int           // requests in the queue
	load    *load         // the load in flight, if any
	changed chan struct{} // closed and replaced whenever a waiter may proceed
}

// tracked is what the router knows of a worker beyond the hive's list.
type tracked struct {
	served   string
	inFlight int
	lastUsed time.Time
	auto     bool // started on demand: ttl and eviction apply
	stopping bool // chosen for unload: no new requests
	// asideUntil: the worker could not be reached; no requests until then
	// (or until the hive lists it in another state)
	asideUntil time.Time
}

// asideFor is how long an unreachable worker gets no requests while the
// hive notices its exit.
const asideFor = 2 * time.Second

// setAside keeps requests off worker id for a while: it could not be
// reached, and the hive may not have seen its exit yet.
func (r *Router) setAside(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if t := r.tracked[id]; t != nil {
		t.asideUntil = time.Now().Add(asideFor)
	}
}

// load is one spawn in flight; waiters share it.
type load struct {
	done chan struct{}
	w    Worker
	err  error
}

// New builds a Router over hive for the given served models; fwd carries
// requests to workers.
func New(hive Hive, fwd Forwarder, models []Model, opts Options) (*Router, error) {
	if hive == nil || fwd == nil {
		return nil, errors.New("router: hive and forwarder are required")
	}
	if opts.Registry == nil {
		opts.Registry = prometheus.NewRegistry()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = DefaultStopTimeout
	}
	if opts.Poll <= 0 {
		opts.Poll = DefaultPoll
	}
	r := &Router{hive: hive, fwd: fwd, models: map[string]*model{}, log: opts.Logger, opts: opts, tracked: map[string]*tracked{}}
	for _, m := range models {
		if m.Name == "" || r.models[m.Name] != nil {
			return nil, fmt.Errorf("router: served model name %q empty or repeated", m.Name)
		}
		if m.MaxWorkers < 1 {
			m.MaxWorkers = 1
		}
		if m.LoadTimeout <= 0 {
			m.LoadTimeout = 10 * time.Minute
		}
		r.models[m.Name] = &model{Model: m, changed: make(chan struct{})}
		r.names = append(r.names, m.Name)
	}
	m, err := newMetrics(opts.Registry, r.names)
	if err != nil {
		return nil, err
	}
	r.m = m
	r.base, r.cancel = context.WithCancel(context.Background())
	return r, nil
}

// Close abandons loads in flight (the hive stops their workers). Workers
// already running are left to the hive.
func (r *Router) Close() { r.cancel() }

// Models returns the served models' settings, in name order.
func (r *Router) Models() []Model {
	out := make([]Model, 0, len(r.names))
	for _, n := range r.names {
		out = append(out, r.models[n].Model)
	}
	return out
}

// broadcast wakes every waiter of m. Caller holds r.mu.
func (m *model) broadcast() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// Lease is a request's hold on a worker; Release it when the request ends.
type Lease struct {
	Target Target
	r      *Router
	once   sync.Once
}

// Release returns the worker's slot and marks it used now.
func (l *Lease) Release() {
	l.once.Do(func() {
		r := l.r
		r.mu.Lock()
		defer r.mu.Unlock()
		if t := r.tracked[l.Target.WorkerID]; t != nil {
			t.inFlight--
			t.lastUsed = time.Now()
		}
		r.models[l.Target.Served].broadcast()
	})
}

// used is how many requests w has: the larger of the hive's and ours.
func (r *Router) used(w Worker) int {
	n := w.InFlight
	if t := r.tracked[w.ID]; t != nil && t.inFlight > n {
		n = t.inFlight
	}
	return n
}

// pick returns the ready worker with the fewest requests in flight that has
// a free slot. Caller holds r.mu.
func (r *Router) pick(ws []Worker) (Worker, bool) {
	best, found, bestUsed := Worker{}, false, 0
	for _, w := range ws {
		if w.State != StateReady || w.URL == nil {
			continue
		}
		if t := r.tracked[w.ID]; t != nil && (t.stopping || time.Now().Before(t.asideUntil)) {
			continue
		}
		u := r.used(w)
		if u >= max(w.Slots, 1) {
			continue
		}
		if !found || u < bestUsed {
			best, found, bestUsed = w, true, u
		}
	}
	return best, found
}

// track returns the router's record of worker id, creating it.
func (r *Router) track(id, served string) *tracked {
	t := r.tracked[id]
	if t == nil {
		t = &tracked{served: served, lastUsed: time.Now()}
		r.tracked[id] = t
	}
	return t
}

// prune forgets workers of served that the hive no longer lists.
func (r *Router) prune(served string, ws []Worker) {
	live := make(map[string]bool, len(ws))
	for _, w := range ws {
		live[w.ID] = true
	}
	for id, t := range r.tracked {
		if t.served == served && !live[id] && t.inFlight <= 0 && !t.stopping {
			delete(r.tracked, id)
		}
	}
}

// Acquire returns a lease on a ready worker of the served model, loading
// one if needed and allowed, and waiting in the model's queue meanwhile.
func (r *Router) Acquire(ctx context.Context, name string) (*Lease, error) {
	m := r.models[name]
	if m == nil {
		return nil, ErrUnknownModel
	}
	start := time.Now()
	queued := false
	defer func() {
		if queued {
			r.mu.Lock()
			m.waiting--
			r.m.queueLen.WithLabelValues(name).Set(float64(m.waiting))
			r.mu.Unlock()
		}
	}()
	var deadline <-chan time.Time
	for {
		ws, err := r.hive.Workers(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("router: list workers of %s: %w", name, err)
		}
		r.mu.Lock()
		r.prune(name, ws)
		if w, ok := r.pick(ws); ok {
			t := r.track(w.ID, name)
			t.inFlight++
			t.lastUsed = time.Now()
			r.mu.Unlock()
			r.m.queueWait.WithLabelValues(name).Observe(time.Since(start).Seconds())
			return &Lease{r: r, Target: Target{Served: name, Backend: m.Backend, WorkerID: w.ID, URL: w.URL}}, nil
		}
		live, ready := 0, 0
		for _, w := range ws {
			if t := r.tracked[w.ID]; t != nil && t.stopping {
				continue
			}
			switch w.State {
			case StateReady:
				live++
				ready++
			case StateLoading:
				live++
			}
		}
		if m.load == nil && live < m.MaxWorkers {
			if !m.Autoload {
				if live == 0 {
					r.mu.Unlock()
					return nil, r.unavailable(name, "model_not_loaded", 30*time.Second, ErrNotLoaded)
				}
			} else {
				r.startLoad(m, ReasonRequest)
			}
		}
		if !queued {
			if m.waiting >= m.Queue {
				r.mu.Unlock()
				return nil, r.unavailable(name, "queue_full", time.Second, ErrQueueFull)
			}
			m.waiting++
			r.m.queueLen.WithLabelValues(name).Set(float64(m.waiting))
			queued = true
			t := time.NewTimer(m.LoadTimeout)
			defer t.Stop()
			deadline = t.C
		}
		ld, ch := m.load, m.changed
		r.mu.Unlock()
		var poll <-chan time.Time
		var pt *time.Timer
		if ld == nil {
			pt = time.NewTimer(r.opts.Poll)
			poll = pt.C
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline:
			return nil, r.unavailable(name, "load_timeout", 5*time.Second, ErrLoadTimeout)
		case <-ch:
		case <-poll:
		}
		if pt != nil {
			pt.Stop()
		}
		if ld != nil {
			select {
			case <-ld.done:
				if ld.err != nil {
					var ue *UnavailableError
					if errors.As(ld.err, &ue) {
						r.m.rejected.WithLabelValues(name, ue.Code).Inc()
					}
					return nil, ld.err
				}
			default:
			}
		}
	}
}

// failure is a load's outcome; each request that waited on it counts it.
func failure(name, code string, retry time.Duration, err error) error {
	return &UnavailableError{Model: name, Code: code, RetryAfter: retry, Err: err}
}

// unavailable is a refusal of one request, counted.
func (r *Router) unavailable(name, code string, retry time.Duration, err error) error {
	r.m.rejected.WithLabelValues(name, code).Inc()
	return &UnavailableError{Model: name, Code: code, RetryAfter: retry, Err: err}
}

// startLoad spawns one worker of m in the background; waiters learn of the
// result through m.changed. Caller holds r.mu and has checked m.load is nil.
func (r *Router) startLoad(m *model, reason string) *load {
	ld := &load{done: make(chan struct{})}
	m.load = ld
	go func() {
		ctx, cancel := context.WithTimeout(r.base, m.LoadTimeout)
		defer cancel()
		w, err := r.spawnWithRoom(ctx, m, reason)
		r.mu.Lock()
		defer r.mu.Unlock()
		if err == nil {
			t := r.track(w.ID, m.Name)
			t.auto = reason == ReasonRequest
			t.lastUsed = time.Now()
		}
		ld.w, ld.err = w, err
		m.load = nil
		close(ld.done)
		m.broadcast()
	}()
	return ld
}

// spawnWithRoom spawns a worker of m; when admission says there is no room
// it stops idle workers of other models, least recently used first, one at
// a time, until the spawn fits or nothing more can be freed.
func (r *Router) spawnWithRoom(ctx context.Context, m *model, reason string) (Worker, error) {
	for {
		t0 := time.Now()
		w, err := r.hive.Spawn(ctx, m.Name)
		if err == nil {
			r.m.coldStart.WithLabelValues(m.Name).Observe(time.Since(t0).Seconds())
			r.m.loads.WithLabelValues(m.Name, reason).Inc()
			r.log.Info("served model loaded", "model", m.Name, "worker_id", w.ID, "reason", reason, "ms", time.Since(t0).Milliseconds())
			return w, nil
		}
		var nr *NoRoomError
		if errors.As(err, &nr) && nr.Resource != "vram" && nr.Resource != "ram" {
			// Stopping workers frees neither disk nor anything else.
			return Worker{}, failure(m.Name, "no_room", 30*time.Second, err)
		}
		if nr == nil {
			if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return Worker{}, failure(m.Name, "load_timeout", 5*time.Second, fmt.Errorf("%w: %w", ErrLoadTimeout, err))
			}
			r.log.Warn("served model load failed", "model", m.Name, "err", err)
			return Worker{}, failure(m.Name, "load_failed", 10*time.Second, err)
		}
		victim, ok := r.victim(ctx, m.Name)
		if !ok && r.stopping() {
			// A worker on its way out (ttl, unload, another load's
			// eviction) still holds its memory: wait for it, then retry.
			select {
			case <-ctx.Done():
				return Worker{}, failure(m.Name, "load_timeout", 5*time.Second, fmt.Errorf("%w: %w", ErrLoadTimeout, err))
			case <-time.After(r.opts.Poll):
			}
			continue
		}
		if !ok {
			r.log.Warn("no room for served model", "model", m.Name, "err", nr)
			return Worker{}, failure(m.Name, "no_room", 30*time.Second, err)
		}
		r.log.Info("evicting idle worker", "model", victim.served, "worker_id", victim.id, "for", m.Name, "resource", nr.Resource)
		r.m.evictions.WithLabelValues(victim.served, nr.Resource).Inc()
		if err := r.stop(victim.id, victim.served, ReasonEvicted); err != nil {
			return Worker{}, failure(m.Name, "no_room", 30*time.Second, fmt.Errorf("evict %s: %w", victim.id, err))
		}
	}
}

// stopping reports whether any worker is being stopped by the router.
func (r *Router) stopping() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, t := range r.tracked {
		if t.stopping {
			return true
		}
	}
	return false
}

type victimRef struct{ id, served string }

// victim chooses the least recently used idle, unpinned worker started on
// demand, of a model other than except, and marks it stopping so no
// request is routed to it meanwhile. A worker with a request in flight, by
// the hive's count or ours, is never chosen.
func (r *Router) victim(ctx context.Context, except string) (victimRef, bool) {
	idle := map[string]bool{}
	for _, name := range r.names {
		if name == except || r.models[name].Pinned {
			continue
		}
		ws, err := r.hive.Workers(ctx, name)
		if err != nil {
			continue
		}
		for _, w := range ws {
			if w.State == StateReady && w.InFlight == 0 {
				idle[w.ID] = true
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var best victimRef
	var bestUsed time.Time
	for id, t := range r.tracked {
		if !idle[id] || !t.auto || t.stopping || t.inFlight > 0 {
			continue
		}
		if best.id == "" || t.lastUsed.Before(bestUsed) {
			best, bestUsed = victimRef{id, t.served}, t.lastUsed
		}
	}
	if best.id == "" {
		return best, false
	}
	r.tracked[best.id].stopping = true
	return best, true
}

// stop stops a worker marked stopping and forgets it.
func (r *Router) stop(id, served, reason string) error {
	ctx, cancel := context.WithTimeout(r.base, r.opts.StopTimeout)
	defer cancel()
	err := r.hive.Stop(ctx, id)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		if t := r.tracked[id]; t != nil {
			t.stopping = false
		}
		r.log.Warn("stopping worker failed", "model", served, "worker_id", id, "err", err)
		return err
	}
	delete(r.tracked, id)
	r.m.unloads.WithLabelValues(served, reason).Inc()
	r.log.Info("served model worker stopped", "model", served, "worker_id", id, "reason", reason)
	if m := r.models[served]; m != nil {
		m.broadcast()
	}
	return nil
}

// Load makes sure a worker of the model is ready, starting one if none is
// ready or loading, and exempts it from ttl and eviction until Unload: an
// operator warmed it. It waits at most the model's load_timeout.
func (r *Router) Load(ctx context.Context, name string) (Worker, error) {
	m := r.models[name]
	if m == nil {
		return Worker{}, ErrUnknownModel
	}
	ctx, cancel := context.WithTimeout(ctx, m.LoadTimeout)
	defer cancel()
	for {
		ws, err := r.hive.Workers(ctx, name)
		if err != nil {
			return Worker{}, fmt.Errorf("router: list workers of %s: %w", name, err)
		}
		r.mu.Lock()
		live := 0
		for _, w := range ws {
			t := r.tracked[w.ID]
			if t != nil && t.stopping {
				continue
			}
			switch w.State {
			case StateReady:
				r.track(w.ID, name).auto = false
				r.mu.Unlock()
				return w, nil
			case StateLoading:
				live++
			}
		}
		ld := m.load
		if ld == nil && live == 0 {
			ld = r.startLoad(m, ReasonManual)
		}
		r.mu.Unlock()
		var done <-chan struct{}
		var poll <-chan time.Time
		if ld == nil {
			poll = time.After(r.opts.Poll) // a worker loading under the hive
		} else {
			done = ld.done
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return Worker{}, failure(name, "load_timeout", 5*time.Second, ErrLoadTimeout)
			}
			return Worker{}, ctx.Err()
		case <-done:
		case <-poll:
		}
		if ld != nil && ld.err != nil {
			return Worker{}, ld.err
		}
	}
}

// Unload stops every worker of the model, busy or not (requests in flight
// on them end with an error), and returns how many it stopped.
func (r *Router) Unload(ctx context.Context, name string) (int, error) {
	if r.models[name] == nil {
		return 0, ErrUnknownModel
	}
	ws, err := r.hive.Workers(ctx, name)
	if err != nil {
		return 0, fmt.Errorf("router: list workers of %s: %w", name, err)
	}
	r.mu.Lock()
	var ids []string
	for _, w := range ws {
		if w.State == StateOther {
			continue
		}
		t := r.track(w.ID, name)
		if !t.stopping {
			t.stopping = true
			ids = append(ids, w.ID)
		}
	}
	r.mu.Unlock()
	var errs []error
	n := 0
	for _, id := range ids {
		if err := r.stop(id, name, ReasonManual); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// Run stops workers started on demand once they have been idle for their
// model's ttl, checking every interval (a quarter of the shortest ttl,
// within 100ms-30s, if 0), until ctx ends.
func (r *Router) Run(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = 30 * time.Second
		for _, n := range r.names {
			if ttl := r.models[n].TTL; ttl > 0 && ttl/4 < interval {
				interval = max(ttl/4, 100*time.Millisecond)
			}
		}
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			r.expire(ctx)
		}
	}
}

// expire stops the idle workers past their ttl.
func (r *Router) expire(ctx context.Context) {
	for _, name := range r.names {
		m := r.models[name]
		if m.TTL <= 0 {
			continue
		}
		ws, err := r.hive.Workers(ctx, name)
		if err != nil {
			r.log.Warn("ttl check: list workers failed", "model", name, "err", err)
			continue
		}
		now := time.Now()
		var ids []string
		r.mu.Lock()
		r.prune(name, ws)
		for _, w := range ws {
			t := r.tracked[w.ID]
			if t == nil || !t.auto || t.stopping || t.inFlight > 0 || w.InFlight > 0 || w.State != StateReady {
				continue
			}
			if now.Sub(t.lastUsed) >= m.TTL {
				t.stopping = true
				ids = append(ids, w.ID)
			}
		}
		r.mu.Unlock()
		for _, id := range ids {
			_ = r.stop(id, name, ReasonTTL)
		}
	}
}
