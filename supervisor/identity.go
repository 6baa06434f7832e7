package supervisor

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/internal/workeruser"
)

// Worker identities (docs/security.md): every worker runs without
// capabilities; by default under a uid of its own from workers.uid_range,
// or as a backend's fixed system user, or as root where a backend says so.

// User values of a backend besides a system user name.
const (
	userPerWorker = "" // a uid per worker from the range
	userRoot      = "root"
)

// identities resolves who a worker runs as.
type identities struct {
	alloc *workeruser.Allocator
	group uint32                      // workers.model_group
	fixed map[string]cgroup.Isolation // backend → its fixed user (and root)
	homes string                      // <state_dir>/homes
}

// newIdentities resolves the configured users and group, checks the uid
// range against the host's account files when a backend uses it, and
// prepares the directories workers reach through the group.
func newIdentities(cfg *config.Config, hostFiles *workeruser.HostFiles) (*identities, error) {
	first, last, err := config.ParseUIDRange(cfg.Workers.UIDRange)
	if err != nil {
		return nil, fmt.Errorf("workers.uid_range: %w", err)
	}
	gid, err := lookupGroup(cfg.Workers.ModelGroup)
	if err != nil {
		return nil, fmt.Errorf("workers.model_group: %w", err)
	}
	alloc, err := workeruser.New(workeruser.Config{First: first, Last: last, Groups: []uint32{gid}})
	if err != nil {
		return nil, err
	}
	ids := &identities{alloc: alloc, group: gid, fixed: map[string]cgroup.Isolation{},
		homes: filepath.Join(cfg.StateDir, "homes")}
	perWorker := false
	for _, name := range cfg.BackendNames() {
		b := cfg.Backends[name]
		switch b.User {
		case userPerWorker:
			perWorker = true
		case userRoot:
			ids.fixed[name] = cgroup.Isolation{UID: 0, GID: 0, Groups: []uint32{gid}}
		default:
			u, err := user.Lookup(b.User)
			if err != nil {
				return nil, fmt.Errorf("backends.%s.user: %w", name, err)
			}
			uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
			ugid, err2 := strconv.ParseUint(u.Gid, 10, 32)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("backends.%s.user: %q has uid %q gid %q", name, b.User, u.Uid, u.Gid)
			}
			if uid == 0 {
				return nil, fmt.Errorf("backends.%s.user: %q is uid 0; write user = \"root\" to run workers as root", name, b.User)
			}
			if uint32(uid) >= first && uint32(uid) <= last {
				return nil, fmt.Errorf("backends.%s.user: %q (uid %d) lies inside workers.uid_range", name, b.User, uid)
			}
			ids.fixed[name] = cgroup.Isolation{UID: uint32(uid), GID: uint32(ugid), Groups: []uint32{gid}}
		}
	}
	if perWorker {
		hf := workeruser.DefaultHostFiles()
		if hostFiles != nil {
			hf = *hostFiles
		}
		if err := workeruser.CheckHost(first, last, hf); err != nil {
			return nil, fmt.Errorf("workers.uid_range %s: %w", cfg.Workers.UIDRange, err)
		}
	}
	if err := ids.prepareDirs(cfg); err != nil {
		return nil, err
	}
	return ids, nil
}

// lookupGroup takes a gid or a group name from /etc/group.
func lookupGroup(g string) (uint32, error) {
	if n, err := strconv.ParseUint(g, 10, 32); err == nil {
		return uint32(n), nil
	}
	gr, err := user.LookupGroup(g)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(gr.Gid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("group %q has gid %q", g, gr.Gid)
	}
	return uint32(n), nil
}

// prepareDirs sets the modes workers depend on. The state dir is
// root:<group> 0710: workers may pass through it (to the model dir and
// their homes) but not list it; the token (0600) and the worker logs (a
// root-only 0750 dir) stay out of reach. The model dir gets the group and
// g+rx (what the hive writes below it is 0755/0644), the homes dir 0710, the
// notify socket the group (its mode is 0660), and each backend's writable
// paths root:<group> 0770. No setgid bits: the unit's RestrictSUIDSGID=yes
// refuses them.
func (ids *identities) prepareDirs(cfg *config.Config) error {
	chown := func(p string, mode os.FileMode) error {
		if err := os.Chown(p, 0, int(ids.group)); err != nil {
			return fmt.Errorf("worker isolation: %w", err)
		}
		if err := os.Chmod(p, mode); err != nil {
			return fmt.Errorf("worker isolation: %w", err)
		}
		return nil
	}
	if err := os.MkdirAll(cfg.StateDir, 0o710); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if err := chown(cfg.StateDir, 0o710); err != nil {
		return err
	}
	// Homes of an earlier hive's workers go with their other files
	// (Supervisor.removeStaleFiles), except those of adopted workers.
	if err := os.MkdirAll(ids.homes, 0o710); err != nil {
		return fmt.Errorf("worker homes: %w", err)
	}
	if err := chown(ids.homes, 0o710); err != nil {
		return err
	}
	if cfg.ModelDir != "" { // set by config.Load
		if err := os.MkdirAll(cfg.ModelDir, 0o755); err != nil {
			return fmt.Errorf("model dir: %w", err)
		}
		st, err := os.Stat(cfg.ModelDir)
		if err != nil {
			return fmt.Errorf("model dir: %w", err)
		}
		if err := chown(cfg.ModelDir, st.Mode().Perm()|0o050); err != nil {
			return err
		}
	}
	if p := cfg.Heartbeat.NotifySocket; p != "" && p[0] != '@' {
		// notify.Listen and the shipped .socket unit make it 0660; a socket
		// handed over by another activator may not be.
		err := os.Chown(p, 0, int(ids.group))
		if err == nil {
			err = os.Chmod(p, 0o660)
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("worker isolation: notify socket: %w", err)
		}
	}
	for _, name := range cfg.BackendNames() {
		for _, p := range cfg.Backends[name].Writable {
			if err := os.MkdirAll(p, 0o770); err != nil {
				return fmt.Errorf("backends.%s.writable: %w", name, err)
			}
			if err := chown(p, 0o770); err != nil {
				return fmt.Errorf("backends.%s.writable: %w", name, err)
			}
		}
	}
	return nil
}

