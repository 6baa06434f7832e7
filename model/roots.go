package model

import (
	"errors"
	"fmt"
	"net/http"
	"os"
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
// inside a root is then resolved by resolveBeneath, which never looks
// outside the root: a symlink that leads out of it (or any absolute one)
// is the same 400. The worker later opens the path by name: a writer of
// the root could swap a component in between; roots are meant to be
// writable by root only.
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
		case errors.Is(err, errLeavesRoot):
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

var (
	errNotFileOrDir = errors.New("neither a regular file nor a directory")
	errLeavesRoot   = errors.New("symlink leads out of the root")
)

// maxLinks bounds the symlinks one resolution follows, as the kernel's
// own limit (ELOOP after 40).
const maxLinks = 40

// statBeneath resolves rel below root the way openat2(RESOLVE_BENEATH)
// would, and checks that it names a regular file or a directory. Symlinks
// are followed while they stay inside the root: relative ones are
// expanded component by component, ".." may not climb above the root, an
// absolute one is refused. Every lstat is of a path below root whose
// directories were already found not to be symlinks, so nothing outside
// the root is ever looked at. (openat2 itself is not used: the shipped
// unit's RestrictSUIDSGID= seccomp filter answers it with ENOSYS.)
func statBeneath(root, rel string) error {
	var done []string // resolved components below root: real directories
	todo := strings.Split(rel, "/")
	if rel == "." {
		todo = nil
	}
	links := 0
	for len(todo) > 0 {
		n := todo[0]
		todo = todo[1:]
		switch n {
		case "", ".":
			continue
		case "..":
			if len(done) == 0 {
				return errLeavesRoot
			}
			done = done[:len(done)-1]
			continue
		}
		cur := filepath.Join(append([]string{root}, append(done, n)...)...)
		var st unix.Stat_t
		if err := unix.Lstat(cur, &st); err != nil {
			return &pathErr{op: "lstat", path: cur, err: err}
		}
		if st.Mode&unix.S_IFMT != unix.S_IFLNK {
			if len(todo) > 0 && st.Mode&unix.S_IFMT != unix.S_IFDIR {
				return &pathErr{op: "lstat", path: cur, err: unix.ENOTDIR}
			}
			done = append(done, n)
			continue
		}
		if links++; links > maxLinks {
			return &pathErr{op: "readlink", path: cur, err: unix.ELOOP}
		}
		target, err := os.Readlink(cur)
		if err != nil {
			return &pathErr{op: "readlink", path: cur, err: err}
		}
		if strings.HasPrefix(target, "/") {
			return errLeavesRoot
		}
		todo = append(strings.Split(target, "/"), todo...)
	}
	var st unix.Stat_t
	final := filepath.Join(append([]string{root}, done...)...)
	if err := unix.Lstat(final, &st); err != nil {
		return &pathErr{op: "lstat", path: final, err: err}
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
