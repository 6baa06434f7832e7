package model

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/api"
)

// Retry policy within one download, after huggingface_hub's http_get: a few
// attempts, the counter reset whenever bytes arrive.
const (
	maxAttempts  = 5
	firstBackoff = 100 * time.Millisecond
	maxBackoff   = 5 * time.Second
	copyBufSize  = 1 << 20
	// writebackChunk is how much is written before writeback is started.
	writebackChunk = 8 << 20
)

var errStalled = errors.New("no bytes received within the stall timeout")

// incompleteSuffix marks a file being downloaded; it survives restarts and
// is resumed with Range.
const incompleteSuffix = ".incomplete"

// fileHasher verifies a file against what the listing promised: the LFS
// sha256, or for small non-LFS files the git blob sha1.
type fileHasher struct {
	want string
	h    hash.Hash
	git  bool
}

func newFileHasher(f RepoFile) *fileHasher {
	switch {
	case f.SHA256 != "":
		return &fileHasher{want: f.SHA256, h: sha256.New()}
	case len(f.GitOID) == 40:
		h := sha1.New()
		fmt.Fprintf(h, "blob %d\x00", f.Size)
		return &fileHasher{want: f.GitOID, h: h, git: true}
	}
	return &fileHasher{h: sha256.New()}
}

func (fh *fileHasher) sum() string { return hex.EncodeToString(fh.h.Sum(nil)) }

// sha256 is the file's sha256 when that is what was verified, else "".
func (fh *fileHasher) sha256() string {
	if fh.git {
		return ""
	}
	return fh.sum()
}

func (fh *fileHasher) check(file string) error {
	if fh.want == "" {
		return nil
	}
	if got := fh.sum(); got != fh.want {
		return fail(ReasonChecksum, api.Errorf(http.StatusBadGateway, api.CodeUpstream,
			"checksum mismatch for %s: got %s, want %s", file, got, fh.want).
			WithDetails(map[string]any{"file": file, "reason": ReasonChecksum}))
	}
	return nil
}

// isDiskFull reports whether err is the filesystem running out of room.
func isDiskFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

func diskFullError(path string, err error) error {
	return fail(ReasonDisk, &wrapped{api.Errorf(http.StatusInsufficientStorage, api.CodeInsufficientDisk,
		"disk filled up while writing %s", path).WithDetails(map[string]any{"path": path}), err})
}

// fetchJob downloads one repo file to its final path.
type fetchJob struct {
	hub   *hub
	dir   *safeDir // dest lies below it; never reached through a symlink
	ref   Ref
	file  RepoFile
	dest  string
	stall time.Duration
	// progress reports this file's bytes on disk and the bytes just received.
	progress func(have uint64, received int)
	log      func(msg string, args ...any)
}

// existing reports how many bytes of f are already on disk (final or partial),
// for admission and progress.
func existingBytes(dir *safeDir, dest string, size uint64) uint64 {
	if st, err := dir.Stat(dest); err == nil && uint64(st.Size()) == size {
		return size
	}
	if st, err := dir.Stat(dest + incompleteSuffix); err == nil && uint64(st.Size()) <= size {
		return uint64(st.Size())
	}
	return 0
}

