package systemd

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// unitSettings reads the assignments of a unit file: section.Key → values
// in order (systemd lets later ones override or extend earlier ones).
func unitSettings(t *testing.T, path string) map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "", line[0] == '#', line[0] == ';':
		case line[0] == '[':
			section = strings.Trim(line, "[]")
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("%s: not an assignment: %q", path, line)
			}
			key := section + "." + strings.TrimSpace(k)
			out[key] = append(out[key], strings.TrimSpace(v))
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestUnitSettings pins the choices the hive relies on, and keeps out the
// hardening options that would break GPU workers or cgroup writes.
func TestUnitSettings(t *testing.T) {
	hive := map[string]string{
		"Service.Type":             "notify",
		"Service.NotifyAccess":     "main",
		"Service.WatchdogSec":      "30s",
		"Service.Restart":          "on-failure",
		"Service.KillMode":         "mixed",
		"Service.TimeoutStopSec":   "90s",
		"Service.Delegate":         "yes",
		"Service.OOMPolicy":        "continue",
		"Service.Slice":            "rbee.slice",
		"Service.RuntimeDirectory": "rbee-hive",
		"Service.StateDirectory":   "rbee-hive",
		"Service.LoadCredential":   "api-token:/etc/rbee-hive/api-token",
		"Service.ExecStart":        "/usr/local/bin/rbee-hive daemon --config /etc/rbee-hive/config.toml",
		"Service.ExecReload":       "/usr/local/bin/rbee-hive upgrade --config /etc/rbee-hive/config.toml --pid $MAINPID",
		"Service.ProtectSystem":    "strict",
		"Unit.StartLimitBurst":     "5",
		// docs/security.md: the smallest set the hive needs; checked under
		// real systemd by test/systemd-vm (hive-capbnd).
		"Service.CapabilityBoundingSet": "CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_KILL CAP_CHOWN CAP_DAC_OVERRIDE",
		"Service.AmbientCapabilities":   "",
	}
	template := map[string]string{}
	for k, v := range hive {
		template[k] = v
	}
	template["Service.ExecStart"] = "/usr/local/bin/rbee-hive daemon --config /etc/rbee-hive/%i.toml"
	template["Service.ExecReload"] = "/usr/local/bin/rbee-hive upgrade --config /etc/rbee-hive/%i.toml --pid $MAINPID"
	template["Service.RuntimeDirectory"] = "rbee-hive/%i"
	template["Service.StateDirectory"] = "rbee-hive/%i"
	forbidden := map[string]string{ // key → value that must not be set
		"Service.PrivateDevices":          "yes",
		"Service.ProtectControlGroups":    "yes",
		"Service.ProtectClock":            "yes",
		"Service.ProtectKernelTunables":   "yes",
		"Service.ProtectKernelModules":    "yes",
		"Service.MemoryDenyWriteExecute":  "yes",
		"Service.PrivateNetwork":          "yes",
		"Service.DeviceAllow":             "*",
		"Service.SystemCallFilter":        "*",
		"Service.RestrictAddressFamilies": "*",
	}
	tests := []struct {
		file      string
		want      map[string]string
		forbidden map[string]string
	}{
		{"rbee-hive.service", hive, forbidden},
		{"rbee-hive@.service", template, forbidden},
		{"rbee.slice", map[string]string{"Slice.MemoryMax": "90%", "Slice.MemorySwapMax": "0"}, nil},
		{"rbee-hive-notify.socket", map[string]string{
			"Socket.ListenDatagram":  "/run/rbee-hive/notify.sock",
			"Socket.PassCredentials": "yes",
			"Socket.SocketMode":      "0660",
			"Socket.Service":         "rbee-hive.service",
		}, nil},
		{"rbee-hive.service.d/50-systemd-254.conf", map[string]string{"Service.DelegateSubgroup": "supervisor", "Service.KillMode": "process"}, nil},
		{"rbee-hive@.service.d/50-systemd-254.conf", map[string]string{"Service.DelegateSubgroup": "supervisor", "Service.KillMode": "process"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			got := unitSettings(t, filepath.Join("units", tt.file))
			for k, want := range tt.want {
				vals := got[k]
				if len(vals) == 0 || vals[len(vals)-1] != want {
					t.Errorf("%s = %q, want %q", k, vals, want)
				}
			}
			for k, bad := range tt.forbidden {
				for _, v := range got[k] {
					if bad == "*" || v == bad {
						t.Errorf("%s=%s must not be set (see the unit's comments)", k, v)
					}
				}
			}
		})
	}
}

