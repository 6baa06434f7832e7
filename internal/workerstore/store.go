package workerstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// Options configure a Store.
type Options struct {
	// Path is the database file, normally <state_dir>/workers.db.
	Path string
	// CgroupRoot is the cgroup manager's Root(): every stored leaf must lie
	// below it.
	CgroupRoot string
	Logger     *slog.Logger // nil discards
	// MaxPending bounds the workers with an unwritten change (default 4096);
	// a change for one more worker is dropped and counted.
	MaxPending int
	// RetryAfter is the pause after a failed batch (default 1 s).
	RetryAfter time.Duration
}

// Stats are the writer's counters since Open.
type Stats struct {
	Enqueued  uint64 // Put/SetState/Delete calls accepted
	Coalesced uint64 // of those, replaced an unwritten change of the same worker
	Dropped   uint64 // refused: the queue was full
	Batches   uint64 // transactions committed
	Written   uint64 // rows written or deleted
	Failures  uint64 // batches that failed (retried later)
}

type opKind uint8

const (
	opPut    opKind = iota + 1
	opUpdate        // state and/or output offsets of an existing row
	opDelete
)

type op struct {
	kind  opKind
	w     Worker // opPut
	state string // opUpdate: "" = unchanged
	// opUpdate: output offsets, when hasOff
	hasOff         bool
	outOff, errOff int64
	at             int64 // unix ms of the change
}

// Store is the durable worker registry. Its methods are safe for concurrent use.
type Store struct {
	db    *sql.DB
	opts  Options
	log   *slog.Logger
	aside string

	mu        sync.Mutex
	pending   map[string]op
	spare     map[string]op // the writer's last batch, cleared, reused
	waiters   []chan error
	closed    bool
	fullSince bool // a drop was logged for the current full episode

	wake chan struct{}
	stop chan struct{}
	done chan struct{}

	enqueued, coalesced, dropped, batches, written, failures atomic.Uint64
}

// ErrClosed is returned by calls after Close.
var ErrClosed = errors.New("workerstore: closed")

// Open opens (or creates) the registry and starts its writer. A file that is
// not a readable database of this schema (garbage, corruption, a newer or
// tampered schema) is moved aside with a log line and a fresh one is created:
// losing the registry costs adoption, never the hive's start. Only an
// unusable state directory is an error.
func Open(opts Options) (*Store, error) {
	if opts.Path == "" {
		return nil, errors.New("workerstore: no database path")
	}
	if opts.MaxPending <= 0 {
		opts.MaxPending = 4096
	}
	if opts.RetryAfter <= 0 {
		opts.RetryAfter = time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	db, err := openDB(opts.Path)
	aside := ""
	if err != nil {
		if !recoverable(err) {
			return nil, err
		}
		aside, err = moveAside(opts.Path)
		if err != nil {
			return nil, fmt.Errorf("workerstore: move unusable database aside: %w", err)
		}
		log.Error("worker registry unusable, moved aside; persisted workers will not be adopted",
			"path", opts.Path, "moved_to", aside, "err", err)
		if db, err = openDB(opts.Path); err != nil {
			return nil, err
		}
	}
	s := &Store{db: db, opts: opts, log: log, aside: aside,
		pending: make(map[string]op), spare: make(map[string]op),
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	return s, nil
}

// MovedAside is where Open moved an unusable database, or "".
func (s *Store) MovedAside() string { return s.aside }

// errUnusable marks a database whose content, not its directory, is wrong.
var errUnusable = errors.New("unusable database")

func recoverable(err error) bool {
	if errors.Is(err, errUnusable) {
		return true
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff {
		case sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_FORMAT, sqlite3.SQLITE_SCHEMA:
			return true
		}
	}
	return false
}

func openDB(path string) (*sql.DB, error) {
	// Create the file 0600 before SQLite does: SQLite gives its -wal and -shm
	// files the main file's mode, and the registry holds token hashes.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("workerstore: create %s: %w", path, err)
	}
	err = f.Chmod(0o600)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("workerstore: chmod %s: %w", path, err)
	}
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("workerstore: open %s: %w", path, err)
	}
	if err := check(db); err != nil {
		db.Close()
		return nil, fmt.Errorf("workerstore: %s: %w", path, err)
	}
	return db, nil
}

