package model

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/admission"
	"github.com/rbee/rbee-hive/api"
)

// Defaults.
const (
	DefaultStallTimeout = 60 * time.Second
	// finishedRetention is how long a finished download still answers the
	// progress route, so a late subscriber gets the outcome, not a 404.
	finishedRetention = 5 * time.Minute
	keepAliveInterval = 10 * time.Second // the original's SSE keep-alive
	notifyInterval    = 200 * time.Millisecond
)

// Options configure a Store.
type Options struct {
	// Dir holds the model files (config model_dir). Required.
	Dir string
	// CatalogPath is the SQLite file; empty: <Dir>/catalog.db.
	CatalogPath string
	// Endpoint is the HuggingFace endpoint; empty: $HF_ENDPOINT, else
	// https://huggingface.co.
	Endpoint string
	// Token authenticates to the endpoint. Empty: read TokenFile if set,
	// else $HF_TOKEN. It is sent only to the endpoint's host, never logged.
	Token     string
	TokenFile string
	// DiskReserve is kept free on Dir's filesystem after a download.
	DiskReserve uint64
	// MaxBytes, when non-zero, caps the catalog: least recently used models
	// that no worker holds are deleted to stay under it.
	MaxBytes uint64
	// StallTimeout fails a download that receives nothing for this long;
	// zero: DefaultStallTimeout.
	StallTimeout time.Duration
	Logger       *slog.Logger
	// Registry receives the model metrics; nil: a private registry.
	Registry *prometheus.Registry
	// HTTPClient talks to the endpoint; nil: a default transport. Its
	// Timeout should be zero: downloads are bounded by StallTimeout.
	HTTPClient *http.Client
	// DiskChecker decides disk admission; nil: admission.CheckDisk.
	DiskChecker func(dir string, needBytes, reserveBytes uint64) error
}

// Result is the outcome of a download started by Ensure.
type Result struct {
	LocalPath string
	Err       error
}

// Store downloads models and keeps the catalog. Its methods are safe for
// concurrent use.
type Store struct {
	dir       string
	reserve   uint64
	maxBytes  uint64
	stall     time.Duration
	log       *slog.Logger
	hub       *hub
	cat       *catalog
	met       *metrics
	checkDisk func(dir string, need, reserve uint64) error
	keepAlive time.Duration

	// Downloads run on ctx, so Close stops them and waits (wg).
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	admitMu sync.Mutex // one admission at a time: two must not pass on the same free space

	mu       sync.Mutex
	closed   bool
	inflight map[string]*download     // by canonical ref
	byID     map[string]*download     // running and recently finished
	inUse    map[string]int           // canonical ref → holders
	files    map[string]chan struct{} // dest path → held while one download writes it
}

