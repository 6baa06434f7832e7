package supervisor

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/internal/testkit"
	"github.com/rbee/rbee-hive/internal/workeruser"
)

// attackScript runs as the worker itself (the hive's isolated process,
// before it execs the simworker with the same pid) and reports each attempt
// as "ATTACK <name>: refused|succeeded" on stdout.
const attackScript = `
try() { n=$1; shift; if "$@" >/dev/null 2>&1; then echo "ATTACK $n: succeeded"; else echo "ATTACK $n: refused"; fi; }
cg=$(grep -E '^[0-9]+:memory:' /proc/self/cgroup | cut -d: -f3)
if [ -n "$cg" ]; then d=/sys/fs/cgroup/memory$cg; lim=$d/memory.limit_in_bytes
else cg=$(grep '^0::' /proc/self/cgroup | cut -d: -f3); d=/sys/fs/cgroup$cg; lim=$d/memory.max; fi
try memory_limit sh -c "echo 9999999999 > $lim"
try parent_procs sh -c "echo $$ > $d/../cgroup.procs"
try own_procs sh -c "echo $$ > $d/cgroup.procs"
try token cat "$ATTACK_TOKEN"
try environ cat /proc/$ATTACK_VICTIM/environ
try kill_victim kill -9 $ATTACK_VICTIM
try kill_hive kill -9 $ATTACK_HIVE
env RBEE_TEST_FORGE_PID=$ATTACK_VICTIM "$ATTACK_FORGE"; echo "ATTACK forge_pid: rc $?"
try home sh -c 'echo x > "$HOME/probe" && mkdir "$XDG_CACHE_HOME/m"'
try state_dir ls "$ATTACK_STATE"
try writable sh -c 'echo x > "$ATTACK_WRITABLE/$RBEE_WORKER_ID"'
try models sh -c 'ls "$ATTACK_STATE/models" && cat "$ATTACK_STATE/models/m.gguf"'
try write_models sh -c 'echo x > "$ATTACK_STATE/models/evil"'
echo "ATTACK done"
exec "$0" --port "$1" --worker-id "$2" --model x --tokens-per-second 0
`

// deviceScript opens each of $DEVS read-write as the worker.
const deviceScript = `
for f in $DEVS; do if ( : <> "$f" ) 2>/dev/null; then echo "OPEN $(basename $f): ok"; else echo "OPEN $(basename $f): refused"; fi; done
echo "CUDA=$CUDA_VISIBLE_DEVICES"
exec "$0" --port "$1" --worker-id "$2" --model x --tokens-per-second 0
`

var attackEnv = []string{"ATTACK_TOKEN", "ATTACK_VICTIM", "ATTACK_HIVE", "ATTACK_STATE", "ATTACK_FORGE", "ATTACK_WRITABLE", "DEVS"}

// isolationHarness has the attacker and device backends, and a state dir
// whose parent lets anyone pass, so that what stops a worker is the state
// dir's own mode, not the test's temp dir.
func isolationHarness(t *testing.T) *harness {
	return newHarness(t, func(c *config.Config) {
		if err := os.Chmod(filepath.Dir(c.StateDir), 0o755); err != nil {
			t.Fatal(err)
		}
		sh := func(script string) []string {
			return []string{"/bin/sh", "-c", script, "{self_dir}/rbee-simworker", "{port}", "{worker_id}"}
		}
		c.ModelDir = filepath.Join(c.StateDir, "models")
		c.Backends["attacker"] = config.Backend{Command: sh(attackScript), Health: "notify",
			LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 256 << 20, EnvAllow: attackEnv,
			Writable: []string{filepath.Join(filepath.Dir(c.StateDir), "scratch")}}
		c.Backends["gpuopen"] = config.Backend{Command: sh(deviceScript), Health: "notify", CUDA: true,
			LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 256 << 20, EnvAllow: attackEnv}
	})
}

func (h *harness) stdout(id string) string {
	_, out := h.do("GET", "/v1/workers/"+id+"/logs?stream=stdout", nil)
	return string(out)
}

// procStatus returns the fields of /proc/<pid>/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