// run downloads (or resumes) the file, verifies it and renames it into place.
// It returns the file's sha256 when known.
func (j *fetchJob) run(ctx context.Context) (string, error) {
	// A final file left by an earlier, unregistered run counts once verified.
	// The hive writes as root: nothing below is done through a symlink in
	// any component (j.dir); a directory component replaced by a link
	// fails the download with ELOOP.
	if st, err := j.dir.Stat(j.dest); err == nil && st.Mode().IsRegular() && uint64(st.Size()) == j.file.Size {
		fh := newFileHasher(j.file)
		if err := hashFile(ctx, j.dir, j.dest, fh.h); err == nil && fh.check(j.file.Path) == nil {
			j.progress(j.file.Size, 0)
			return fh.sha256(), nil
		}
		_ = j.dir.Remove(j.dest)
	}
	if err := j.dir.MkdirAll(filepath.Dir(j.dest), 0o755); err != nil {
		if isDiskFull(err) {
			return "", diskFullError(j.dest, err)
		}
		return "", fmt.Errorf("model: mkdir: %w", err)
	}
	part := j.dest + incompleteSuffix
	// A link (or anything but a regular file) planted at the partial's
	// name is removed itself, never followed.
	if st, err := j.dir.Stat(part); (err == nil && !st.Mode().IsRegular()) || errors.Is(err, unix.ELOOP) {
		j.log("model download removing a partial that is not a regular file", "file", j.file.Path)
		if err := j.dir.Remove(part); err != nil {
			return "", fmt.Errorf("model: remove %s: %w", part, err)
		}
	}
	f, err := j.dir.OpenFile(part, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		if isDiskFull(err) {
			return "", diskFullError(part, err)
		}
		return "", fmt.Errorf("model: open %s: %w", part, err)
	}
	defer f.Close()

	fh := newFileHasher(j.file)
	have, err := j.resumePoint(ctx, f, fh)
	if err != nil {
		return "", err
	}
	resumed := have > 0
	if err := j.fill(ctx, f, fh, &have); err != nil {
		return "", err
	}
	if err := fh.check(j.file.Path); err != nil {
		if resumed {
			// The partial from an earlier run may be torn (a crash before its
			// pages reached the disk): one clean download before giving up.
			j.log("model download checksum failed after resume, downloading the file again", "file", j.file.Path)
			if err := j.restart(f, fh, &have); err != nil {
				return "", err
			}
			if err := j.fill(ctx, f, fh, &have); err != nil {
				return "", err
			}
			err = fh.check(j.file.Path)
		}
		if err != nil {
			_ = j.dir.Remove(part)
			return "", err
		}
	}
	if err := f.Sync(); err != nil {
		if isDiskFull(err) {
			return "", diskFullError(part, err)
		}
		return "", fmt.Errorf("model: fsync %s: %w", part, err)
	}
	if err := j.dir.Rename(part, j.dest); err != nil {
		return "", fmt.Errorf("model: rename %s: %w", part, err)
	}
	syncDir(j.dir, filepath.Dir(j.dest))
	return fh.sha256(), nil
}

// fill downloads from *have to the end of the file, resuming with Range
// after network errors; bytes received reset the attempt counter.
func (j *fetchJob) fill(ctx context.Context, f *os.File, fh *fileHasher, have *uint64) error {
	attempt := 0
	for *have < j.file.Size {
		got, err := j.attempt(ctx, f, fh, have)
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			return fmt.Errorf("model: download %s: %w", j.file.Path, context.Cause(ctx))
		}
		if reasonOf(err) != ReasonNetwork {
			if reasonOf(err) == ReasonChecksum {
				_ = j.dir.Remove(f.Name())
			}
			return err
		}
		if got > 0 {
			attempt = 0
		}
		attempt++
		if attempt >= maxAttempts {
			return err
		}
		backoff := min(firstBackoff<<(attempt-1), maxBackoff)
		j.log("model download interrupted, resuming", "file", j.file.Path, "offset", *have, "attempt", attempt, "backoff", backoff, "error", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("model: download %s: %w", j.file.Path, context.Cause(ctx))
		case <-time.After(backoff):
		}
	}
	return nil
}