// lockFile gives the caller exclusive use of a destination file, waiting
// (cancellably) while another download writes it.
func (s *Store) lockFile(ctx context.Context, path string) (unlock func(), err error) {
	for {
		s.mu.Lock()
		held, busy := s.files[path]
		if !busy {
			ch := make(chan struct{})
			s.files[path] = ch
			s.mu.Unlock()
			return func() {
				s.mu.Lock()
				delete(s.files, path)
				s.mu.Unlock()
				close(ch)
			}, nil
		}
		s.mu.Unlock()
		select {
		case <-held:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// New opens (or creates) the catalog under opts and returns a Store.
func New(opts Options) (*Store, error) {
	if opts.Dir == "" {
		return nil, errors.New("model: Options.Dir is required")
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("model: dir: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("model: create %s: %w", dir, err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	endpoint := opts.Endpoint
	if endpoint == "" {
		endpoint = os.Getenv("HF_ENDPOINT")
	}
	if endpoint == "" {
		endpoint = DefaultEndpoint
	}
	token := opts.Token
	if token == "" && opts.TokenFile != "" {
		b, err := os.ReadFile(opts.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("model: HuggingFace token file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token == "" {
		token = os.Getenv("HF_TOKEN")
	}
	h, err := newHub(endpoint, token, opts.HTTPClient)
	if err != nil {
		return nil, err
	}
	stall := opts.StallTimeout
	if stall <= 0 {
		stall = DefaultStallTimeout
	}
	h.pageTimeout = stall // a listing page is a stall too
	reg := opts.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	met, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	catPath := opts.CatalogPath
	if catPath == "" {
		catPath = filepath.Join(dir, "catalog.db")
	}
	cat, err := openCatalog(catPath)
	if err != nil {
		return nil, err
	}
	check := opts.DiskChecker
	if check == nil {
		check = admission.CheckDisk
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Store{
		dir: dir, reserve: opts.DiskReserve, maxBytes: opts.MaxBytes, stall: stall,
		log: log, hub: h, cat: cat, met: met, checkDisk: check, keepAlive: keepAliveInterval,
		ctx: ctx, cancel: cancel,
		inflight: map[string]*download{}, byID: map[string]*download{}, inUse: map[string]int{}, files: map[string]chan struct{}{},
	}
	s.updateDiskGauge(ctx)
	attrs := []any{"dir", dir, "catalog", catPath, "endpoint", h.endpoint.Redacted(), "max_bytes", opts.MaxBytes, "stall_timeout", stall}
	if token != "" {
		attrs = append(attrs, "hf_token_fingerprint", api.Fingerprint(token))
	}
	log.Info("model store ready", attrs...)
	return s, nil
}

// Close cancels running downloads (their partial files stay for resume),
// waits for them and closes the catalog.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return s.cat.close()
}

// Ensure makes ref available locally. A file: ref or a model already in the
// catalog returns its path and a nil wait. Otherwise the repo is listed and
// disk admission runs before anything is written (failures, e.g. the 507
// INSUFFICIENT_DISK *api.Error, are returned here); then the download runs
// in the background and wait delivers its single Result. Concurrent calls
// for the same model share one download. ctx bounds only the listing.
func (s *Store) Ensure(ctx context.Context, ref string) (localPath string, wait <-chan Result, err error) {
	path, d, err := s.start(ctx, ref)
	if err != nil || d == nil {
		return path, nil, err
	}
	return "", d.subscribe(), nil
}

// Acquire marks ref in use until release is called: an in-use model is
// neither evicted nor deletable. Acquire before Ensure, so the model cannot
// be evicted between the two. release is idempotent.
func (s *Store) Acquire(ref string) (release func()) {
	key := canonical(ref)
	s.mu.Lock()
	s.inUse[key]++
	s.mu.Unlock()
	s.touchQuiet(key)
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if s.inUse[key]--; s.inUse[key] <= 0 {
				delete(s.inUse, key)
			}
			s.mu.Unlock()
			s.touchQuiet(key)
		})
	}
}

// canonical is ref's catalog key, or ref itself if it does not parse.
func canonical(ref string) string {
	if r, err := ParseRef(ref); err == nil {
		return r.String()
	}
	return ref
}

// Touch records that ref was used now (LRU order).
func (s *Store) Touch(ctx context.Context, ref string) error {
	return s.cat.touch(ctx, canonical(ref), time.Now())
}

func (s *Store) touchQuiet(key string) {
	if err := s.cat.touch(s.ctx, key, time.Now()); err != nil && s.ctx.Err() == nil {
		s.log.Warn("model catalog touch failed", "ref", key, "error", err)
	}
}

// List returns the catalog, least recently used first, with in-use counts.
func (s *Store) List(ctx context.Context) ([]Model, error) {
	ms, err := s.cat.list(ctx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	for i := range ms {
		ms[i].InUse = s.inUse[ms[i].Ref]
	}
	s.mu.Unlock()
	if ms == nil {
		ms = []Model{}
	}
	return ms, nil
}

// Delete removes a model from the catalog and its files from disk. It is
// refused with 409 while a worker holds the model or it is downloading, and
// 404 when it is not in the catalog.
func (s *Store) Delete(ctx context.Context, ref string) (Model, error) {
	r, err := ParseRef(ref)
	if err != nil {
		return Model{}, err
	}
	key := r.String()
	m, err := s.removeEntry(ctx, key)
	if err != nil {
		return Model{}, err
	}
	s.removeFiles(ctx, m)
	s.log.Info("model deleted", "ref", key, "bytes", m.SizeBytes)
	return m, nil
}

// removeEntry deletes the catalog row unless the model is held or
// downloading. The check and the delete happen under s.mu, so an Acquire
// cannot slip between them.
func (s *Store) removeEntry(ctx context.Context, key string) (Model, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.inUse[key]; n > 0 {
		return Model{}, api.Errorf(http.StatusConflict, api.CodeConflict, "model %s is in use by %d worker(s)", key, n).
			WithDetails(map[string]any{"ref": key, "in_use": n})
	}
	if s.inflight[key] != nil {
		return Model{}, api.Errorf(http.StatusConflict, api.CodeConflict, "model %s is downloading", key).
			WithDetails(map[string]any{"ref": key})
	}
	m, ok, err := s.cat.get(ctx, key)
	if err != nil {
		return Model{}, err
	}
	if !ok {
		return Model{}, api.Errorf(http.StatusNotFound, api.CodeNotFound, "model %s is not in the catalog", key).
			WithDetails(map[string]any{"ref": key})
	}
	if _, err := s.cat.remove(ctx, key); err != nil {
		return Model{}, err
	}
	return m, nil
}

// removeFiles deletes m's files except those another catalog entry also
// lists (hf:a/b and hf:a/b:x.gguf can name the same file), then empty dirs.
func (s *Store) removeFiles(ctx context.Context, m Model) {
	defer s.updateDiskGauge(ctx)
	if m.Provider != ProviderHF {
		return
	}
	keep := map[string]bool{}
	others, err := s.cat.list(ctx)
	if err != nil {
		s.log.Warn("model delete: cannot list catalog; keeping files", "ref", m.Ref, "error", err)
		return
	}
	for _, o := range others {
		base := s.baseDir(Ref{Provider: o.Provider, Repo: o.Repo, Revision: o.Revision})
		for _, f := range o.Files {
			keep[filepath.Join(base, f.Path)] = true
		}
	}
	// Files a running download is about to fetch or has verified stay too.
	s.mu.Lock()
	for _, d := range s.inflight {
		select {
		case <-d.resolved:
			for _, f := range d.sel.files {
				keep[filepath.Join(d.base, f.Path)] = true
			}
		default:
		}
	}
	s.mu.Unlock()
	base := s.baseDir(Ref{Provider: m.Provider, Repo: m.Repo, Revision: m.Revision})
	for _, f := range m.Files {
		p := filepath.Join(base, f.Path)
		if keep[p] {
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("model delete: cannot remove file", "path", p, "error", err)
		}
		s.pruneDirs(filepath.Dir(p))
	}
}

// pruneDirs removes empty directories from dir up to (excluding) s.dir.
func (s *Store) pruneDirs(dir string) {
	for strings.HasPrefix(dir, s.dir+string(filepath.Separator)) {
		if os.Remove(dir) != nil {
			return
		}
		dir = filepath.Dir(dir)
	}
}

// baseDir is where a repo revision's files live:
// <Dir>/hf/<org>/<name>/<revision, path-escaped>/.
func (s *Store) baseDir(r Ref) string {
	return filepath.Join(s.dir, "hf", filepath.FromSlash(r.Repo), url.PathEscape(r.Revision))
}

func (s *Store) updateDiskGauge(ctx context.Context) {
	if n, err := s.cat.totalBytes(ctx); err == nil {
		s.met.diskBytes.Set(float64(n))
	}
}

// start is Ensure's core, shared with the HTTP handler: it returns a local
// path (present) or the running download.
func (s *Store) start(ctx context.Context, refStr string) (string, *download, error) {
	ref, err := ParseRef(refStr)
	if err != nil {
		return "", nil, err
	}
	if ref.Provider == ProviderFile {
		return statLocal(ref.Path)
	}
	for {
		path, d, err := s.startHF(ctx, ref)
		if !errors.Is(err, errCallerGone) {
			return path, d, err
		}
		// The caller we joined left while listing; list on our own ctx.
	}
}

// errCallerGone is what joiners of a listing get when the caller that ran
// it went away: not a failure of the model, so they try again themselves.
var errCallerGone = errors.New("model: the caller listing the repo went away")

func (s *Store) startHF(ctx context.Context, ref Ref) (string, *download, error) {
	key := ref.String()
	if p, ok, err := s.present(ctx, key); err != nil || ok {
		return p, nil, err
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return "", nil, api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "model store is shutting down")
	}
	if d := s.inflight[key]; d != nil {
		s.mu.Unlock()
		select {
		case <-d.resolved:
		case <-ctx.Done():
			return "", nil, fmt.Errorf("model: waiting for %s: %w", key, ctx.Err())
		}
		if d.callerGone {
			return "", nil, errCallerGone
		}
		if d.resolveErr != nil || d.presentPath != "" {
			return d.presentPath, nil, d.resolveErr
		}
		return "", d, nil
	}
	d := newDownload(ref)
	s.inflight[key] = d
	s.mu.Unlock()

	// A download that finished between present() and the insert above.
	if p, ok, err := s.present(ctx, key); err != nil || ok {
		d.presentPath = p
		s.abandon(d, err)
		return p, nil, err
	}
	if err := s.resolve(ctx, d); err != nil {
		if ctx.Err() != nil {
			// A caller that went away is not a failed download, and must
			// not fail the callers that joined it.
			d.callerGone = true
			s.abandon(d, err)
			return "", nil, err
		}
		s.met.failures.WithLabelValues(reasonOf(err)).Inc()
		s.log.Warn("model download refused", "ref", key, "reason", reasonOf(err), "error", err)
		s.abandon(d, err)
		return "", nil, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		err := api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "model store is shutting down")
		s.abandon(d, err)
		return "", nil, err
	}
	s.byID[d.id] = d
	s.wg.Add(1)
	s.mu.Unlock()
	close(d.resolved)
	s.log.Info("model download started", "ref", key, "download_id", d.id, "bytes_total", d.total, "files", len(d.sel.files))
	go s.run(d)
	return "", d, nil
}

// abandon ends a download that never started; joiners get err, or
// d.presentPath when the model turned out to be present.
func (s *Store) abandon(d *download, err error) {
	s.mu.Lock()
	delete(s.inflight, d.ref.String())
	s.mu.Unlock()
	d.resolveErr = err
	close(d.resolved)
}

// present returns the catalog path of key when its files are still there;
// a row whose files vanished is dropped so the model downloads again.
func (s *Store) present(ctx context.Context, key string) (string, bool, error) {
	m, ok, err := s.cat.get(ctx, key)
	if err != nil || !ok {
		return "", false, err
	}
	if err := s.checkFiles(m); err != nil {
		s.log.Warn("model in catalog but missing on disk; downloading again", "ref", key, "path", m.LocalPath, "error", err)
		if _, err := s.cat.remove(ctx, key); err != nil {
			return "", false, err
		}
		return "", false, nil
	}
	return m.LocalPath, true, nil
}

// checkFiles stats every file of m (sizes included): someone may have
// deleted or truncated files under the model dir by hand.
func (s *Store) checkFiles(m Model) error {
	if _, err := os.Stat(m.LocalPath); err != nil {
		return err
	}
	base := s.baseDir(Ref{Provider: m.Provider, Repo: m.Repo, Revision: m.Revision})
	for _, f := range m.Files {
		p := filepath.Join(base, filepath.FromSlash(f.Path))
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		if uint64(st.Size()) != f.Size {
			return fmt.Errorf("%s is %d bytes, catalog says %d", p, st.Size(), f.Size)
		}
	}
	return nil
}

func statLocal(p string) (string, *download, error) {
	st, err := os.Stat(p)
	if err != nil {
		return "", nil, api.Errorf(http.StatusNotFound, api.CodeNotFound, "model path %s: %v", p, errors.Unwrap(err)).
			WithDetails(map[string]any{"path": p})
	}
	if !st.Mode().IsRegular() && !st.IsDir() {
		return "", nil, api.Errorf(http.StatusBadRequest, api.CodeValidation, "Invalid model_ref: %s is neither a regular file nor a directory", p).
			WithDetails(map[string]any{"field": "model_ref", "path": p})
	}
	return p, nil, nil
}

// resolve lists the repo, picks the files, makes room under MaxBytes and
// runs disk admission. Nothing is written before it succeeds.
func (s *Store) resolve(ctx context.Context, d *download) error {
	all, err := s.hub.listFiles(ctx, d.ref)
	if err != nil {
		return err
	}
	sel, err := selectFiles(d.ref, all)
	if err != nil {
		return err
	}
	d.sel = sel
	d.base = s.baseDir(d.ref)
	var have uint64
	for _, f := range sel.files {
		have += existingBytes(filepath.Join(d.base, f.Path), f.Size)
	}
	need := sel.total - have
	s.enforceRetention(ctx, sel.total, d.ref.String())

	s.admitMu.Lock()
	defer s.admitMu.Unlock()
	// Bytes that other running downloads are still going to write count
	// against the free space too.
	var others uint64
	s.mu.Lock()
	for _, o := range s.inflight {
		if o != d {
			others += o.remaining()
		}
	}
	s.mu.Unlock()
	if err := s.checkDisk(s.dir, need, s.reserve+others); err != nil {
		var ae *api.Error
		if errors.As(err, &ae) {
			return fail(ReasonDisk, err)
		}
		return fail(ReasonInternal, err)
	}
	d.setTotals(have, sel.total)
	return nil
}

// enforceRetention deletes least-recently-used models that nobody holds
// until the catalog plus incoming bytes fit MaxBytes.
func (s *Store) enforceRetention(ctx context.Context, incoming uint64, exclude string) {
	if s.maxBytes == 0 {
		return
	}
	ms, err := s.cat.list(ctx)
	if err != nil {
		s.log.Warn("model retention: cannot list catalog", "error", err)
		return
	}
	var total uint64
	for _, m := range ms {
		if m.Ref != exclude {
			total += m.SizeBytes
		}
	}
	for _, m := range ms { // least recently used first
		if total+incoming <= s.maxBytes {
			return
		}
		if m.Ref == exclude {
			continue
		}
		gone, err := s.removeEntry(ctx, m.Ref)
		if err != nil {
			continue // in use or downloading: never evicted
		}
		s.removeFiles(ctx, gone)
		total -= gone.SizeBytes
		s.met.evictions.Inc()
		s.log.Info("model evicted", "ref", gone.Ref, "bytes", gone.SizeBytes,
			"last_used", time.UnixMilli(gone.lastUsedMS).UTC().Format(time.RFC3339), "max_bytes", s.maxBytes)
	}
	if total+incoming > s.maxBytes {
		s.log.Warn("model retention: cannot get under max_bytes; the rest is in use",
			"catalog_bytes", total, "incoming_bytes", incoming, "max_bytes", s.maxBytes)
	}
}

// run downloads d's files, registers the model and reports the result.
func (s *Store) run(d *download) {
	defer s.wg.Done()
	s.met.inFlight.Inc()
	defer s.met.inFlight.Dec()
	key := d.ref.String()
	start := time.Now()

	path, err := s.fetchAll(d)
	if err != nil {
		if s.ctx.Err() != nil {
			err = api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "download of %s canceled: the hive is shutting down (it resumes on the next request)", key)
			s.log.Info("model download canceled", "ref", key)
		} else {
			s.met.failures.WithLabelValues(reasonOf(err)).Inc()
			s.log.Error("model download failed", "ref", key, "download_id", d.id, "reason", reasonOf(err), "error", err)
		}
	} else {
		s.log.Info("model downloaded", "ref", key, "download_id", d.id, "path", path,
			"bytes", d.total, "duration", time.Since(start).Round(time.Millisecond))
	}

	s.mu.Lock()
	delete(s.inflight, key)
	s.mu.Unlock()
	if err == nil {
		s.enforceRetention(s.ctx, 0, key)
	}
	s.updateDiskGauge(s.ctx)
	// Last, so a waiter sees retention and metrics already settled.
	d.finish(Result{LocalPath: path, Err: err})
	time.AfterFunc(finishedRetention, func() {
		s.mu.Lock()
		delete(s.byID, d.id)
		s.mu.Unlock()
	})
}

func (s *Store) fetchAll(d *download) (string, error) {
	files := make([]ModelFile, 0, len(d.sel.files))
	var done uint64
	var mainSHA string
	for _, f := range d.sel.files {
		job := &fetchJob{
			hub: s.hub, ref: d.ref, file: f, dest: filepath.Join(d.base, f.Path), stall: s.stall,
			progress: func(have uint64, received int) {
				if received > 0 {
					s.met.bytes.Add(float64(received))
				}
				d.progress(done+have, received)
			},
			log: func(msg string, args ...any) { s.log.Info(msg, append(args, "ref", d.ref.String())...) },
		}
		// Two refs can name the same file (hf:a/b and hf:a/b:x.gguf): one
		// writer per file; the second then finds it complete and verifies it.
		unlock, err := s.lockFile(s.ctx, job.dest)
		if err != nil {
			return "", fmt.Errorf("model: download %s: %w", f.Path, err)
		}
		sum, err := job.run(s.ctx)
		if err != nil && reasonOf(err) == ReasonDisk {
			// Free what we took: a full disk hurts every other writer.
			_ = os.Remove(job.dest + incompleteSuffix)
		}
		unlock()
		if err != nil {
			return "", err
		}
		done += f.Size
		files = append(files, ModelFile{Path: f.Path, Size: f.Size, SHA256: sum})
		if f.Path == d.sel.main {
			mainSHA = sum
		}
	}
	local := d.base
	if d.sel.main != "" {
		local = filepath.Join(d.base, filepath.FromSlash(d.sel.main))
	}
	now := time.Now()
	m := Model{
		Ref: d.ref.String(), Provider: d.ref.Provider, Repo: d.ref.Repo, Revision: d.ref.Revision,
		Files: files, LocalPath: local, SizeBytes: d.total, SHA256: mainSHA,
		DownloadedAt: now.Unix(), lastUsedMS: now.UnixMilli(),
	}
	if err := s.cat.put(s.ctx, m); err != nil {
		if isDiskFull(err) {
			return "", diskFullError(s.dir, err)
		}
		return "", err
	}
	return local, nil
}

// lookup returns a running or recently finished download.
func (s *Store) lookup(id string) *download {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.byID[id]
}

// download is one running fetch and its progress, which any number of SSE
// subscribers read; a late subscriber starts from the current state.
type download struct {
	id       string
	ref      Ref
	resolved chan struct{} // closed once listing and admission are done
	// Set before resolved is closed, read-only after.
	resolveErr  error
	callerGone  bool // resolveErr is the listing caller's ctx ending
	presentPath string
	sel         selection
	base        string
	total       uint64

	mu       sync.Mutex
	cur      Progress
	changed  chan struct{} // closed and replaced on every published change
	lastPub  time.Time
	winStart time.Time
	winBytes uint64
	recvd    uint64
	result   *Result
	waiters  []chan Result
}

func newDownload(ref Ref) *download {
	return &download{
		id: newID(), ref: ref, resolved: make(chan struct{}), changed: make(chan struct{}),
		cur: Progress{Stage: StageDownloading},
	}
}

// newID is a random UUIDv4, the original's download_id format.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func (d *download) setTotals(have, total uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.total = total
	d.cur.BytesDownloaded, d.cur.BytesTotal = have, total
	d.winStart, d.winBytes = time.Now(), 0
}

// remaining is how many bytes the download may still write.
func (d *download) remaining() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cur.Done() || d.cur.BytesDownloaded > d.cur.BytesTotal {
		return 0
	}
	return d.cur.BytesTotal - d.cur.BytesDownloaded
}