func TestIsolatedWorkerAttacks(t *testing.T) {
	h := isolationHarness(t)
	tokenFile := filepath.Join(h.cfg.StateDir, "api-token")
	if err := os.WriteFile(tokenFile, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A model as the model store writes it.
	if err := os.WriteFile(filepath.Join(h.cfg.ModelDir, "m.gguf"), []byte("GGUF"), 0o644); err != nil {
		t.Fatal(err)
	}
	victim := h.spawn(map[string]any{"model_ref": "hf:a/victim", "backend": "sim", "device": 0})
	v := h.waitState(victim.WorkerID, StateIdle, 20*time.Second)
	att := h.spawn(map[string]any{"model_ref": "hf:a/attacker", "backend": "attacker", "device": 0, "env": map[string]string{
		"ATTACK_TOKEN": tokenFile, "ATTACK_VICTIM": strconv.Itoa(*v.PID), "ATTACK_HIVE": strconv.Itoa(os.Getpid()),
		"ATTACK_STATE": h.cfg.StateDir, "ATTACK_FORGE": forgerPath,
		"ATTACK_WRITABLE": h.cfg.Backends["attacker"].Writable[0]}})
	a := h.waitState(att.WorkerID, StateIdle, 20*time.Second)
	out := h.stdout(att.WorkerID)
	if !strings.Contains(out, "ATTACK done") {
		t.Fatalf("attack script did not finish:\n%s", out)
	}
	for _, name := range []string{"memory_limit", "parent_procs", "own_procs", "token", "environ", "kill_victim", "kill_hive", "state_dir", "write_models"} {
		if !strings.Contains(out, "ATTACK "+name+": refused") {
			t.Errorf("attack %s was not refused:\n%s", name, out)
		}
	}
	// SCM_CREDENTIALS naming the victim's pid: the kernel says EPERM (rc 1).
	if !strings.Contains(out, "ATTACK forge_pid: rc 1") {
		t.Errorf("datagram with another worker's pid not refused by the kernel:\n%s", out)
	}
	for _, name := range []string{"home", "writable", "models"} {
		if !strings.Contains(out, "ATTACK "+name+": succeeded") {
			t.Errorf("the worker could not use %s:\n%s", name, out)
		}
	}
	if !alive(*v.PID) || h.get(victim.WorkerID).State != StateIdle {
		t.Errorf("victim worker harmed: %+v", h.get(victim.WorkerID))
	}
	st := procStatus(t, *a.PID)
	for _, k := range []string{"Uid", "Gid"} {
		for _, f := range strings.Fields(st[k]) {
			if f == "0" || f != a.User {
				t.Errorf("%s: %q, want %s four times", k, st[k], a.User)
			}
		}
	}
	for _, k := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
		if st[k] != "0000000000000000" {
			t.Errorf("%s: %s, want none", k, st[k])
		}
	}
	if st["NoNewPrivs"] != "1" {
		t.Errorf("NoNewPrivs: %q", st["NoNewPrivs"])
	}
	vs := procStatus(t, *v.PID)
	if vs["Uid"] == st["Uid"] {
		t.Errorf("victim and attacker share uid %s", st["Uid"])
	}
	// The home goes with the worker, and its uid is released.
	home := filepath.Join(h.cfg.StateDir, "homes", att.WorkerID)
	if fi, err := os.Stat(home); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("home %s: %v %v", home, fi, err)
	}
	if code, out := h.do("DELETE", "/v1/workers/"+att.WorkerID, nil); code != 200 {
		t.Fatalf("delete: %d %s", code, out)
	}
	h.waitFor("home removed", 20*time.Second, func() bool { _, err := os.Stat(home); return os.IsNotExist(err) })
	uid, _ := strconv.ParseUint(a.User, 10, 32)
	if id, ok := h.s.ids.alloc.WorkerOf(uint32(uid)); ok {
		t.Errorf("uid %d still allocated to %s", uid, id)
	}
}

// An isolated GPU worker gets its CUDA_VISIBLE_DEVICES and opens device
// nodes by their modes: 0666 and 0660 with the workers' group open, 0660
// root:root does not. The "nodes" are regular files in a temp dir (the
// fake GPU has no /dev entries): this proves the worker's uid and groups
// against the modes docs/security.md asks of /dev/nvidia*, not the driver.
func TestIsolatedGPUWorkerOpensDevices(t *testing.T) {
	h := isolationHarness(t)
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	mk := func(name string, mode os.FileMode, gid int) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, nil, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, 0, gid); err != nil {
			t.Fatal(err)
		}
		return p
	}
	devs := []string{mk("nvidia0", 0o666, 0), mk("nvidiactl", 0o660, int(h.s.ids.group)), mk("private", 0o660, 0)}
	w := h.spawn(map[string]any{"model_ref": "hf:a/b", "backend": "gpuopen", "device": 1, "env": map[string]string{"DEVS": strings.Join(devs, " ")}})
	h.waitState(w.WorkerID, StateIdle, 20*time.Second)
	out := h.stdout(w.WorkerID)
	for _, want := range []string{"OPEN nvidia0: ok", "OPEN nvidiactl: ok", "OPEN private: refused", "CUDA=GPU-bbbb"} {
		if !strings.Contains(out, want) {
			t.Errorf("worker output lacks %q:\n%s", want, out)
		}
	}
}