// resumePoint hashes what an earlier run left and positions f after it.
func (j *fetchJob) resumePoint(ctx context.Context, f *os.File, fh *fileHasher) (uint64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("model: stat partial: %w", err)
	}
	have := uint64(st.Size())
	if have > j.file.Size || fh.want == "" {
		// Without a hash to check the whole file against at the end, a torn
		// partial (a crash before its pages reached the disk) would pass:
		// such a file, small and non-LFS, is fetched whole.
		have = 0
	}
	if have > 0 {
		if _, err := io.Copy(fh.h, &ctxReader{ctx: ctx, r: io.LimitReader(f, int64(have))}); err != nil {
			return 0, fmt.Errorf("model: hash partial %s: %w", f.Name(), err)
		}
		j.log("model download resuming from partial file", "file", j.file.Path, "offset", have)
	}
	if err := f.Truncate(int64(have)); err != nil {
		return 0, fmt.Errorf("model: truncate partial: %w", err)
	}
	if _, err := f.Seek(int64(have), io.SeekStart); err != nil {
		return 0, fmt.Errorf("model: seek partial: %w", err)
	}
	j.progress(have, 0)
	return have, nil
}

// attempt runs one GET from *have to the end, appending to f. It returns the
// bytes received; errors are failures with a reason.
func (j *fetchJob) attempt(ctx context.Context, f *os.File, fh *fileHasher, have *uint64) (int64, error) {
	// The stall timer covers the wait for headers and every read: any byte
	// pushes it back, silence for j.stall cancels the request.
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	timer := time.AfterFunc(j.stall, func() { cancel(errStalled) })
	defer timer.Stop()

	req, err := j.hub.newRequest(rctx, j.hub.resolveURL(j.ref, j.file.Path))
	if err != nil {
		return 0, err
	}
	// Identity: a gzip-transparent transport would make Range offsets and
	// Content-Length meaningless.
	req.Header.Set("Accept-Encoding", "identity")
	if *have > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", *have))
	}
	stalled := func(err error) error {
		if errors.Is(context.Cause(rctx), errStalled) {
			return fail(ReasonStalled, &wrapped{api.Errorf(http.StatusGatewayTimeout, api.CodeUpstream,
				"download of %s stalled: no bytes for %s", j.file.Path, j.stall).
				WithDetails(map[string]any{"file": j.file.Path, "reason": ReasonStalled}), err})
		}
		return networkError(j.ref, j.file.Path, err)
	}
	resp, err := j.hub.client.Do(req)
	if err != nil {
		return 0, stalled(err)
	}
	defer resp.Body.Close()

	switch resp.StatusCode {
	case http.StatusOK:
		if *have > 0 {
			// Range ignored: start over rather than append a second copy.
			j.log("model download server ignored Range, restarting file", "file", j.file.Path)
			if err := j.restart(f, fh, have); err != nil {
				return 0, err
			}
		}
	case http.StatusPartialContent:
		start, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != *have || total != j.file.Size {
			return 0, fail(ReasonNetwork, fmt.Errorf("model: %s: unexpected Content-Range %q for offset %d of %d",
				j.file.Path, resp.Header.Get("Content-Range"), *have, j.file.Size))
		}
	case http.StatusRequestedRangeNotSatisfiable:
		// Our partial no longer matches the remote file; start over.
		if err := j.restart(f, fh, have); err != nil {
			return 0, err
		}
		return 0, fail(ReasonNetwork, fmt.Errorf("model: %s: range not satisfiable, restarting", j.file.Path))
	default:
		// 5xx and 429 come back with reason network, so they are retried.
		return 0, statusError(j.ref, j.file.Path, resp)
	}

	remaining := j.file.Size - *have
	// One byte more than expected is enough to know the listing lied.
	body := io.LimitReader(resp.Body, int64(remaining)+1)
	hp := startHashPipe(fh.h)
	defer hp.stop() // before restart or return, the hash has seen every byte
	var got int64
	flushed := *have
	for {
		buf := hp.buffer()
		n, rerr := body.Read(buf)
		if n > 0 {
			timer.Reset(j.stall)
			if uint64(got)+uint64(n) > remaining {
				hp.stop()
				_ = j.restart(f, fh, have)
				return got, fail(ReasonChecksum, api.Errorf(http.StatusBadGateway, api.CodeUpstream,
					"%s is larger than the %d bytes the listing gave", j.file.Path, j.file.Size).
					WithDetails(map[string]any{"file": j.file.Path, "reason": ReasonChecksum}))
			}
			if _, werr := f.Write(buf[:n]); werr != nil {
				if isDiskFull(werr) {
					return got, diskFullError(f.Name(), werr)
				}
				return got, fmt.Errorf("model: write %s: %w", f.Name(), werr)
			}
			hp.hash(buf[:n])
			got += int64(n)
			*have += uint64(n)
			j.progress(*have, n)
			if *have-flushed >= writebackChunk {
				// Start writeback now (non-blocking) so the final fsync
				// does not have to push gigabytes of dirty pages at once.
				_ = unix.SyncFileRange(int(f.Fd()), int64(flushed), int64(*have-flushed), unix.SYNC_FILE_RANGE_WRITE)
				flushed = *have
			}
		} else {
			hp.release(buf)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return got, stalled(rerr)
		}
	}
	hp.stop()
	if *have < j.file.Size {
		return got, networkError(j.ref, j.file.Path, fmt.Errorf("body ended at %d of %d bytes: %w", *have, j.file.Size, io.ErrUnexpectedEOF))
	}
	return got, nil
}

