package model

import (
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/api"
)

// fileRoot is a directory below which file: references may point.
type fileRoot struct {
	spelled string // as configured, cleaned
	path    string // symlinks resolved at start
}

// newFileRoots resolves the configured roots once, at start: an operator
// may well give /srv/models as a symlink, and the lexical check below
// compares against what the kernel resolves.
func newFileRoots(roots []string) ([]fileRoot, error) {
	out := make([]fileRoot, 0, len(roots))
	for _, r := range roots {
		if !filepath.IsAbs(r) {
			return nil, fmt.Errorf("model: file root %q is not an absolute path", r)
		}
		real, err := filepath.EvalSymlinks(r)
		if err != nil {
			return nil, fmt.Errorf("model: file root: %w", err)
		}
		out = append(out, fileRoot{spelled: filepath.Clean(r), path: real})
	}
	return out, nil
}

// under reports whether the clean absolute path p is root itself or below
// it, by its spelling alone.
func under(root, p string) (rel string, ok bool) {
	if p == root {
		return ".", true
	}
	prefix := root
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	if !strings.HasPrefix(p, prefix) {
		return "", false
	}
	return p[len(prefix):], true
}

// errOutsideRoots is the 400 for a file: reference no root covers, or one
// whose symlinks lead out of its root. It never says whether the path
// exists: the API must not be a file-existence oracle.
func errOutsideRoots(p string) *api.Error {
	return refError("file: path %q is not below any of models.file_roots", p)
}

// localFile checks a file: reference against the roots and returns its
// path. The spelling is checked first, with no system call, so a path
// outside every root is refused the same whether it exists or not. A path
// inside a root is then opened with openat2(RESOLVE_BENEATH) from the
// root's directory: the kernel refuses any symlink or ".." that leaves the
// root (also an absolute symlink, even one pointing back inside), so
// there is no window between checking and resolving as with
// EvalSymlinks + prefix check. The worker later opens the path by name: a
// writer of the root could swap a component in between; roots are meant to
// be writable by the hive only.
func localFile(roots []fileRoot, p string) (string, error) {
	for _, r := range roots {
		rel, ok := under(r.spelled, p)
		if !ok {
			if rel, ok = under(r.path, p); !ok {
				continue
			}
		}
		err := statBeneath(r.path, rel)
		switch {
		case err == nil:
			return p, nil
		case errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ELOOP):
			return "", errOutsideRoots(p)
		case errors.Is(err, errNotFileOrDir):
			return "", refError("%s is neither a regular file nor a directory", p).WithDetails(map[string]any{"field": "model_ref", "path": p})
		default:
			return "", api.Errorf(http.StatusNotFound, api.CodeNotFound, "model path %s: %v", p, errors.Unwrap(err)).
				WithDetails(map[string]any{"path": p})
		}
	}
	return "", errOutsideRoots(p)
}

var errNotFileOrDir = errors.New("neither a regular file nor a directory")

// statBeneath resolves rel below root without leaving it and checks that
// it names a regular file or a directory.
func statBeneath(root, rel string) error {
	dfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &pathErr{op: "open", path: root, err: err}
	}
	defer unix.Close(dfd)
	fd, err := openat2Retry(dfd, rel, &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS})
	if err != nil {
		return &pathErr{op: "openat2", path: filepath.Join(root, rel), err: err}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &pathErr{op: "fstat", path: filepath.Join(root, rel), err: err}
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFDIR:
		return nil
	}
	return errNotFileOrDir
}

// pathErr keeps the errno reachable by errors.Unwrap (the 404 message
// shows only it, as the os.Stat-based check did).
type pathErr struct {
	op, path string
	err      error
}

func (e *pathErr) Error() string { return e.op + " " + e.path + ": " + e.err.Error() }
func (e *pathErr) Unwrap() error { return e.err }

// openat2Retry is openat2, retried on EAGAIN/EINTR (with RESOLVE_BENEATH
// the kernel answers EAGAIN when a concurrent rename might have let the
// walk escape).
func openat2Retry(dfd int, path string, how *unix.OpenHow) (int, error) {
	for i := 0; ; i++ {
		fd, err := unix.Openat2(dfd, path, how)
		if (err == unix.EAGAIN || err == unix.EINTR) && i < 64 {
			continue
		}
		return fd, err
	}
}