// progress records bytes on disk; subscribers are woken at most every
// notifyInterval, which bounds SSE traffic on fast links.
func (d *download) progress(have uint64, received int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := time.Now()
	d.cur.BytesDownloaded = have
	d.recvd += uint64(received)
	if el := now.Sub(d.winStart); el >= time.Second {
		d.cur.SpeedMbps = float64(d.recvd-d.winBytes) * 8 / el.Seconds() / 1e6
		d.winStart, d.winBytes = now, d.recvd
	}
	if now.Sub(d.lastPub) >= notifyInterval {
		d.publishLocked(now)
	}
}

func (d *download) publishLocked(now time.Time) {
	d.lastPub = now
	close(d.changed)
	d.changed = make(chan struct{})
}

func (d *download) finish(r Result) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if r.Err != nil {
		d.cur = Progress{Stage: StageError, Message: api.AsError(r.Err).Message}
		if ae := api.AsError(r.Err); ae.Code == api.CodeInternal {
			d.cur.Message = r.Err.Error()
		}
	} else {
		d.cur = Progress{Stage: StageComplete, LocalPath: r.LocalPath}
	}
	d.result = &r
	for _, w := range d.waiters {
		w <- r
	}
	d.waiters = nil
	d.publishLocked(time.Now())
}

// subscribe returns a channel that receives the Result once.
func (d *download) subscribe() <-chan Result {
	ch := make(chan Result, 1)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.result != nil {
		ch <- *d.result
	} else {
		d.waiters = append(d.waiters, ch)
	}
	return ch
}

// snapshot returns the current state and a channel closed on the next change.
func (d *download) snapshot() (Progress, <-chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cur, d.changed
}
