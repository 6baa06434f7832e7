// Command peers runs the hive against peers in one invocation and prints one
// ratio per line (hive / peer) plus the raw numbers:
//
//  1. crash → restarted: SIGKILL of a running worker until a new process runs
//     the worker binary again (exe is rbee-simworker: on cgroup v1 the spawn
//     gate is not counted), hive vs supervisord, kills interleaved, median;
//  2. idle: the hive at its shipped defaults with N rbee-simworkers (health
//     notify, so they heartbeat as in production) and supervisord with the
//     same N rbee-simworker programs, both running over the same window;
//     CPU of the supervising process only (workers excluded), RSS, threads;
//  3. heartbeat: a hive whose N workers ping at 10 Hz (stale_threshold
//     200ms) vs a raw Go unixgram receiver loop (SO_PASSCRED, ReadMsgUnix)
//     fed by N more rbee-simworkers at the same rate, over the same window;
//     CPU per datagram.
//
// CPU is the sum of the per-thread run time in /proc/<pid>/task/*/schedstat
// (nanoseconds; /proc/<pid>/stat ticks are 10 ms, too coarse for an idle
// supervisord). Both sides of each ratio run at the same time on the same
// machine, so load from other work hits both.
//
// Usage (root; bench/peers.sh builds and installs first):
//
//	go run ./bench/peers -bin bin [-workers 100] [-kills 10] [-window 30s]
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

type options struct {
	bin     string // directory with rbee-hive and rbee-simworker
	workers int
	kills   int
	window  time.Duration
	phases  string
}

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "bin", "directory holding rbee-hive and rbee-simworker")
	flag.IntVar(&o.workers, "workers", 100, "idle workers per side")
	flag.IntVar(&o.kills, "kills", 10, "crash → restart samples per side")
	flag.DurationVar(&o.window, "window", 30*time.Second, "CPU measurement window")
	flag.StringVar(&o.phases, "phases", "crash,idle,heartbeat", "phases to run")
	role := flag.String("role", "", "internal: raw-receiver")
	sock := flag.String("sock", "", "internal: socket path")
	flag.Parse()
	var err error
	if *role == "raw-receiver" {
		err = rawReceiver(*sock)
	} else {
		err = run(o)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "peers:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	abs, err := filepath.Abs(o.bin)
	if err != nil {
		return err
	}
	o.bin = abs
	for _, b := range []string{"rbee-hive", "rbee-simworker"} {
		if _, err := os.Stat(filepath.Join(o.bin, b)); err != nil {
			return fmt.Errorf("%w (run make build)", err)
		}
	}
	if _, err := exec.LookPath("supervisord"); err != nil {
		return fmt.Errorf("supervisord: %w (apt-get install supervisor)", err)
	}
	fmt.Printf("# peers: %d workers, %d kills, window %s, load average %s\n", o.workers, o.kills, o.window, loadavg())
	for _, p := range strings.Split(o.phases, ",") {
		switch p {
		case "crash":
			err = crashPhase(o)
		case "idle":
			err = idlePhase(o)
		case "heartbeat":
			err = heartbeatPhase(o)
		default:
			err = fmt.Errorf("unknown phase %q", p)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	}
	fmt.Printf("# load average at the end %s\n", loadavg())
	return nil
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func ratio(name string, hive, peer float64, unit, peerName string) {
	r := "n/a"
	if peer > 0 {
		r = fmt.Sprintf("%.2fx", hive/peer)
	}
	fmt.Printf("hive/%s %s %s   (hive %.4g %s, %s %.4g %s)\n", peerName, name, r, hive, unit, peerName, peer, unit)
}

// --- process figures -------------------------------------------------------

// cpuNS sums the run time of pid's live threads.
func cpuNS(pid int) (int64, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue // thread exited
		}
		f := strings.Fields(string(b))
		if len(f) > 0 {
			n, _ := strconv.ParseInt(f[0], 10, 64)
			sum += n
		}
	}
	return sum, nil
}