// check validates the file, then migrates it to the current schema.
func check(db *sql.DB) error {
	var res string
	if err := db.QueryRow(`PRAGMA quick_check`).Scan(&res); err != nil {
		return fmt.Errorf("quick_check: %w", err)
	}
	if res != "ok" {
		return fmt.Errorf("%w: quick_check: %s", errUnusable, res)
	}
	if err := migrate(db, migrations); err != nil {
		return err
	}
	return checkColumns(db)
}

func moveAside(path string) (string, error) {
	dst := path + ".corrupt-" + time.Now().UTC().Format("20060102T150405.000000000Z")
	if err := os.Rename(path, dst); err != nil {
		return "", err
	}
	for _, sfx := range []string{"-wal", "-shm"} {
		if err := os.Rename(path+sfx, dst+sfx); err != nil && !errors.Is(err, os.ErrNotExist) {
			return dst, err
		}
	}
	return dst, nil
}

// Put records w's full spec and state (latest call per id wins).
func (s *Store) Put(w Worker) error {
	if err := w.validate(s.opts.CgroupRoot); err != nil {
		return err
	}
	return s.enqueue(w.ID, op{kind: opPut, w: w, at: time.Now().UnixMilli()})
}

// SetState records a state change. It is the hot-path call: it only
// updates the worker's pending change and wakes the writer.
func (s *Store) SetState(id, state string) error {
	if !ValidState(state) {
		return fmt.Errorf("%w: worker %q: unknown state %q", ErrInvalid, id, state)
	}
	return s.enqueue(id, op{kind: opUpdate, state: state, at: time.Now().UnixMilli()})
}

// SetOutputOffsets records how far the hive has shipped the worker's stdout
// and stderr files, so that a restarted hive resumes there. Like SetState it
// only enqueues.
func (s *Store) SetOutputOffsets(id string, stdout, stderr int64) error {
	if stdout < 0 || stderr < 0 {
		return fmt.Errorf("%w: worker %q: negative output offset", ErrInvalid, id)
	}
	return s.enqueue(id, op{kind: opUpdate, hasOff: true, outOff: stdout, errOff: stderr, at: time.Now().UnixMilli()})
}

// Delete removes the worker's row.
func (s *Store) Delete(id string) error {
	return s.enqueue(id, op{kind: opDelete, at: time.Now().UnixMilli()})
}

func (s *Store) enqueue(id string, o op) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	prev, had := s.pending[id]
	if !had && len(s.pending) >= s.opts.MaxPending {
		first := !s.fullSince
		s.fullSince = true
		s.mu.Unlock()
		s.dropped.Add(1)
		if first {
			s.log.Error("worker registry queue full, dropping changes", "max_pending", s.opts.MaxPending, "worker_id", id)
		}
		return nil
	}
	if had {
		s.coalesced.Add(1)
		o = merge(prev, o)
	}
	s.pending[id] = o
	s.mu.Unlock()
	s.enqueued.Add(1)
	select {
	case s.wake <- struct{}{}:
	default:
	}
	return nil
}

// merge folds next into an unwritten prev: an update applies to a pending
// full record or combines with a pending update; a delete or a full record
// replaces everything.
func merge(prev, next op) op {
	if next.kind != opUpdate {
		return next
	}
	switch prev.kind {
	case opPut:
		if next.state != "" {
			prev.w.State = next.state
		}
		if next.hasOff {
			prev.w.StdoutOffset, prev.w.StderrOffset = next.outOff, next.errOff
		}
		prev.at = next.at
		return prev
	case opDelete:
		return prev
	}
	if next.state == "" {
		next.state = prev.state
	}
	if !next.hasOff {
		next.hasOff, next.outOff, next.errOff = prev.hasOff, prev.outOff, prev.errOff
	}
	return next
}

// Flush waits until every change enqueued before the call is committed, or
// ctx ends. It returns the error of the batch that carried them.
func (s *Store) Flush(ctx context.Context) error {
	ch := make(chan error, 1)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.waiters = append(s.waiters, ch)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return fmt.Errorf("workerstore: flush: %w", ctx.Err())
	}
}

// Close flushes (bounded by ctx), stops the writer and closes the database.
func (s *Store) Close(ctx context.Context) error {
	ferr := s.Flush(ctx)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.closed = true
	s.mu.Unlock()
	close(s.stop)
	<-s.done
	return errors.Join(ferr, s.db.Close())
}