// identity returns the Isolation of w's next run; a worker with a uid of
// its own keeps it across restarts until it is deleted.
func (ids *identities) identity(w *worker) (cgroup.Isolation, error) {
	if iso, ok := ids.fixed[w.backend]; ok {
		return iso, nil
	}
	id, err := ids.alloc.Allocate(w.id)
	if err != nil {
		return cgroup.Isolation{}, err
	}
	return cgroup.Isolation{UID: id.UID, GID: id.GID, Groups: id.Groups}, nil
}

// userName is what the API shows as a worker's user.
func userName(b config.Backend, iso *cgroup.Isolation) string {
	switch {
	case b.User == userRoot:
		return userRoot
	case b.User != userPerWorker:
		return b.User
	case iso != nil:
		return strconv.FormatUint(uint64(iso.UID), 10)
	}
	return ""
}

// home is w's own HOME, created for its first run: owned by the worker,
// 0700, with XDG_CACHE_HOME inside.
func (ids *identities) home(w *worker, iso cgroup.Isolation) (string, error) {
	dir := filepath.Join(ids.homes, w.id)
	for _, d := range []string{dir, filepath.Join(dir, ".cache")} {
		if err := os.Mkdir(d, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("worker home: %w", err)
		}
		// Lchown: the worker owns dir, and .cache may have become its symlink.
		if err := os.Lchown(d, int(iso.UID), int(iso.GID)); err != nil {
			return "", fmt.Errorf("worker home: %w", err)
		}
	}
	return dir, nil
}

// release gives w's uid back and removes its home. Called once w is
// deleted; its processes are gone.
func (ids *identities) release(w *worker, log *slog.Logger) {
	if err := os.RemoveAll(filepath.Join(ids.homes, w.id)); err != nil {
		log.Warn("removing the worker's home", slog.Any("err", err))
	}
	ids.alloc.Release(w.id)
}

// canExec reports, without trying, whether iso may execute prog: each
// directory on the way must grant it search permission and the file
// execute permission, by owner, group or other as the kernel picks
// (without capabilities, as the worker runs). The error names the first
// path that stops it, so a spawn fails with a cause rather than EACCES.
func canExec(prog string, iso cgroup.Isolation) error {
	if iso.UID == 0 {
		return nil // root owns most paths; exec reports the rare exception
	}
	allowed := func(p string, want os.FileMode) error {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		perm := fi.Mode().Perm()
		var bits os.FileMode
		switch {
		case st.Uid == iso.UID:
			bits = perm >> 6
		case st.Gid == iso.GID || slices.Contains(iso.Groups, st.Gid):
			bits = perm >> 3
		default:
			bits = perm
		}
		if bits&want == 0 {
			return fmt.Errorf("workers (uid %d, groups %d %v) cannot use %s (%s %d:%d): make it reachable, or install the program elsewhere", iso.UID, iso.GID, iso.Groups, p, perm, st.Uid, st.Gid)
		}
		return nil
	}
	p := filepath.Clean(prog)
	for d := filepath.Dir(p); ; d = filepath.Dir(d) {
		if err := allowed(d, 0o1); err != nil {
			return err
		}
		if d == "/" || d == "." {
			break
		}
	}
	return allowed(p, 0o1)
}

// WorkersCanExec reports whether a worker with a uid of its own from cfg's
// range could execute prog (see canExec).
func WorkersCanExec(cfg *config.Config, prog string) error {
	first, _, err := config.ParseUIDRange(cfg.Workers.UIDRange)
	if err != nil {
		return err
	}
	gid, err := lookupGroup(cfg.Workers.ModelGroup)
	if err != nil {
		return err
	}
	return canExec(prog, cgroup.Isolation{UID: first, GID: first, Groups: []uint32{gid}})
}

// adopt restores the identity of an adopted worker that runs as uid: a
// backend's fixed user, or its own uid reserved again in the allocator (so
// no other worker is given it). A uid the allocator refuses (outside the
// range, another worker's) fails the adoption.
func (ids *identities) adopt(w *worker, uid int) error {
	iso, ok := ids.fixed[w.backend]
	if !ok {
		if uid < 0 || uid > 1<<32-1 {
			return fmt.Errorf("worker identity: uid %d", uid)
		}
		id, err := ids.alloc.Reserve(w.id, uint32(uid))
		if err != nil {
			return fmt.Errorf("worker identity: %w", err)
		}
		iso = cgroup.Isolation{UID: id.UID, GID: id.GID, Groups: id.Groups}
	} else if int(iso.UID) != uid {
		return fmt.Errorf("worker identity: runs as uid %d, backend %s's user is uid %d", uid, w.backend, iso.UID)
	}
	w.iso, w.home = &iso, filepath.Join(ids.homes, w.id)
	return nil
}

// removeStaleHomes deletes the homes of earlier workers keep does not want
// (nil: all).
func (ids *identities) removeStaleHomes(keep func(id string) bool) error {
	ents, err := os.ReadDir(ids.homes)
	if err != nil {
		return fmt.Errorf("worker homes: %w", err)
	}
	var errs []error
	for _, e := range ents {
		if keep != nil && keep(e.Name()) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(ids.homes, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
