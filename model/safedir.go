package model

import (
	"errors"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// safeDir does the model dir's writes, renames and deletes without
// following a symlink in any path component. The hive writes as root, and
// whoever may write somewhere below the model dir (a worker group, an
// operator's copy tool) could otherwise plant hf/<org> -> /etc and have the
// next download, resume or delete act there. Every path is walked one
// component at a time from a descriptor of the model dir taken at start,
// each with openat(O_NOFOLLOW) relative to its parent's descriptor, and a
// component that is a symlink fails with ELOOP; names are checked
// lexically ("..", "." and empty names are refused), so the walk cannot
// leave the dir. The last component is then created, renamed or unlinked
// with the *at call relative to its parent's descriptor, which never
// follows it either. This is what openat2(RESOLVE_BENEATH|
// RESOLVE_NO_SYMLINKS) does in one call; openat2 itself is not used
// because the shipped unit's RestrictSUIDSGID= seccomp filter answers it
// with ENOSYS (systemd cannot inspect its flags).
type safeDir struct {
	path string // absolute, clean
	fd   int    // O_PATH descriptor of path
}

// errOutsideModelDir: a path (e.g. read back from the catalog) that does
// not lie below the model dir.
var errOutsideModelDir = errors.New("path is not below the model dir")

func openSafeDir(path string) (*safeDir, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return &safeDir{path: path, fd: fd}, nil
}

func (d *safeDir) close() { unix.Close(d.fd) }

// rel turns an absolute path below the model dir into the relative path
// the walk resolves; anything else (the dir itself included) is refused.
func (d *safeDir) rel(p string) (string, error) {
	if filepath.Clean(p) != p || !strings.HasPrefix(p, d.path+"/") {
		return "", &os.PathError{Op: "resolve", Path: p, Err: errOutsideModelDir}
	}
	return p[len(d.path)+1:], nil
}

// openRel opens rel (relative to the model dir; "." is the dir) with no
// symlink in any component: every directory on the way is opened with
// O_PATH|O_NOFOLLOW from its parent and must be a directory, the last
// component with flags|O_NOFOLLOW (O_PATH opens of a symlink are refused
// after an fstat).
func (d *safeDir) openRel(rel string, flags int, mode uint32) (int, error) {
	full := filepath.Join(d.path, rel)
	names := strings.Split(rel, "/")
	if rel == "." {
		names = nil
	}
	for _, n := range names {
		if n == "" || n == "." || n == ".." {
			return -1, &os.PathError{Op: "openat", Path: full, Err: errOutsideModelDir}
		}
	}
	cur, err := unix.Dup(d.fd)
	if err != nil {
		return -1, &os.PathError{Op: "dup", Path: d.path, Err: err}
	}
	if len(names) == 0 {
		if flags&unix.O_PATH == 0 {
			defer unix.Close(cur)
			return d.reopen(cur, ".", flags, mode, full)
		}
		return cur, nil
	}
	for _, n := range names[:len(names)-1] {
		next, err := unix.Openat(cur, n, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(cur)
		if err != nil {
			return -1, &os.PathError{Op: "openat", Path: full, Err: err}
		}
		if err := isDirNoLink(next); err != nil {
			unix.Close(next)
			return -1, &os.PathError{Op: "openat", Path: full, Err: err}
		}
		cur = next
	}
	defer unix.Close(cur)
	return d.reopen(cur, names[len(names)-1], flags, mode, full)
}

// reopen opens name below the directory descriptor dir with O_NOFOLLOW.
func (d *safeDir) reopen(dir int, name string, flags int, mode uint32, full string) (int, error) {
	open := flags
	if flags&unix.O_PATH != 0 {
		// O_DIRECTORY would make a symlink ENOTDIR; the type is checked below.
		open &^= unix.O_DIRECTORY
	}
	fd, err := unix.Openat(dir, name, open|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
	if err != nil {
		return -1, &os.PathError{Op: "openat", Path: full, Err: err}
	}
	if flags&unix.O_PATH != 0 {
		// O_PATH|O_NOFOLLOW opens a symlink itself instead of failing.
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT == unix.S_IFLNK {
			unix.Close(fd)
			return -1, &os.PathError{Op: "openat", Path: full, Err: unix.ELOOP}
		}
		if flags&unix.O_DIRECTORY != 0 && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			unix.Close(fd)
			return -1, &os.PathError{Op: "openat", Path: full, Err: unix.ENOTDIR}
		}
	}
	return fd, nil
}

// isDirNoLink is nil for a directory, ELOOP for a symlink, else ENOTDIR.
func isDirNoLink(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return nil
	case unix.S_IFLNK:
		return unix.ELOOP
	}
	return unix.ENOTDIR
}

// parent opens the directory holding p and returns it with p's last
// component.
func (d *safeDir) parent(p string) (int, string, error) {
	rel, err := d.rel(p)
	if err != nil {
		return -1, "", err
	}
	dir, base := filepath.Split(rel)
	if dir == "" {
		dir = "."
	}
	fd, err := d.openRel(strings.TrimSuffix(dir, "/"), unix.O_PATH|unix.O_DIRECTORY, 0)
	return fd, base, err
}

// OpenFile opens p below the model dir; with O_CREATE the file is created
// in place, never through a link.
func (d *safeDir) OpenFile(p string, flags int, perm os.FileMode) (*os.File, error) {
	rel, err := d.rel(p)
	if err != nil {
		return nil, err
	}
	fd, err := d.openRel(rel, flags, uint32(perm.Perm()))
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), p), nil
}

