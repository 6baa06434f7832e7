package admission

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/procfs"
)

const (
	mib = 1 << 20
	gib = 1 << 30
)

// meminfoFixture is a /proc root holding only meminfo, rewritable mid-test.
type meminfoFixture struct {
	t   testing.TB
	dir string
}

func newMeminfo(t testing.TB, totalKB, availKB uint64) (*meminfoFixture, *procfs.Reader) {
	f := &meminfoFixture{t: t, dir: t.TempDir()}
	f.set(totalKB, availKB)
	r, err := procfs.New(f.dir)
	if err != nil {
		t.Fatal(err)
	}
	return f, r
}

func (f *meminfoFixture) set(totalKB, availKB uint64) {
	body := fmt.Sprintf("MemTotal: %d kB\nMemFree: %d kB\nMemAvailable: %d kB\n", totalKB, availKB/2, availKB)
	// Write-then-rename: concurrent readers never see a torn file.
	tmp := filepath.Join(f.dir, ".meminfo")
	if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
		f.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(f.dir, "meminfo")); err != nil {
		f.t.Fatal(err)
	}
}

func wantAPIError(t testing.TB, err error, status int, code string) *api.Error {
	t.Helper()
	var ae *api.Error
	if !errors.As(err, &ae) {
		t.Fatalf("err = %v, want *api.Error %s", err, code)
	}
	if ae.Status != status || ae.Code != code {
		t.Fatalf("err = %d %s (%s), want %d %s", ae.Status, ae.Code, ae.Message, status, code)
	}
	return ae
}

func ptr(i int) *int { return &i }

func TestAdmitMemoryRealHost(t *testing.T) {
	r, err := procfs.New("")
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.Memory()
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewLedger(Config{Memory: r, MemoryReserveBytes: 64 * mib})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_, err = l.Admit(ctx, Request{WorkerID: "w-huge", MemoryBytes: m.TotalBytes + gib})
	ae := wantAPIError(t, err, http.StatusInsufficientStorage, api.CodeInsufficientMemory)
	for _, k := range []string{"requested_bytes", "available_bytes", "reserve_bytes", "claimed_bytes"} {
		if _, ok := ae.Details[k]; !ok {
			t.Errorf("details lack %s: %v", k, ae.Details)
		}
	}
	c, err := l.Admit(ctx, Request{WorkerID: "w-small", MemoryBytes: 1 * mib})
	if err != nil {
		t.Fatalf("1 MiB on a host with %d available: %v", m.AvailableBytes, err)
	}
	c.Release()
	var nc *Claim // a nil claim (failed Admit) must be safe to release
	nc.Track(1)
	nc.Loaded()
	nc.Release()
	if got := l.Rejections()[ResourceMemory]; got != 1 {
		t.Fatalf("memory rejections = %d", got)
	}
}

func TestAdmitMemoryFixtureEdges(t *testing.T) {
	const total, avail = 16 * 1024 * 1024, 8 * 1024 * 1024 // kB: 16 GiB total, 8 GiB available
	ctx := context.Background()
	tests := []struct {
		name      string
		reserve   uint64
		claims    []uint64 // admitted first, still loading
		loaded    int      // how many of those are then Loaded
		released  int      // how many (after the loaded ones) are Released
		request   uint64
		fits      bool
		wantClaim uint64 // claimed_bytes in the rejection
	}{
		{name: "exactly fits", request: 8 * gib, fits: true},
		{name: "one byte over", request: 8*gib + 1},
		{name: "reserve counts", reserve: gib, request: 7*gib + 1},
		{name: "reserve exactly", reserve: gib, request: 7 * gib, fits: true},
		{name: "reserve above available", reserve: 9 * gib, request: 1},
		{name: "loading claims count", claims: []uint64{3 * gib, 3 * gib}, request: 3 * gib, wantClaim: 6 * gib},
		{name: "claims leave exactly enough", claims: []uint64{3 * gib, 3 * gib}, request: 2 * gib, fits: true},
		{name: "loaded claims end", claims: []uint64{3 * gib, 3 * gib}, loaded: 2, request: 8 * gib, fits: true},
		{name: "released claims end", claims: []uint64{3 * gib, 3 * gib}, loaded: 1, released: 1, request: 8 * gib, fits: true},
		{name: "zero skips the check", claims: []uint64{8 * gib}, request: 0, fits: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, r := newMeminfo(t, total, avail)
			l, err := NewLedger(Config{Memory: r, MemoryReserveBytes: tc.reserve})
			if err != nil {
				t.Fatal(err)
			}
			var cs []*Claim
			for i, b := range tc.claims {
				c, err := l.Admit(ctx, Request{WorkerID: fmt.Sprintf("w-%d", i), MemoryBytes: b})
				if err != nil {
					t.Fatal(err)
				}
				cs = append(cs, c)
			}
			for _, c := range cs[:tc.loaded] {
				c.Loaded()
				c.Loaded() // idempotent
			}
			for _, c := range cs[tc.loaded : tc.loaded+tc.released] {
				c.Release()
				c.Release()
			}
			c, err := l.Admit(ctx, Request{WorkerID: "w-new", MemoryBytes: tc.request})
			if tc.fits {
				if err != nil {
					t.Fatal(err)
				}
				c.Release()
				return
			}
			ae := wantAPIError(t, err, http.StatusInsufficientStorage, api.CodeInsufficientMemory)
			if ae.Details["requested_bytes"] != tc.request || ae.Details["available_bytes"] != uint64(avail)*1024 ||
				ae.Details["reserve_bytes"] != tc.reserve || ae.Details["claimed_bytes"] != tc.wantClaim {
				t.Fatalf("details = %v", ae.Details)
			}
		})
	}
}

