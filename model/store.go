package model

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
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
	// DefaultPartialMaxAge keeps an orphaned partial download for a day: a
	// hive restarted (or a request repeated) within it resumes the bytes.
	DefaultPartialMaxAge = 24 * time.Hour
	// finishedRetention is how long a finished download still answers the
	// progress route, so a late subscriber gets the outcome, not a 404.
	finishedRetention = 5 * time.Minute
	keepAliveInterval = 10 * time.Second // SSE keep-alive, as the Rust hive (docs/compat.md)
	notifyInterval    = 200 * time.Millisecond
)

// Options configure a Store.
type Options struct {
	// Dir holds the model files (config model_dir). Required.
	Dir string
	// CatalogPath is the SQLite file; empty: <Dir>/catalog.db. The hive
	// keeps it in its state dir, out of reach of whoever may write the
	// model dir. A catalog that does not exist yet is filled from the model
	// files on disk (e.g. after it moved out of the model dir).
	CatalogPath string
	// FileRoots are the absolute directories a file: reference must lie
	// below (config models.file_roots); empty: Dir only.
	FileRoots []string
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
	// PartialMaxAge bounds how long a partial download (*.incomplete) that
	// no running download owns is kept for a later resume; zero:
	// DefaultPartialMaxAge. Such orphans are collected at start and on
	// every download, and count toward MaxBytes meanwhile.
	PartialMaxAge time.Duration
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
	dir           string
	reserve       uint64
	maxBytes      uint64
	partialMaxAge time.Duration
	stall         time.Duration
	log           *slog.Logger
	hub           *hub
	cat           *catalog
	met           *metrics
	checkDisk     func(dir string, need, reserve uint64) error
	roots         []fileRoot
	mdir          *safeDir // every write below dir goes through it
	keepAlive     time.Duration

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
	mdir, err := openSafeDir(dir)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			mdir.close()
		}
	}()
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
	rootList := opts.FileRoots
	if len(rootList) == 0 {
		rootList = []string{dir}
	}
	roots, err := newFileRoots(rootList)
	if err != nil {
		return nil, err
	}
	h, err := newHub(endpoint, token, opts.HTTPClient)
	if err != nil {
		return nil, err
	}
	partialMaxAge := opts.PartialMaxAge
	if partialMaxAge <= 0 {
		partialMaxAge = DefaultPartialMaxAge
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
	_, statErr := os.Lstat(catPath)
	fresh := errors.Is(statErr, os.ErrNotExist)
	cat, rebuild, err := openCatalogOrRecover(catPath, log, met)
	if err != nil {
		return nil, err
	}
	check := opts.DiskChecker
	if check == nil {
		check = admission.CheckDisk
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Store{
		dir: dir, reserve: opts.DiskReserve, maxBytes: opts.MaxBytes, partialMaxAge: partialMaxAge, stall: stall,
		log: log, hub: h, cat: cat, met: met, checkDisk: check, keepAlive: keepAliveInterval, roots: roots, mdir: mdir,
		ctx: ctx, cancel: cancel,
		inflight: map[string]*download{}, byID: map[string]*download{}, inUse: map[string]int{}, files: map[string]chan struct{}{},
	}
	if rebuild {
		n, err := s.rebuildCatalog(ctx)
		if err != nil {
			cat.close()
			cancel()
			return nil, err
		}
		log.Warn("model catalog rebuilt from the model files on disk", "catalog", catPath, "models", n)
	} else if fresh {
		n, err := s.rebuildCatalog(ctx)
		if err != nil {
			cat.close()
			cancel()
			return nil, err
		}
		if n > 0 {
			log.Info("new model catalog filled from the model files on disk", "catalog", catPath, "models", n)
		}
	}
	ok = true
	s.collectPartials(time.Now())
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
	defer s.mdir.close()
	return s.cat.close()
}