// A process that listens on a worker's port before the worker binds it
// answers the http health check; it is a squatter, and the worker is not
// marked ready.
func TestPortSquatterNotReady(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		c.Backends["sleeper"] = config.Backend{Command: []string{"/bin/sleep", "600"}, Health: "http", HealthPath: "/health",
			LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 64 << 20}
	})
	var squatter *exec.Cmd
	h.s.portFree = func(host string, port int) bool {
		if !portFree(host, port) {
			return false
		}
		// A real process of another uid (root here) binds the port in the
		// window between the hive's check and the worker's own bind.
		squatter = exec.Command(filepath.Join(simDir, "rbee-simworker"), "--port", strconv.Itoa(port), "--worker-id", "squatter", "--model", "x")
		if err := squatter.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = squatter.Process.Kill(); _ = squatter.Wait() })
		h.waitFor("squatter listening", 10*time.Second, func() bool {
			c, err := net.Dial("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
			if err == nil {
				c.Close()
			}
			return err == nil
		})
		return true
	}
	w := h.spawn(map[string]any{"model_ref": "hf:a/b", "backend": "sleeper", "device": 0})
	h.waitFor("squatter counted", 20*time.Second, func() bool {
		return counter(t, h.reg, "rbee_hive_port_squatters_total", nil) == 1
	})
	if got := h.get(w.WorkerID).State; got != StateLoading {
		t.Errorf("state %s with a squatter on the port, want loading", got)
	}
	if !strings.Contains(h.logs.String(), "another process listens on its port") {
		t.Errorf("squatter not logged")
	}
	// The proxy does not reach the squatter either: the worker is not ready.
	if code, _ := h.do("POST", "/v1/workers/"+w.WorkerID+"/inference", map[string]any{"prompt": "x"}); code != 409 {
		t.Errorf("inference to a squatted worker: %d, want 409", code)
	}
	// A caller that connects by itself (the served-model router) asks first.
	if err := h.s.CheckPort(w.WorkerID); err == nil || !strings.Contains(err.Error(), "held by another process") {
		t.Errorf("CheckPort with a squatter: %v", err)
	}
}

// The sender's uid must be the worker's: a datagram whose pid is in a
// worker's leaf but whose uid is not the worker's is rejected and counted;
// one whose pid is gone but whose uid is a worker's own is that worker's.
func TestNotifyUIDAttribution(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"model_ref": "hf:a/b", "backend": "sim", "device": 0, "env": map[string]string{"RBEE_SIM_NO_HEARTBEAT": "true"}})
	wi := h.waitState(res.WorkerID, StateIdle, 20*time.Second)
	pid := int32(*wi.PID)
	uid := procUID(pid)
	if uid == 0 || wi.User != strconv.Itoa(int(uid)) {
		t.Fatalf("worker runs as uid %d, API says user %q", uid, wi.User)
	}
	if err := h.s.CheckPort(res.WorkerID); err != nil {
		t.Errorf("CheckPort of a worker on its own port: %v", err)
	}
	h.s.HandleDatagramAs(pid, uid+1, map[string]string{"STATUS": "forged"})
	if got := counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "uid_mismatch"}); got != 1 {
		t.Errorf("uid_mismatch rejections: %v, want 1", got)
	}
	if st := h.get(res.WorkerID).Status; st == "forged" {
		t.Errorf("a datagram with another uid was applied")
	}
	// A sender that is gone: a real process that has exited.
	gone := exec.Command("/bin/true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	h.s.HandleDatagramAs(int32(gone.Process.Pid), uid, map[string]string{"STATUS": "by uid"})
	if st := h.get(res.WorkerID).Status; st != "by uid" {
		t.Errorf("status %q: a gone sender with the worker's uid was not attributed to it", st)
	}
	before := counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "unknown_sender"})
	h.s.HandleDatagramAs(int32(gone.Process.Pid), uid+1, map[string]string{"STATUS": "nobody's"})
	if got := counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "unknown_sender"}); got != before+1 {
		t.Errorf("unknown_sender %v, want %v: a uid of no worker must not be attributed", got, before+1)
	}
	// A restart keeps the worker's uid and home.
	if err := syscall.Kill(int(pid), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.waitFor("restarted and ready", 20*time.Second, func() bool {
		wi := h.get(res.WorkerID)
		return wi.State == StateIdle && wi.PID != nil && *wi.PID != int(pid)
	})
	wi = h.get(res.WorkerID)
	if got := procUID(int32(*wi.PID)); got != uid || wi.User != strconv.Itoa(int(uid)) {
		t.Errorf("after a restart: uid %d (API %q), want %d", got, wi.User, uid)
	}
}