// status reads VmRSS (KiB), RssAnon (KiB) and Threads of pid.
func status(pid int) (rss, anon, threads int64) {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.Fields(v + " 0")[0], 10, 64)
		switch k {
		case "VmRSS":
			rss = n
		case "RssAnon":
			anon = n
		case "Threads":
			threads = n
		}
	}
	return
}

// children lists pid's direct children.
func children(pid int) []int {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var out []int
	for _, t := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		for _, f := range strings.Fields(string(b)) {
			n, _ := strconv.Atoi(f)
			out = append(out, n)
		}
	}
	return out
}

// workerChildren lists pid's children that run exe (not a gate still
// waiting to exec it).
func workerChildren(pid int, exe string) []int {
	var out []int
	for _, c := range children(pid) {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", c)); err == nil && l == exe {
			out = append(out, c)
		}
	}
	return out
}

func waitUntil(d time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// --- the hive --------------------------------------------------------------

type hive struct {
	cmd   *exec.Cmd
	url   string
	token string
	dir   string
	root  string
	model string
	logs  bytes.Buffer
	done  chan struct{}
}

func randomName(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startHive starts bin/rbee-hive with only the settings a test needs
// (addresses, directories, cgroup root, the backend) plus extra.
func startHive(o options, extra string) (*hive, error) {
	dir, err := os.MkdirTemp("", "rbee-peers-")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	h := &hive{dir: dir, url: fmt.Sprintf("http://127.0.0.1:%d", port), root: randomName("rbee-peers-"), done: make(chan struct{})}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		h.root = "/sys/fs/cgroup/" + h.root
	}
	// Below model_dir, the default models.file_roots.
	h.model = filepath.Join(dir, "state", "models", "model.gguf")
	if err := os.MkdirAll(filepath.Dir(h.model), 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(h.model, []byte("rbee-simworker placeholder model\n"), 0o644); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`listen = "127.0.0.1:%d"
state_dir = %q
runtime_dir = %q
log_format = "json"

[cgroup]
root = %q

[workers]
port_min = 30000
port_max = 39999

[backends.peer]
command = ["%s/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}"]
health = "notify"
load_timeout = "120s"
memory_limit = "64MiB"
%s`, port, filepath.Join(dir, "state"), filepath.Join(dir, "rt"), h.root, o.bin, extra)
	cfgPath := filepath.Join(dir, "hive.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	h.cmd = exec.Command(filepath.Join(o.bin, "rbee-hive"), "daemon", "--config", cfgPath)
	h.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + dir}
	h.cmd.Stdout, h.cmd.Stderr = io.Discard, &h.logs
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := h.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = h.cmd.Wait(); close(h.done) }()
	err = waitUntil(30*time.Second, "hive health", func() bool {
		resp, err := http.Get(h.url + "/v1/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	if err != nil {
		h.stop()
		return nil, fmt.Errorf("%w\n%s", err, h.logs.String())
	}
	tok, err := os.ReadFile(filepath.Join(dir, "state", "api-token"))
	if err != nil {
		h.stop()
		return nil, err
	}
	h.token = strings.TrimSpace(string(tok))
	return h, nil
}

func (h *hive) call(method, path string, body any) (int, []byte, error) {
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(context.Background(), method, h.url+path, r)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+h.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func (h *hive) spawn(n int) error {
	for range n {
		code, b, err := h.call("POST", "/v1/workers/spawn", map[string]any{"model_ref": "file:" + h.model, "backend": "peer", "device": 0})
		if err != nil || code != 200 {
			return fmt.Errorf("spawn: %d %s %v", code, b, err)
		}
	}
	return nil
}

// ready counts workers in state idle.
func (h *hive) ready() int {
	code, b, err := h.call("GET", "/v1/workers/list", nil)
	if err != nil || code != 200 {
		return -1
	}
	return strings.Count(string(b), `"state":"idle"`)
}

// heartbeats reads rbee_hive_heartbeats_total.
func (h *hive) heartbeats() float64 {
	_, b, _ := h.call("GET", "/metrics", nil)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "rbee_hive_heartbeats_total "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return -1
}

func (h *hive) pid() int { return h.cmd.Process.Pid }

func (h *hive) stop() {
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.done:
	case <-time.After(40 * time.Second):
		_ = h.cmd.Process.Kill()
		<-h.done
	}
	removeCgroupRoot(h.root)
	os.RemoveAll(h.dir)
}

// removeCgroupRoot removes what is left of a hive's cgroup root: on v2 the
// path itself, on v1 the relative root under this process's cgroup in every
// hierarchy (deepest first; leaves are empty once the hive has stopped).
func removeCgroupRoot(root string) {
	var tops []string
	if filepath.IsAbs(root) {
		tops = []string{root}
	} else {
		b, _ := os.ReadFile("/proc/self/cgroup")
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			f := strings.SplitN(l, ":", 3)
			if len(f) != 3 || f[1] == "" {
				continue
			}
			name := strings.TrimPrefix(f[1], "name=")
			tops = append(tops, filepath.Join("/sys/fs/cgroup", name, f[2], root))
		}
	}
	for _, t := range tops {
		var dirs []string
		_ = filepath.WalkDir(t, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.Reverse(dirs)
		for _, d := range dirs {
			_ = os.Remove(d)
		}
	}
}

// --- supervisord -----------------------------------------------------------

type supervisord struct {
	cmd  *exec.Cmd
	dir  string
	done chan struct{}
}

// startSupervisord runs supervisord in the foreground with n programs, each
// rbee-simworker on its own port, at supervisord's defaults otherwise
// (autorestart, startsecs=1, output captured to log files as the hive does).
func startSupervisord(o options, n, basePort int) (*supervisord, error) {
	dir, err := os.MkdirTemp("", "rbee-peers-sd-")
	if err != nil {
		return nil, err
	}
	var c strings.Builder
	fmt.Fprintf(&c, "[supervisord]\nnodaemon=true\nlogfile=%s/supervisord.log\npidfile=%s/supervisord.pid\nchildlogdir=%s\n\n", dir, dir, dir)
	fmt.Fprintf(&c, "[unix_http_server]\nfile=%s/sock\n\n[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n", dir)
	for i := range n {
		fmt.Fprintf(&c, "[program:w%d]\ncommand=%s/rbee-simworker --port %d --worker-id w%d --model %s/model.gguf\nautorestart=true\n\n", i, o.bin, basePort+i, i, dir)
	}
	conf := filepath.Join(dir, "supervisord.conf")
	if err := os.WriteFile(conf, []byte(c.String()), 0o600); err != nil {
		return nil, err
	}
	s := &supervisord{dir: dir, done: make(chan struct{})}
	s.cmd = exec.Command("supervisord", "-n", "-c", conf)
	s.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + dir}
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = s.cmd.Wait(); close(s.done) }()
	exe := filepath.Join(o.bin, "rbee-simworker")
	if err := waitUntil(120*time.Second, "supervisord programs", func() bool { return len(workerChildren(s.cmd.Process.Pid, exe)) == n }); err != nil {
		s.stop()
		return nil, err
	}
	return s, nil
}