// MkdirAll creates p and its missing parents below the model dir, one
// component at a time; an existing component that is a symlink fails.
func (d *safeDir) MkdirAll(p string, perm os.FileMode) error {
	rel, err := d.rel(p)
	if err != nil {
		return err
	}
	cur := "."
	for _, name := range strings.Split(rel, "/") {
		pfd, err := d.openRel(cur, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			return err
		}
		err = unix.Mkdirat(pfd, name, uint32(perm.Perm()))
		unix.Close(pfd)
		if err != nil && err != unix.EEXIST {
			return &os.PathError{Op: "mkdirat", Path: filepath.Join(d.path, cur, name), Err: err}
		}
		cur = filepath.Join(cur, name)
	}
	// What exists must be a directory reached without links.
	fd, err := d.openRel(cur, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	unix.Close(fd)
	return nil
}

// Remove deletes the file or empty directory p below the model dir. A
// symlink as p's last component is removed itself, never its target.
func (d *safeDir) Remove(p string) error {
	pfd, base, err := d.parent(p)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	err = unix.Unlinkat(pfd, base, 0)
	if err == unix.EISDIR {
		err = unix.Unlinkat(pfd, base, unix.AT_REMOVEDIR)
	}
	if err != nil {
		return &os.PathError{Op: "unlinkat", Path: p, Err: err}
	}
	return nil
}

// Rename moves oldp to newp, both below the model dir.
func (d *safeDir) Rename(oldp, newp string) error {
	ofd, obase, err := d.parent(oldp)
	if err != nil {
		return err
	}
	defer unix.Close(ofd)
	nfd, nbase, err := d.parent(newp)
	if err != nil {
		return err
	}
	defer unix.Close(nfd)
	if err := unix.Renameat(ofd, obase, nfd, nbase); err != nil {
		return &os.LinkError{Op: "renameat", Old: oldp, New: newp, Err: err}
	}
	return nil
}

// Stat stats p below the model dir; a symlink anywhere, the last
// component included, is an error (ELOOP), never followed.
func (d *safeDir) Stat(p string) (os.FileInfo, error) {
	rel, err := d.rel(p)
	if err != nil {
		return nil, err
	}
	fd, err := d.openRel(rel, unix.O_PATH, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	return f.Stat()
}