func TestAdmitMemoryMissingMeminfoField(t *testing.T) {
	f, r := newMeminfo(t, 1024, 512)
	if err := os.WriteFile(filepath.Join(f.dir, "meminfo"), []byte("MemTotal: 1024 kB\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, _ := NewLedger(Config{Memory: r})
	_, err := l.Admit(context.Background(), Request{WorkerID: "w", MemoryBytes: 1})
	var ae *api.Error
	if err == nil || errors.As(err, &ae) || !errors.Is(err, procfs.ErrMissingField) {
		t.Fatalf("err = %v, want wrapped ErrMissingField", err)
	}
}

// Concurrent admissions must not both pass on the same free memory.
func TestAdmitMemoryConcurrent(t *testing.T) {
	_, r := newMeminfo(t, 64*1024*1024, 10*1024*1024) // 10 GiB available
	l, _ := NewLedger(Config{Memory: r})
	var ok atomic.Int32
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := l.Admit(context.Background(), Request{WorkerID: fmt.Sprintf("w-%d", i), MemoryBytes: 3 * gib})
			if err == nil {
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 3 {
		t.Fatalf("%d admitted, want 3 (10 GiB / 3 GiB)", ok.Load())
	}
	if l.Rejections()[ResourceMemory] != 29 {
		t.Fatalf("rejections %v", l.Rejections())
	}
}

func fakeLedger(t testing.TB, devs []gpu.FakeDevice, cfg Config, opts ...gpu.FakeOption) (*Ledger, *gpu.Fake) {
	t.Helper()
	f, err := gpu.NewFake(devs, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Memory == nil {
		_, cfg.Memory = newMeminfo(t, 256*1024*1024, 200*1024*1024)
	}
	cfg.GPUs = f
	l, err := NewLedger(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return l, f
}

func TestAdmitVRAM(t *testing.T) {
	ctx := context.Background()
	devs := []gpu.FakeDevice{{MemoryTotal: 24 * gib}, {MemoryTotal: 80 * gib, MemoryReserved: gib / 2}, {MemoryTotal: 16 * gib}}
	tests := []struct {
		name    string
		margin  uint64
		reserve uint64
		setup   func(f *gpu.Fake, l *Ledger) // before the request
		gpu     int
		vram    uint64
		fits    bool
	}{
		{name: "fits", gpu: 0, vram: 20 * gib, fits: true},
		{name: "exactly", gpu: 0, vram: 24 * gib, fits: true},
		{name: "margin pushes over", gpu: 0, vram: 23 * gib, margin: gib + 1},
		{name: "reserve pushes over", gpu: 0, vram: 23 * gib, reserve: gib + 1},
		{name: "driver-reserved memory is not free", gpu: 1, vram: 80 * gib},
		{name: "other GPU is untouched", gpu: 2, vram: 16 * gib, fits: true,
			setup: func(f *gpu.Fake, l *Ledger) { mustAdmit(t, l, 0, 24*gib) }},
		{name: "loading claim blocks", gpu: 0, vram: 5 * gib,
			setup: func(f *gpu.Fake, l *Ledger) { mustAdmit(t, l, 0, 20*gib) }},
		{name: "two loading claims", gpu: 1, vram: 30 * gib,
			setup: func(f *gpu.Fake, l *Ledger) { mustAdmit(t, l, 1, 25*gib); mustAdmit(t, l, 1, 25*gib) }},
		{name: "outside user plus loading claim", gpu: 0, vram: 8 * gib,
			// min(free, total − claims) alone would admit: min(14, 14) = 14 ≥ 8.
			// The claim is not in free yet, so only 4 GiB remain.
			setup: func(f *gpu.Fake, l *Ledger) { _ = f.SetUsed(0, 10*gib); mustAdmit(t, l, 0, 10*gib) }},
		{name: "no such gpu", gpu: 7, vram: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, f := fakeLedger(t, devs, Config{VRAMMarginBytes: tc.margin, VRAMReserveBytes: tc.reserve, VRAMRecoveryWait: -1})
			if tc.setup != nil {
				tc.setup(f, l)
			}
			c, err := l.Admit(ctx, Request{WorkerID: "w-x", GPU: ptr(tc.gpu), VRAMBytes: tc.vram})
			if tc.gpu == 7 {
				wantAPIError(t, err, http.StatusBadRequest, api.CodeValidation)
				return
			}
			if tc.fits {
				if err != nil {
					t.Fatal(err)
				}
				c.Release()
				return
			}
			ae := wantAPIError(t, err, http.StatusInsufficientStorage, api.CodeInsufficientVRAM)
			if ae.Details["gpu"] != tc.gpu || ae.Details["requested_bytes"] != tc.vram+tc.margin {
				t.Fatalf("details %v", ae.Details)
			}
		})
	}
}

func mustAdmit(t testing.TB, l *Ledger, g int, vram uint64) *Claim {
	t.Helper()
	c, err := l.Admit(context.Background(), Request{WorkerID: "w-setup", GPU: &g, VRAMBytes: vram})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAdmitVRAMNoGPUs(t *testing.T) {
	_, r := newMeminfo(t, 1024, 512)
	for _, g := range []gpu.GPUs{nil, gpu.None{}} {
		l, _ := NewLedger(Config{Memory: r, GPUs: g})
		_, err := l.Admit(context.Background(), Request{WorkerID: "w", GPU: ptr(0), VRAMBytes: 1})
		wantAPIError(t, err, http.StatusBadRequest, api.CodeValidation)
	}
}

// A loaded worker's claim gives way to its real usage as NVML reports it,
// and settles after VRAMSettle when NVML never lists it.
func TestVRAMClaimFollowsRealUsage(t *testing.T) {
	ctx := context.Background()
	var mu sync.Mutex
	now := time.Unix(5000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	l, f := fakeLedger(t, []gpu.FakeDevice{{MemoryTotal: 24 * gib}}, Config{VRAMSettle: 10 * time.Second, VRAMRecoveryWait: -1, Now: clock})

	admissible := func() uint64 { return l.Resources(ctx).GPUs[0].AdmissibleBytes }
	c := mustAdmit(t, l, 0, 10*gib)
	c.Track(100)
	if a := admissible(); a != 14*gib {
		t.Fatalf("after admit: %d", a)
	}
	_ = f.SetProcess(0, 100, 4*gib) // loading: part of the claim now shows in free
	if a := admissible(); a != 14*gib {
		t.Fatalf("while loading: admissible %d, want 14 GiB (claim not double-counted)", a)
	}
	_ = f.SetProcess(0, 101, 8*gib) // a forked child holds the rest
	c.Loaded(101)
	if a := admissible(); a != 12*gib {
		t.Fatalf("loaded, real 12 GiB > estimate: admissible %d, want 12 GiB", a)
	}
	ps, _ := f.Processes(ctx, 0)
	if gpu.UsedBy(ps, []int{100, 101}) != 12*gib {
		t.Fatalf("per-process VRAM %v", ps)
	}

	// A second worker that NVML never lists (e.g. MIG without privileges).
	c2 := mustAdmit(t, l, 0, 4*gib)
	_ = f.SetUsed(0, 4*gib)
	c2.Loaded(999)
	if a := admissible(); a != 4*gib {
		t.Fatalf("unlisted worker before settle: %d, want 4 GiB (conservative)", a)
	}
	mu.Lock()
	now = now.Add(10 * time.Second)
	mu.Unlock()
	if a := admissible(); a != 8*gib {
		t.Fatalf("after settle: %d, want 8 GiB (NVML free alone)", a)
	}
	if cl := l.Claims(); len(cl) != 2 || cl[0].State != "loaded" || *cl[0].GPU != 0 {
		t.Fatalf("claims %+v", cl)
	}
	c.Release()
	c2.Release()
	if len(l.Claims()) != 0 {
		t.Fatal("claims left")
	}
}

// After a kill CUDA's free memory lags: an admission right after a release
// waits for recovery instead of failing; without a recent release it fails
// at once.
func TestVRAMLaggingFreeAfterKill(t *testing.T) {
	ctx := context.Background()
	l, f := fakeLedger(t, []gpu.FakeDevice{{MemoryTotal: 24 * gib}},
		Config{VRAMRecoveryWait: 3 * time.Second, VRAMPoll: 10 * time.Millisecond, VRAMSettle: time.Millisecond},
		gpu.WithFreeLag(200*time.Millisecond))

	c := mustAdmit(t, l, 0, 20*gib)
	_ = f.SetProcess(0, 100, 20*gib)
	c.Loaded(100)

	// Nothing released yet: a 20 GiB request fails at once.
	start := time.Now()
	_, err := l.Admit(ctx, Request{WorkerID: "w-b", GPU: ptr(0), VRAMBytes: 20 * gib})
	wantAPIError(t, err, http.StatusInsufficientStorage, api.CodeInsufficientVRAM)
	if d := time.Since(start); d > 150*time.Millisecond {
		t.Fatalf("rejection without a recent release took %v", d)
	}

	// Kill: the process leaves the list, free memory lags 200 ms.
	_ = f.ExitProcess(0, 100)
	c.Release()
	start = time.Now()
	c2, err := l.Admit(ctx, Request{WorkerID: "w-b", GPU: ptr(0), VRAMBytes: 20 * gib})
	if err != nil {
		t.Fatalf("admission after kill: %v", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("admitted after %v: free memory had not recovered yet", d)
	}
	c2.Release()

	// A request that never fits gives up when ctx ends.
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = l.Admit(cctx, Request{WorkerID: "w-c", GPU: ptr(0), VRAMBytes: 30 * gib})
	wantAPIError(t, err, http.StatusInsufficientStorage, api.CodeInsufficientVRAM)
}

// Several GPUs, many concurrent spawns: per GPU exactly as many pass as fit.
func TestAdmitVRAMConcurrent(t *testing.T) {
	l, _ := fakeLedger(t, []gpu.FakeDevice{{MemoryTotal: 24 * gib}, {MemoryTotal: 80 * gib}, {MemoryTotal: 48 * gib}},
		Config{VRAMMarginBytes: gib, VRAMRecoveryWait: -1})
	var admitted [3]atomic.Int32
	var wg sync.WaitGroup
	for i := range 60 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g := i % 3
			// 7 GiB + 1 GiB margin = 8 GiB each; RAM 1 GiB each also checked.
			_, err := l.Admit(context.Background(), Request{WorkerID: fmt.Sprintf("w-%d", i), GPU: &g, VRAMBytes: 7 * gib, MemoryBytes: gib})
			if err == nil {
				admitted[g].Add(1)
			} else {
				wantAPIError(t, err, http.StatusInsufficientStorage, api.CodeInsufficientVRAM)
			}
		}()
	}
	wg.Wait()
	for g, want := range []int32{3, 10, 6} {
		if got := admitted[g].Load(); got != want {
			t.Errorf("gpu %d: %d admitted, want %d", g, got, want)
		}
	}
	if got := l.Rejections()[ResourceVRAM]; got != 60-19 {
		t.Errorf("vram rejections %d", got)
	}
	if _, err := json.Marshal(l.Resources(context.Background())); err != nil {
		t.Fatal(err)
	}
}

func TestAdmitWaitsForGPULockWithContext(t *testing.T) {
	l, _ := fakeLedger(t, []gpu.FakeDevice{{MemoryTotal: gib}}, Config{})
	unlock, err := l.lockGPU(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := l.Admit(ctx, Request{WorkerID: "w", GPU: ptr(0), VRAMBytes: 1}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
}

func TestLedgerCheckDiskCounts(t *testing.T) {
	l, _ := fakeLedger(t, []gpu.FakeDevice{{MemoryTotal: gib}}, Config{})
	dir := t.TempDir()
	if err := l.CheckDisk(dir, 1, 0); err != nil {
		t.Fatal(err)
	}
	wantAPIError(t, l.CheckDisk(dir, 1<<62, 0), http.StatusInsufficientStorage, api.CodeInsufficientDisk)
	if got := l.Rejections()[ResourceDisk]; got != 1 {
		t.Fatalf("disk rejections %d", got)
	}
	if _, err := NewLedger(Config{}); err == nil {
		t.Fatal("NewLedger without Memory succeeded")
	}
}

func writeFile(path, body string) error { return os.WriteFile(path, []byte(body), 0o600) }

// TestAdmitMemoryLimits: workers with 2 GiB limits that use little at READY.
// By usage the ledger admits all 14 against 19 GiB admissible, overcommitting
// the host once they grow; by limits it admits 9 (18 GiB), refuses the 10th,
// and takes one again once a worker's claim is released.
func TestAdmitMemoryLimits(t *testing.T) {
	const total, avail = 21 * 1024 * 1024, 21 * 1024 * 1024 // kB
	ctx := context.Background()
	tests := []struct {
		mode     MemoryMode
		admitted int
	}{
		{MemoryUsage, 14},
		{MemoryLimits, 9},
	}
	for _, tc := range tests {
		t.Run(tc.mode.String(), func(t *testing.T) {
			_, r := newMeminfo(t, total, avail)
			l, err := NewLedger(Config{Memory: r, MemoryReserveBytes: 2 * gib, MemoryMode: tc.mode})
			if err != nil {
				t.Fatal(err)
			}
			var cs []*Claim
			var refused error
			for i := 0; i < 14; i++ {
				c, err := l.Admit(ctx, Request{WorkerID: fmt.Sprintf("w-%d", i), MemoryBytes: 2 * gib})
				if err != nil {
					refused = err
					break
				}
				c.Loaded() // ready, using little: MemAvailable barely moves
				cs = append(cs, c)
			}
			if len(cs) != tc.admitted {
				t.Fatalf("admitted %d workers with 2GiB limits, want %d", len(cs), tc.admitted)
			}
			if tc.mode == MemoryUsage {
				return
			}
			ae := wantAPIError(t, refused, http.StatusInsufficientStorage, api.CodeInsufficientMemory)
			if ae.Details["limits_bytes"] != uint64(18*gib) || ae.Details["admissible_bytes"] != uint64(gib) ||
				ae.Details["memory_admission"] != "limits" {
				t.Fatalf("details = %v", ae.Details)
			}
			if res := l.Resources(ctx); res.Memory.Admission != "limits" || res.Memory.LimitsBytes != 18*gib || res.Memory.AdmissibleBytes != gib {
				t.Errorf("resources = %+v", res.Memory)
			}
			cs[0].Release()
			cs[0].Release()
			if _, err := l.Admit(ctx, Request{WorkerID: "w-again", MemoryBytes: 2 * gib}); err != nil {
				t.Fatalf("after a release: %v", err)
			}
		})
	}
}

// TestAdmitMemoryLimitsStillChecksUsage: memory held outside the hive is
// not admissible in limits mode either.
func TestAdmitMemoryLimitsStillChecksUsage(t *testing.T) {
	_, r := newMeminfo(t, 32*1024*1024, 3*1024*1024) // 32 GiB total, 3 GiB available
	l, err := NewLedger(Config{Memory: r, MemoryReserveBytes: 2 * gib, MemoryMode: MemoryLimits})
	if err != nil {
		t.Fatal(err)
	}
	_, err = l.Admit(context.Background(), Request{WorkerID: "w", MemoryBytes: 2 * gib})
	ae := wantAPIError(t, err, http.StatusInsufficientStorage, api.CodeInsufficientMemory)
	if ae.Details["admissible_bytes"] != uint64(gib) {
		t.Fatalf("details = %v", ae.Details)
	}
}