func (s *supervisord) pid() int { return s.cmd.Process.Pid }

func (s *supervisord) stop() {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(40 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
	os.RemoveAll(s.dir)
}

// --- phases ----------------------------------------------------------------

// killAndTime kills the one worker of parent and returns the time until a new
// process runs exe.
func killAndTime(parent int, exe string) (time.Duration, error) {
	ws := workerChildren(parent, exe)
	if len(ws) != 1 {
		return 0, fmt.Errorf("want 1 worker child of %d, have %v", parent, ws)
	}
	old := ws[0]
	t0 := time.Now()
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		return 0, err
	}
	for {
		for _, c := range workerChildren(parent, exe) {
			if c != old {
				return time.Since(t0), nil
			}
		}
		if time.Since(t0) > 30*time.Second {
			return 0, fmt.Errorf("no restart of %d within 30s", old)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func crashPhase(o options) error {
	// The smallest restart delay the hive accepts (10ms), no jitter, and a
	// breaker that never trips; supervisord at its defaults (it restarts a
	// RUNNING program that died on its next loop tick, without backoff).
	h, err := startHive(o, `
[workers.restart]
backoff_base = "10ms"
backoff_max = "10ms"
jitter = 0.0
max_failures = 100000
`)
	if err != nil {
		return err
	}
	defer h.stop()
	s, err := startSupervisord(o, 1, 40999)
	if err != nil {
		return err
	}
	defer s.stop()
	if err := h.spawn(1); err != nil {
		return err
	}
	exe := filepath.Join(o.bin, "rbee-simworker")
	var hd, sd []time.Duration
	for i := range o.kills {
		if err := waitUntil(60*time.Second, "hive worker ready", func() bool { return h.ready() == 1 }); err != nil {
			return err
		}
		d, err := killAndTime(h.pid(), exe)
		if err != nil {
			return fmt.Errorf("hive kill %d: %w", i, err)
		}
		hd = append(hd, d)
		time.Sleep(1200 * time.Millisecond) // past startsecs=1: RUNNING again
		d, err = killAndTime(s.pid(), exe)
		if err != nil {
			return fmt.Errorf("supervisord kill %d: %w", i, err)
		}
		sd = append(sd, d)
	}
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	fmt.Printf("# crash→restarted (new process running the worker binary), %d kills each: hive %v, supervisord %v\n", o.kills, round(hd), round(sd))
	ratio("crash_restart_median", ms(median(hd)), ms(median(sd)), "ms", "supervisord")
	return nil
}

func round(ds []time.Duration) []string {
	var out []string
	for _, d := range ds {
		out = append(out, fmt.Sprintf("%.1fms", float64(d)/1e6))
	}
	return out
}

type sample struct {
	cpu              int64
	rss, anon, thrds int64
}

func measure(pids []int, window time.Duration) ([]sample, error) {
	before := make([]int64, len(pids))
	for i, p := range pids {
		c, err := cpuNS(p)
		if err != nil {
			return nil, err
		}
		before[i] = c
	}
	time.Sleep(window)
	out := make([]sample, len(pids))
	for i, p := range pids {
		c, err := cpuNS(p)
		if err != nil {
			return nil, err
		}
		out[i].cpu = c - before[i]
		out[i].rss, out[i].anon, out[i].thrds = status(p)
	}
	return out, nil
}

func idlePhase(o options) error {
	h, err := startHive(o, "")
	if err != nil {
		return err
	}
	defer h.stop()
	s, err := startSupervisord(o, o.workers, 41000)
	if err != nil {
		return err
	}
	defer s.stop()
	if err := h.spawn(o.workers); err != nil {
		return err
	}
	if err := waitUntil(5*time.Minute, "hive workers ready", func() bool { return h.ready() == o.workers }); err != nil {
		return err
	}
	time.Sleep(3 * time.Second) // start-up work settles
	m, err := measure([]int{h.pid(), s.pid()}, o.window)
	if err != nil {
		return err
	}
	pct := func(ns int64) float64 { return float64(ns) / float64(o.window.Nanoseconds()) * 100 }
	fmt.Printf("# idle, %d workers each, %s window: hive threads %d, supervisord threads %d\n", o.workers, o.window, m[0].thrds, m[1].thrds)
	ratio("idle_cpu", pct(m[0].cpu), pct(m[1].cpu), "% of a core", "supervisord")
	ratio("idle_rss", float64(m[0].rss)/1024, float64(m[1].rss)/1024, "MiB", "supervisord")
	ratio("idle_rss_anon", float64(m[0].anon)/1024, float64(m[1].anon)/1024, "MiB", "supervisord")
	return nil
}

func heartbeatPhase(o options) error {
	h, err := startHive(o, `
[heartbeat]
interval = "100ms"
stale_threshold = "200ms"
stale_action = "mark"
`)
	if err != nil {
		return err
	}
	defer h.stop()
	// The raw receiver and its senders.
	dir, err := os.MkdirTemp("", "rbee-peers-raw-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "notify")
	self, err := os.Executable()
	if err != nil {
		return err
	}
	rx := exec.Command(self, "-role", "raw-receiver", "-sock", sock)
	rx.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	rxIn, _ := rx.StdinPipe()
	rxOut, _ := rx.StdoutPipe()
	rx.Stderr = os.Stderr
	if err := rx.Start(); err != nil {
		return err
	}
	defer func() { _ = rx.Process.Kill(); _ = rx.Wait() }()
	rxLines := bufio.NewScanner(rxOut)
	if !rxLines.Scan() { // "ready"
		return fmt.Errorf("raw receiver did not start")
	}
	count := func() float64 {
		_, _ = io.WriteString(rxIn, "\n")
		if !rxLines.Scan() {
			return -1
		}
		f, _ := strconv.ParseFloat(rxLines.Text(), 64)
		return f
	}
	var senders []*exec.Cmd
	defer func() {
		for _, c := range senders {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}()
	for i := range o.workers {
		c := exec.Command(filepath.Join(o.bin, "rbee-simworker"), "--worker-id", fmt.Sprintf("raw%d", i))
		c.Env = []string{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=200000"}
		c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := c.Start(); err != nil {
			return err
		}
		senders = append(senders, c)
	}
	if err := h.spawn(o.workers); err != nil {
		return err
	}
	if err := waitUntil(5*time.Minute, "hive workers ready", func() bool { return h.ready() == o.workers }); err != nil {
		return err
	}
	time.Sleep(3 * time.Second)
	hb0, rc0 := h.heartbeats(), count()
	m, err := measure([]int{h.pid(), rx.Process.Pid}, o.window)
	if err != nil {
		return err
	}
	hb1, rc1 := h.heartbeats(), count()
	hn, rn := hb1-hb0, rc1-rc0
	if hn <= 0 || rn <= 0 {
		return fmt.Errorf("no datagrams counted (hive %v, raw %v)", hn, rn)
	}
	fmt.Printf("# heartbeat, %d workers × 10 Hz each side, %s window: hive %.0f datagrams, %.2f %% of a core; raw %.0f datagrams, %.2f %% of a core\n",
		o.workers, o.window, hn, float64(m[0].cpu)/float64(o.window.Nanoseconds())*100, rn, float64(m[1].cpu)/float64(o.window.Nanoseconds())*100)
	ratio("heartbeat_cpu_per_datagram", float64(m[0].cpu)/hn/1e3, float64(m[1].cpu)/rn/1e3, "µs", "raw_receiver")
	return nil
}

// rawReceiver is the baseline: a unixgram socket with SO_PASSCRED (the hive
// attributes by the sender's pid, so the kernel attaches credentials for
// both) read in a plain ReadMsgUnix loop. A line on stdin asks for the count.
func rawReceiver(sock string) error {
	addr := &net.UnixAddr{Name: sock, Net: "unixgram"}
	c, err := net.ListenUnixgram("unixgram", addr)
	if err != nil {
		return err
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		return fmt.Errorf("SO_PASSCRED: %v %v", err, serr)
	}
	var n atomic.Int64
	go func() {
		buf := make([]byte, 4096)
		oob := make([]byte, 128)
		for {
			if _, _, _, _, err := c.ReadMsgUnix(buf, oob); err != nil {
				return
			}
			n.Add(1)
		}
	}()
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		fmt.Println(n.Load())
	}
	return nil
}
