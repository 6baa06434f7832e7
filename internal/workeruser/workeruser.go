// Package workeruser hands every worker a uid of its own from a configured
// range (gid = uid), like systemd's DynamicUser, so that workers cannot
// signal, ptrace or read each other or the hive. It keeps the allocation in
// memory only: a hive that adopts running workers after a restart calls
// Reserve with the uid each one runs under.
//
// Default range 70000-79999, chosen so that nothing else on a stock Linux
// host hands those ids out:
//   - above 65535: no clash with 16-bit ids, nobody (65534) or the invalid
//     65535;
//   - outside systemd's own ranges: DynamicUser 61184-65519, homed
//     60001-60513, nspawn containers 524288-1879048191;
//   - below useradd's SUB_UID_MIN/SUB_GID_MIN (100000), where shadow-utils
//     starts allocating subordinate ids for rootless containers.
//
// CheckHost verifies that at start against the local account files.
package workeruser

import (
	"errors"
	"fmt"
	"sync"
)

const (
	// DefaultFirst and DefaultLast bound the default range (inclusive).
	DefaultFirst = 70000
	DefaultLast  = 79999
)

// ErrExhausted means every uid of the range belongs to a worker.
var ErrExhausted = errors.New("workeruser: no free uid in the range")

// ErrTaken means the uid (or the worker id) is already allocated.
var ErrTaken = errors.New("workeruser: already allocated")

// Config is the allocator's range and the groups every worker joins.
type Config struct {
	First, Last uint32 // inclusive; zero values mean the defaults
	// Groups are supplementary gids every worker gets: the group that may
	// read the model dir, and e.g. the one owning /dev/nvidia* when the
	// device nodes are not world-accessible.
	Groups []uint32
}

// Identity is what a worker runs as.
type Identity struct {
	UID, GID uint32
	Groups   []uint32
}

// Allocator hands out uids per worker id. Safe for concurrent use.
type Allocator struct {
	first, last uint32
	groups      []uint32

	mu       sync.Mutex
	byWorker map[string]uint32
	byUID    map[uint32]string
	next     uint32 // where the next search starts: freed uids are reused last
}

// New validates cfg and returns an empty allocator.
func New(cfg Config) (*Allocator, error) {
	if cfg.First == 0 && cfg.Last == 0 {
		cfg.First, cfg.Last = DefaultFirst, DefaultLast
	}
	if err := ValidateRange(cfg.First, cfg.Last); err != nil {
		return nil, err
	}
	for _, g := range cfg.Groups {
		if g == 0 {
			return nil, errors.New("workeruser: group 0 (root) must not be a worker group")
		}
		if g >= cfg.First && g <= cfg.Last {
			return nil, fmt.Errorf("workeruser: group %d lies inside the worker range %d-%d, whose gids are the workers' own", g, cfg.First, cfg.Last)
		}
	}
	return &Allocator{
		first: cfg.First, last: cfg.Last, groups: append([]uint32(nil), cfg.Groups...),
		byWorker: map[string]uint32{}, byUID: map[uint32]string{}, next: cfg.First,
	}, nil
}

// ValidateRange rejects ranges that would hand out root, system accounts,
// nobody/the invalid ids, or ids that break signed 32-bit consumers.
func ValidateRange(first, last uint32) error {
	switch {
	case first > last:
		return fmt.Errorf("workeruser: range %d-%d: first is above last", first, last)
	case first < 1000:
		return fmt.Errorf("workeruser: range %d-%d reaches into system ids (< 1000)", first, last)
	case last >= 1<<31-1:
		return fmt.Errorf("workeruser: range %d-%d reaches 2^31-1 or above, which some tools treat as negative or invalid", first, last)
	case first <= 65535 && last >= 65534:
		return fmt.Errorf("workeruser: range %d-%d contains nobody (65534) or the invalid id 65535", first, last)
	}
	return nil
}

// Range returns the configured range.
func (a *Allocator) Range() (first, last uint32) { return a.first, a.last }

func (a *Allocator) identity(uid uint32) Identity {
	return Identity{UID: uid, GID: uid, Groups: append([]uint32(nil), a.groups...)}
}

// Allocate returns the worker's identity, allocating a uid if it has none
// yet (so a restart of the same worker keeps its uid). A uid freed by
// Release is handed out again only after the rest of the range.
func (a *Allocator) Allocate(workerID string) (Identity, error) {
	if workerID == "" {
		return Identity{}, errors.New("workeruser: empty worker id")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if uid, ok := a.byWorker[workerID]; ok {
		return a.identity(uid), nil
	}
	size := uint64(a.last) - uint64(a.first) + 1
	uid := a.next
	for i := uint64(0); i < size; i++ {
		if _, used := a.byUID[uid]; !used {
			a.take(workerID, uid)
			return a.identity(uid), nil
		}
		uid = a.after(uid)
	}
	return Identity{}, fmt.Errorf("%w %d-%d (%d workers)", ErrExhausted, a.first, a.last, len(a.byUID))
}

func (a *Allocator) after(uid uint32) uint32 {
	if uid >= a.last {
		return a.first
	}
	return uid + 1
}

func (a *Allocator) take(workerID string, uid uint32) {
	a.byWorker[workerID] = uid
	a.byUID[uid] = workerID
	a.next = a.after(uid)
}

// Reserve records that workerID runs as uid (a worker adopted from an
// earlier hive). Reserving the pair it already has is a no-op; a uid
// outside the range, a uid of another worker, or a second uid for the same
// worker is an error.
func (a *Allocator) Reserve(workerID string, uid uint32) (Identity, error) {
	if workerID == "" {
		return Identity{}, errors.New("workeruser: empty worker id")
	}
	if uid < a.first || uid > a.last {
		return Identity{}, fmt.Errorf("workeruser: uid %d of worker %s is outside the range %d-%d", uid, workerID, a.first, a.last)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if owner, ok := a.byUID[uid]; ok {
		if owner == workerID {
			return a.identity(uid), nil
		}
		return Identity{}, fmt.Errorf("%w: uid %d belongs to worker %s, not %s", ErrTaken, uid, owner, workerID)
	}
	if have, ok := a.byWorker[workerID]; ok {
		return Identity{}, fmt.Errorf("%w: worker %s already has uid %d", ErrTaken, workerID, have)
	}
	a.byWorker[workerID] = uid
	a.byUID[uid] = workerID
	return a.identity(uid), nil
}

// Release frees the worker's uid (on delete, once no process of it is
// left). Releasing an unknown worker is a no-op.
func (a *Allocator) Release(workerID string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if uid, ok := a.byWorker[workerID]; ok {
		delete(a.byWorker, workerID)
		delete(a.byUID, uid)
	}
}

// WorkerOf returns the worker that owns uid: lets notify attribution check
// (or find) a sender by its kernel-verified uid.
func (a *Allocator) WorkerOf(uid uint32) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	id, ok := a.byUID[uid]
	return id, ok
}

// UIDOf returns the uid allocated to workerID.
func (a *Allocator) UIDOf(workerID string) (uint32, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	uid, ok := a.byWorker[workerID]
	return uid, ok
}