// The shell-worker pattern of docs/worker-protocol.md, unprivileged and
// without --pid: real systemd-notify --no-block, run as the worker's uid,
// sends from its own short-lived pid and exits without waiting for the
// hive, so the hive often reads a datagram whose sender is gone; the hive
// attributes it (by pid while it lives, by uid once it is gone), so the
// worker becomes ready and every heartbeat and status arrives. Without the
// uid attribution some datagrams land in unknown_sender. Where
// systemd-notify is not installed (the VM's busybox), a copy of this test
// binary sends each datagram and exits in its place.
func TestShellWorkerSystemdNotify(t *testing.T) {
	sdn, err := exec.LookPath("systemd-notify")
	if err != nil {
		t.Logf("systemd-notify not installed: a one-shot sender stands in")
		sdn = ""
	}
	h := newHarness(t, func(c *config.Config) {
		c.Backends["shell"] = config.Backend{Command: []string{"/bin/sh", "-c", `
send() { if [ -n "$SDN" ]; then "$SDN" --no-block "$@"; else RBEE_TEST_SEND="$(printf '%s\n' "$@")" "$SENDER"; fi; }
send READY=1 STATUS=loaded; n=0
while :; do n=$((n+1)); send "STATUS=beat $n" WATCHDOG=1 || true; sleep 0.2; done`},
			Env:    map[string]string{"SDN": sdn, "SENDER": forgerPath},
			Health: "notify", LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 64 << 20}
	})
	res := h.spawn(map[string]any{"model_ref": "hf:a/b", "backend": "shell", "device": 0})
	h.waitState(res.WorkerID, StateIdle, 20*time.Second)
	h.waitFor("heartbeats with status", 20*time.Second, func() bool {
		st := h.get(res.WorkerID).Status
		return strings.HasPrefix(st, "beat ") && st != "beat 1" && st != "beat 2"
	})
	if got := counter(t, h.reg, "rbee_hive_heartbeats_rejected_total", map[string]string{"reason": "unknown_sender"}); got != 0 {
		t.Errorf("%v datagrams of the shell worker rejected as unknown_sender", got)
	}
	if got := h.get(res.WorkerID).State; got != StateIdle {
		t.Errorf("state %s, want idle", got)
	}
}

// A program workers cannot reach fails the spawn with the path that stops
// them, not a bare EACCES from exec.
func TestSpawnUnreachableProgram(t *testing.T) {
	dir := t.TempDir() // 0700 root, as a checkout under /root would be
	prog := filepath.Join(dir, "worker")
	if err := os.WriteFile(prog, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(c *config.Config) {
		c.Backends["hidden"] = config.Backend{Command: []string{prog}, Health: "notify", LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 64 << 20}
	})
	code, out := h.do("POST", "/v1/workers/spawn", map[string]any{"model_ref": "hf:a/b", "backend": "hidden", "device": 0})
	if code != 500 || !strings.Contains(string(out), "cannot use "+filepath.Dir(dir)) {
		t.Errorf("spawn: %d %s", code, out)
	}
}

// The hive refuses to start when an account uses the uid range, naming it.
func TestStartRefusesClashingAccount(t *testing.T) {
	testkit.RequireRoot(t)
	dir := t.TempDir()
	passwd := filepath.Join(dir, "passwd")
	if err := os.WriteFile(passwd, []byte("root:x:0:0::/root:/bin/sh\nllm:x:70005:70005::/:/bin/false\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t)
	_, err := New(cfg, Deps{Cgroups: newCgroups(t), HostFiles: &workeruser.HostFiles{Passwd: passwd}})
	if err == nil || !strings.Contains(err.Error(), "llm") || !strings.Contains(err.Error(), "uid_range") {
		t.Fatalf("New: %v, want an error naming llm and workers.uid_range", err)
	}
	// The same range is fine when only root-run backends exist.
	for name, b := range cfg.Backends {
		b.User = "root"
		cfg.Backends[name] = b
	}
	if _, err := New(cfg, Deps{Cgroups: newCgroups(t), HostFiles: &workeruser.HostFiles{Passwd: passwd}}); err != nil {
		t.Fatalf("New with root backends only: %v", err)
	}
}