// Stats returns the writer's counters.
func (s *Store) Stats() Stats {
	return Stats{Enqueued: s.enqueued.Load(), Coalesced: s.coalesced.Load(), Dropped: s.dropped.Load(),
		Batches: s.batches.Load(), Written: s.written.Load(), Failures: s.failures.Load()}
}

// run is the writer: one transaction per wake-up with the latest change of
// every worker that changed since the last one.
func (s *Store) run() {
	defer close(s.done)
	for {
		select {
		case <-s.wake:
		case <-s.stop:
			return
		}
		s.mu.Lock()
		batch, waiters := s.pending, s.waiters
		s.pending, s.spare, s.waiters = s.spare, batch, nil
		s.fullSince = false
		s.mu.Unlock()
		err := s.write(batch)
		if err != nil {
			s.failures.Add(1)
			s.log.Error("worker registry write failed, retrying", "workers", len(batch), "err", err)
			s.requeue(batch)
		}
		clear(batch)
		for _, w := range waiters {
			w <- err
		}
		if err != nil {
			select {
			case <-time.After(s.opts.RetryAfter):
				select {
				case s.wake <- struct{}{}:
				default:
				}
			case <-s.stop:
				return
			}
		}
	}
}

// requeue puts a failed batch back, except where a newer change arrived.
func (s *Store) requeue(batch map[string]op) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, o := range batch {
		if next, ok := s.pending[id]; ok {
			s.pending[id] = merge(o, next)
			continue
		}
		s.pending[id] = o
	}
}

const cols = `id, backend, model, argv, uid, port, url, cgroup_path, pid, pid_start,
	restart_policy, restart_count, failures, memory_limit, vram_claim, gpu, token_hash,
	state, adopted_at_ms, created_at_ms, updated_at_ms, stdout_offset, stderr_offset`

func (s *Store) write(batch map[string]op) error {
	if len(batch) == 0 {
		return nil
	}
	ctx := context.Background()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("workerstore: begin: %w", err)
	}
	defer tx.Rollback()
	for id, o := range batch {
		switch o.kind {
		case opPut:
			w := &o.w
			argv, err := json.Marshal(w.Argv)
			if err != nil {
				return fmt.Errorf("workerstore: worker %s argv: %w", id, err)
			}
			fails := make([]int64, len(w.Failures))
			for i, t := range w.Failures {
				fails[i] = t.UnixMilli()
			}
			failures, err := json.Marshal(fails)
			if err != nil {
				return fmt.Errorf("workerstore: worker %s failures: %w", id, err)
			}
			_, err = tx.ExecContext(ctx, `INSERT OR REPLACE INTO workers (`+cols+`)
				VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)`,
				w.ID, w.Backend, w.Model, string(argv), w.UID, w.Port, w.URL, w.CgroupPath, w.PID, int64(w.PIDStart),
				w.RestartPolicy, w.RestartCount, string(failures), w.MemoryLimit, w.VRAMClaim, w.GPU, w.TokenHash,
				w.State, unixMilli(w.AdoptedAt), unixMilli(w.CreatedAt), o.at, w.StdoutOffset, w.StderrOffset)
			if err != nil {
				return fmt.Errorf("workerstore: put %s: %w", id, err)
			}
		case opUpdate:
			var state, outOff, errOff any // nil keeps the column
			if o.state != "" {
				state = o.state
			}
			if o.hasOff {
				outOff, errOff = o.outOff, o.errOff
			}
			if _, err := tx.ExecContext(ctx, `UPDATE workers SET state = COALESCE(?, state),
				stdout_offset = COALESCE(?, stdout_offset), stderr_offset = COALESCE(?, stderr_offset),
				updated_at_ms = ? WHERE id = ?`, state, outOff, errOff, o.at, id); err != nil {
				return fmt.Errorf("workerstore: update %s: %w", id, err)
			}
		case opDelete:
			if _, err := tx.ExecContext(ctx, `DELETE FROM workers WHERE id = ?`, id); err != nil {
				return fmt.Errorf("workerstore: delete %s: %w", id, err)
			}
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("workerstore: commit: %w", err)
	}
	s.batches.Add(1)
	s.written.Add(uint64(len(batch)))
	return nil
}

func unixMilli(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func fromMilli(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}
