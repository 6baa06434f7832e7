package router

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// simBin is rbee-simworker built once for the package's tests.
var simBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "router-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	simBin = filepath.Join(dir, "rbee-simworker")
	out, err := exec.Command("go", "build", "-o", simBin, "github.com/rbee/rbee-hive/cmd/rbee-simworker").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build rbee-simworker: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// simModel is how the fake hive runs a served model's workers.
type simModel struct {
	memMiB   int           // charged against the fake GPU
	loadTime time.Duration // --load-time
	tps      float64       // --tokens-per-second; 0: unpaced
	slots    int
}

// fakeHive is the hive side over real rbee-simworker processes: admission
// against a fake GPU of capMiB, spawn on a free port, readiness by polling
// /health (503 while loading), stop by SIGTERM. Only the GPU is fake.
type fakeHive struct {
	t      testing.TB
	capMiB int
	models map[string]simModel

	mu     sync.Mutex
	procs  map[string]*proc
	next   int
	spawns map[string]int
	last   coldTimes // timings of the latest successful spawn
}

type proc struct {
	id, served string
	cmd        *exec.Cmd
	url        *url.URL
	state      State
	mem        int
	exited     chan struct{}
}

// coldTimes splits a spawn: admission, fork/exec, and exec to /health 200.
type coldTimes struct{ admit, exec, load time.Duration }

func newFakeHive(t testing.TB, capMiB int, models map[string]simModel) *fakeHive {
	h := &fakeHive{t: t, capMiB: capMiB, models: models, procs: map[string]*proc{}, spawns: map[string]int{}}
	t.Cleanup(h.killAll)
	return h
}

func (h *fakeHive) Workers(_ context.Context, served string) ([]Worker, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []Worker
	for _, p := range h.procs {
		if p.served == served {
			out = append(out, Worker{ID: p.id, URL: p.url, State: p.state, Slots: h.models[served].slots})
		}
	}
	return out, nil
}

func (h *fakeHive) Spawn(ctx context.Context, served string) (Worker, error) {
	t0 := time.Now()
	sm, ok := h.models[served]
	if !ok {
		return Worker{}, fmt.Errorf("no such served model %q", served)
	}
	h.mu.Lock()
	used := 0
	for _, p := range h.procs {
		used += p.mem
	}
	if used+sm.memMiB > h.capMiB {
		h.mu.Unlock()
		return Worker{}, &NoRoomError{Resource: "vram", Detail: fmt.Sprintf("needs %d MiB, %d of %d MiB free", sm.memMiB, h.capMiB-used, h.capMiB)}
	}
	h.next++
	p := &proc{id: fmt.Sprintf("w%d-%s", h.next, served), served: served, state: StateLoading, mem: sm.memMiB, exited: make(chan struct{})}
	h.procs[p.id] = p // admitted: its memory counts from now
	h.spawns[served]++
	h.mu.Unlock()
	admit := time.Since(t0)

	fail := func(err error) (Worker, error) {
		h.mu.Lock()
		delete(h.procs, p.id)
		h.mu.Unlock()
		return Worker{}, err
	}
	// --port 0 and the address the worker logs: a port picked here could
	// be taken by another process before the worker binds it.
	pr, pw, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	defer pr.Close()
	cmd := exec.Command(simBin, "--port", "0", "--worker-id", p.id, "--model", served,
		"--load-time", sm.loadTime.String(), "--tokens-per-second", strconv.FormatFloat(sm.tps, 'f', -1, 64))
	cmd.Env = []string{} // no NOTIFY_SOCKET: readiness is /health
	cmd.Stderr = pw
	t1 := time.Now()
	h.mu.Lock()
	err = cmd.Start()
	if err == nil {
		p.cmd = cmd
	}
	h.mu.Unlock()
	pw.Close()
	if err != nil {
		return fail(err)
	}
	execd := time.Since(t1)
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			if !strings.Contains(line, "msg=listening ") {
				continue
			}
			if _, a, ok := strings.Cut(line, " addr="); ok && len(strings.Fields(a)) > 0 {
				addrc <- strings.Fields(a)[0]
				break
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	go func() {
		_ = cmd.Wait()
		h.mu.Lock()
		delete(h.procs, p.id) // a crashed worker is gone, as after a failed restart
		h.mu.Unlock()
		close(p.exited)
	}()
	t2 := time.Now()
	select {
	case a := <-addrc:
		h.mu.Lock()
		p.url = &url.URL{Scheme: "http", Host: a}
		h.mu.Unlock()
	case <-p.exited:
		return Worker{}, fmt.Errorf("worker %s exited before listening", p.id)
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		<-p.exited
		return Worker{}, fmt.Errorf("worker %s not listening: %w", p.id, ctx.Err())
	}
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.url.JoinPath("/health").String(), nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case <-ctx.Done():
			_ = cmd.Process.Kill()
			<-p.exited
			return Worker{}, fmt.Errorf("worker %s not ready: %w", p.id, ctx.Err())
		case <-p.exited:
			return Worker{}, fmt.Errorf("worker %s exited while loading", p.id)
		case <-time.After(2 * time.Millisecond):
		}
	}
	h.mu.Lock()
	p.state = StateReady
	h.last = coldTimes{admit: admit, exec: execd, load: time.Since(t2)}
	w := Worker{ID: p.id, URL: p.url, State: StateReady, Slots: sm.slots}
	h.mu.Unlock()
	return w, nil
}

func (h *fakeHive) Stop(ctx context.Context, id string) error {
	h.mu.Lock()
	p := h.procs[id]
	var cmd *exec.Cmd
	if p != nil {
		p.state = StateOther
		cmd = p.cmd
	}
	h.mu.Unlock()
	if p == nil || cmd == nil {
		return fmt.Errorf("no running worker %s", id)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		<-p.exited
		return errors.Join(errors.New("killed after the stop timeout"), ctx.Err())
	}
}

// kill crashes a worker: SIGKILL, no drain.
func (h *fakeHive) kill(id string) {
	h.mu.Lock()
	p := h.procs[id]
	h.mu.Unlock()
	if p != nil && p.cmd != nil {
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

func (h *fakeHive) killAll() {
	h.mu.Lock()
	var ps []*proc
	for _, p := range h.procs {
		if p.cmd != nil && p.cmd.Process != nil {
			ps = append(ps, p)
		}
	}
	h.mu.Unlock()
	for _, p := range ps {
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// ids returns the live workers of served.
func (h *fakeHive) ids(served string) []string {
	ws, _ := h.Workers(context.Background(), served)
	var out []string
	for _, w := range ws {
		out = append(out, w.ID)
	}
	return out
}

func (h *fakeHive) spawnCount(served string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.spawns[served]
}
