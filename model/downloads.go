package model

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/rbee/rbee-hive/api"
)

// Downloads: Ensure starts or joins a download of a hub model, lists and
// admits it, fetches its files and registers it in the catalog.

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

// start is Ensure's core, shared with the HTTP handler: it returns a local
// path (present) or the running download.
func (s *Store) start(ctx context.Context, refStr string) (string, *download, error) {
	ref, err := ParseRef(refStr)
	if err != nil {
		return "", nil, err
	}
	if ref.Provider == ProviderFile {
		p, err := localFile(s.roots, ref.Path)
		return p, nil, err
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
		have += existingBytes(s.mdir, filepath.Join(d.base, f.Path), f.Size)
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
			hub: s.hub, dir: s.mdir, ref: d.ref, file: f, dest: filepath.Join(d.base, f.Path), stall: s.stall,
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
			_ = s.mdir.Remove(job.dest + incompleteSuffix)
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

// newID is a random UUIDv4, the download_id format clients know
// (docs/compat.md).
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
