package gpu

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// FakeDevice configures one fake GPU (e.g. from the hive's config file).
type FakeDevice struct {
	UUID string `json:"uuid" toml:"uuid"` // default GPU-fake-<index>
	Name string `json:"name" toml:"name"` // default "Fake GPU"
	// MemoryTotal is required.
	MemoryTotal    uint64 `json:"memory_total_bytes" toml:"memory_total_bytes"`
	MemoryReserved uint64 `json:"memory_reserved_bytes" toml:"memory_reserved_bytes"`
	// MemoryUsed is held by something outside the listed processes (another
	// tenant, a desktop): it lowers free memory without a process entry.
	MemoryUsed uint64        `json:"memory_used_bytes" toml:"memory_used_bytes"`
	Processes  []FakeProcess `json:"processes" toml:"processes"`
}

// FakeProcess is a process holding memory on a fake GPU.
type FakeProcess struct {
	PID        int    `json:"pid" toml:"pid"`
	UsedMemory uint64 `json:"used_memory_bytes" toml:"used_memory_bytes"`
}

// FakeOption configures a Fake.
type FakeOption func(*Fake)

// WithFreeLag makes memory of an exited process stay "used" for d before
// free memory recovers, as CUDA's free reporting lags after a kill.
func WithFreeLag(d time.Duration) FakeOption { return func(f *Fake) { f.lag = d } }

// WithClock replaces time.Now (deterministic lag tests).
func WithClock(now func() time.Time) FakeOption { return func(f *Fake) { f.now = now } }

// Fake is a GPUs driven by configuration and by its setters. It stands in
// for NVML only; everything above it runs for real.
type Fake struct {
	mu     sync.Mutex
	devs   []*fakeDev
	lag    time.Duration
	now    func() time.Time
	closed bool
}

type fakeDev struct {
	uuid, name      string
	total, reserved uint64
	other           uint64
	procs           map[int]uint64
	lagging         []lagged // memory of exited processes not yet reported free
}

type lagged struct {
	bytes uint64
	until time.Time
}

var _ GPUs = (*Fake)(nil)

// NewFake builds a Fake with one device per entry.
func NewFake(devs []FakeDevice, opts ...FakeOption) (*Fake, error) {
	f := &Fake{now: time.Now}
	for _, o := range opts {
		o(f)
	}
	for i, d := range devs {
		if d.MemoryTotal == 0 {
			return nil, fmt.Errorf("gpu: fake device %d: memory_total_bytes must be > 0", i)
		}
		fd := &fakeDev{
			uuid: d.UUID, name: d.Name, total: d.MemoryTotal, reserved: d.MemoryReserved,
			other: d.MemoryUsed, procs: make(map[int]uint64, len(d.Processes)),
		}
		if fd.uuid == "" {
			fd.uuid = fmt.Sprintf("GPU-fake-%08d-0000-0000-0000-000000000000", i)
		}
		if fd.name == "" {
			fd.name = "Fake GPU"
		}
		for _, p := range d.Processes {
			fd.procs[p.PID] += p.UsedMemory
		}
		// Compared without adding: a huge configured figure must not wrap
		// past the check and make Devices underflow total − reserved.
		if fd.reserved > fd.total || fd.used() > fd.total-fd.reserved {
			return nil, fmt.Errorf("gpu: fake device %d: reserved+used exceeds total", i)
		}
		f.devs = append(f.devs, fd)
	}
	return f, nil
}

func (d *fakeDev) used() uint64 {
	u := d.other
	for _, b := range d.procs {
		u += b
	}
	for _, l := range d.lagging {
		u += l.bytes
	}
	return u
}

// Backend implements GPUs.
func (f *Fake) Backend() string { return DriverFake }

// Devices implements GPUs.
func (f *Fake) Devices(ctx context.Context) ([]Device, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, ErrClosed
	}
	now := f.now()
	out := make([]Device, len(f.devs))
	for i, d := range f.devs {
		d.expire(now)
		used := d.used()
		var free uint64
		if avail := d.total - d.reserved; used < avail {
			free = avail - used
		}
		if used > d.total-d.reserved { // over-committed fake: saturate like a full card
			used = d.total - d.reserved
		}
		util := uint32(0)
		if len(d.procs) > 0 {
			util = 50
		}
		out[i] = Device{
			Index: i, UUID: d.uuid, Name: d.name,
			MemoryTotal: d.total, MemoryFree: free, MemoryUsed: used, MemoryReserved: d.reserved,
			UtilizationPct: &util,
		}
	}
	return out, nil
}

func (d *fakeDev) expire(now time.Time) {
	k := d.lagging[:0]
	for _, l := range d.lagging {
		if now.Before(l.until) {
			k = append(k, l)
		}
	}
	d.lagging = k
}

// Processes implements GPUs.
func (f *Fake) Processes(ctx context.Context, index int) ([]Process, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	d, err := f.dev(index)
	if err != nil {
		return nil, err
	}
	out := make([]Process, 0, len(d.procs))
	for pid, b := range d.procs {
		out = append(out, Process{PID: pid, UsedMemory: b})
	}
	sortProcs(out)
	return out, nil
}

// Close implements GPUs.
func (f *Fake) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

func (f *Fake) dev(index int) (*fakeDev, error) {
	if f.closed {
		return nil, ErrClosed
	}
	if index < 0 || index >= len(f.devs) {
		return nil, fmt.Errorf("gpu %d: %w", index, ErrNoDevice)
	}
	return f.devs[index], nil
}

// SetUsed sets the memory held outside any process on device index.
func (f *Fake) SetUsed(index int, bytes uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, err := f.dev(index)
	if err != nil {
		return err
	}
	d.other = bytes
	return nil
}

// SetProcess sets (adds or grows) pid's memory on device index, as a worker
// allocating while it loads.
func (f *Fake) SetProcess(index, pid int, bytes uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, err := f.dev(index)
	if err != nil {
		return err
	}
	d.procs[pid] = bytes
	return nil
}

// ExitProcess removes pid from device index. Its memory leaves the process
// list at once but stays counted as used for the free lag.
func (f *Fake) ExitProcess(index, pid int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, err := f.dev(index)
	if err != nil {
		return err
	}
	b, ok := d.procs[pid]
	if !ok {
		return nil
	}
	delete(d.procs, pid)
	if f.lag > 0 && b > 0 {
		d.lagging = append(d.lagging, lagged{bytes: b, until: f.now().Add(f.lag)})
	}
	return nil
}

// SetFreeLag changes the lag for processes that exit from now on.
func (f *Fake) SetFreeLag(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lag = d
}