// restart empties the partial file and the hash.
func (j *fetchJob) restart(f *os.File, fh *fileHasher, have *uint64) error {
	if err := f.Truncate(0); err != nil {
		return fmt.Errorf("model: truncate: %w", err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("model: seek: %w", err)
	}
	*fh = *newFileHasher(j.file)
	*have = 0
	j.progress(0, 0)
	return nil
}

// parseContentRange parses "bytes start-end/total".
func parseContentRange(s string) (start, total uint64, ok bool) {
	rest, found := strings.CutPrefix(s, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, tot, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	a, _, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err1 := strconv.ParseUint(a, 10, 64)
	total, err2 := strconv.ParseUint(tot, 10, 64)
	return start, total, err1 == nil && err2 == nil
}

// ctxReader stops a long local read (hashing a 100 GB partial) on cancel.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

func hashFile(ctx context.Context, dir *safeDir, path string, h hash.Hash) error {
	f, err := dir.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("model: open %s: %w", path, err)
	}
	defer f.Close()
	if _, err := io.Copy(h, &ctxReader{ctx: ctx, r: f}); err != nil {
		return fmt.Errorf("model: hash %s: %w", path, err)
	}
	return nil
}

// syncDir makes a rename durable; failure only weakens crash safety.
func syncDir(sd *safeDir, dir string) {
	if d, err := sd.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// hashPipe hashes on its own goroutine so sha256 overlaps the network reads
// and disk writes instead of adding to them; a few buffers circulate.
type hashPipe struct {
	free, work chan []byte
	done       chan struct{}
	stopped    bool
}

const hashPipeBuffers = 4

func startHashPipe(h hash.Hash) *hashPipe {
	p := &hashPipe{free: make(chan []byte, hashPipeBuffers), work: make(chan []byte, hashPipeBuffers), done: make(chan struct{})}
	for range hashPipeBuffers {
		p.free <- make([]byte, copyBufSize)
	}
	go func() {
		defer close(p.done)
		for b := range p.work {
			h.Write(b)
			p.free <- b[:cap(b)]
		}
	}()
	return p
}

// buffer returns a buffer the hasher is done with.
func (p *hashPipe) buffer() []byte { return <-p.free }

// hash queues b (a buffer from buffer()) for hashing; b is not reused before.
func (p *hashPipe) hash(b []byte) { p.work <- b }

// release returns an unused buffer.
func (p *hashPipe) release(b []byte) { p.free <- b[:cap(b)] }

// stop waits until everything queued is hashed. Idempotent; one goroutine.
func (p *hashPipe) stop() {
	if p.stopped {
		return
	}
	p.stopped = true
	close(p.work)
	<-p.done
}