func systemdVersion(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("systemctl", "--version").Output()
	if err != nil {
		testkit.Skip(t, "systemctl --version: %v (apt-get install systemd)", err)
	}
	m := regexp.MustCompile(`^systemd (\d+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("systemctl --version: unexpected %q", out)
	}
	v, _ := strconv.Atoi(string(m[1]))
	return v
}

// TestInstallAndVerify installs with install.mk into a scratch root (as a
// package build would, DESTDIR) next to a copy of the distribution's units,
// then runs `systemd-analyze verify --root=` on every unit there: it parses
// each setting, loads the dependencies (rbee.slice, the socket's service)
// and checks that ExecStart names an executable, all without systemd as
// PID 1. Our units must produce no warning at all.
func TestInstallAndVerify(t *testing.T) {
	for _, bin := range []string{"systemd-analyze", "make", "install"} {
		testkit.RequireCommand(t, bin)
	}
	local := systemdVersion(t)
	const distUnits = "/usr/lib/systemd/system"
	if _, err := os.Stat(distUnits); err != nil {
		testkit.Skip(t, "no %s: %v", distUnits, err)
	}
	// Stand-ins for the built binaries: verify only needs an executable.
	binSrc := t.TempDir()
	for _, b := range []string{"rbee-hive", "rbee-gate", "rbee-simworker"} {
		copyFile(t, "/bin/true", filepath.Join(binSrc, b), 0o755)
	}
	dropinKeys := []string{"DelegateSubgroup", "RestartSteps", "RestartMaxDelaySec"}

	tests := []struct {
		name       string
		prefix     string
		version    int // SYSTEMD_VERSION given to install.mk
		wantDropin bool
	}{
		{"systemd 252", "/usr/local", 252, false},
		{"systemd 254", "/usr/local", 254, true},
		{"this host", "/usr/local", local, local >= 254},
		{"prefix /usr", "/usr", local, local >= 254},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			if err := os.MkdirAll(filepath.Join(root, "usr/lib/systemd"), 0o755); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("cp", "-a", distUnits, filepath.Join(root, "usr/lib/systemd")+"/").CombinedOutput(); err != nil {
				t.Fatalf("cp: %v: %s", err, out)
			}
			makeInstall(t, root, binSrc, tt.prefix, tt.version)

			unitDir := filepath.Join(root, tt.prefix, "lib/systemd/system")
			for _, p := range []string{
				filepath.Join(root, tt.prefix, "bin/rbee-hive"),
				filepath.Join(root, tt.prefix, "bin/rbee-gate"),
				filepath.Join(root, tt.prefix, "bin/rbee-simworker"),
			} {
				if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o755 {
					t.Fatalf("%s: %v %v", p, fi, err)
				}
			}
			_, err := os.Stat(filepath.Join(unitDir, "rbee-hive.service.d/50-systemd-254.conf"))
			if hasDropin := err == nil; hasDropin != tt.wantDropin {
				t.Fatalf("drop-in installed = %v, want %v", hasDropin, tt.wantDropin)
			}
			if s := unitSettings(t, filepath.Join(unitDir, "rbee-hive.service")); !strings.HasPrefix(s["Service.ExecStart"][0], tt.prefix+"/bin/rbee-hive ") {
				t.Fatalf("installed ExecStart %q does not use PREFIX %s", s["Service.ExecStart"], tt.prefix)
			}

			out := verify(t, root, "rbee-hive.service", "rbee-hive@gpu0.service", "rbee.slice", "rbee-hive-notify.socket")
			var ours, others []string
			for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
				switch {
				case line == "":
				case strings.Contains(line, "rbee"):
					ours = append(ours, line)
				default:
					others = append(others, line) // the distribution's units: not ours to fix
				}
			}
			if len(others) > 0 {
				t.Logf("verify, about other units:\n%s", strings.Join(others, "\n"))
			}
			var want []string // on an older systemd the drop-in's keys are unknown, and nothing else may be
			if tt.wantDropin && local < 254 {
				for _, unit := range []string{"rbee-hive.service.d", "rbee-hive@.service.d"} {
					for _, k := range dropinKeys {
						want = append(want, unit+"/50-systemd-254.conf: Unknown key '"+k+"'")
					}
				}
			}
			var unexpected []string
			for _, line := range ours {
				if !slices.ContainsFunc(want, func(w string) bool { return strings.Contains(stripLineNo(line), w) }) {
					unexpected = append(unexpected, line)
				}
			}
			if len(unexpected) > 0 {
				t.Fatalf("systemd-analyze verify warns about our units:\n%s", strings.Join(unexpected, "\n"))
			}
			if len(ours) != len(want) {
				t.Fatalf("verify printed %d lines about our units, want %d:\n%s", len(ours), len(want), strings.Join(ours, "\n"))
			}
		})
	}
}

// stripLineNo turns "path/x.conf:8: Unknown key" into "path/x.conf: Unknown key".
func stripLineNo(s string) string { return regexp.MustCompile(`:\d+:`).ReplaceAllString(s, ":") }

func verify(t *testing.T, root string, units ...string) string {
	t.Helper()
	cmd := exec.Command("systemd-analyze", append([]string{"verify", "--root=" + root}, units...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out.String())
	}
	return out.String()
}

func makeInstall(t *testing.T, root, binSrc, prefix string, version int) {
	t.Helper()
	args := []string{"-C", "..", "-f", "install.mk", "install",
		"DESTDIR=" + root, "PREFIX=" + prefix, "RBEE_BIN_SRC=" + binSrc, "SYSTEMD_VERSION=" + strconv.Itoa(version)}
	cmd := exec.Command("make", args...)
	cmd.Env = slices.DeleteFunc(os.Environ(), func(e string) bool { return strings.HasPrefix(e, "MAKE") })
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestInstallKeepsConfig: a second install must not overwrite an edited
// config, and a DESTDIR install never creates a token.
func TestInstallKeepsConfig(t *testing.T) {
	for _, bin := range []string{"make", "install"} {
		testkit.RequireCommand(t, bin)
	}
	binSrc := t.TempDir()
	for _, b := range []string{"rbee-hive", "rbee-gate", "rbee-simworker"} {
		copyFile(t, "/bin/true", filepath.Join(binSrc, b), 0o755)
	}
	root := t.TempDir()
	makeInstall(t, root, binSrc, "/usr/local", 252)
	cfg := filepath.Join(root, "etc/rbee-hive/config.toml")
	sample, err := os.ReadFile("config.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(cfg); err != nil || !bytes.Equal(got, sample) {
		t.Fatalf("first install: config %v, want the sample", err)
	}
	edited := []byte("listen = \"0.0.0.0:9200\"\n")
	if err := os.WriteFile(cfg, edited, 0o640); err != nil {
		t.Fatal(err)
	}
	makeInstall(t, root, binSrc, "/usr/local", 252)
	if got, _ := os.ReadFile(cfg); !bytes.Equal(got, edited) {
		t.Fatalf("second install overwrote the config: %q", got)
	}
	if _, err := os.Stat(filepath.Join(root, "etc/rbee-hive/api-token")); err == nil {
		t.Fatal("a DESTDIR install created an api-token")
	}
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(fmt.Errorf("copy %s: %w", src, err))
	}
}
