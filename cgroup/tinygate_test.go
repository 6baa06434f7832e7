package cgroup

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// testGateBinary is the cmd/rbee-gate binary the tests run, or why there is
// none (then every test that needs it fails, naming the reason).
type testGateBinary struct {
	path string
	err  error
}

// testGate is set once by TestMain.
var testGate testGateBinary

// findTestGate builds cmd/rbee-gate into dir, or, where there is no Go
// toolchain (the v2 VM), takes the one test/vm/run.sh put beside the test
// binary. RBEE_TEST_GATE_BIN overrides both.
func findTestGate(dir string) testGateBinary {
	if p := os.Getenv("RBEE_TEST_GATE_BIN"); p != "" {
		return testGateBinary{path: p}
	}
	if goBin, err := exec.LookPath("go"); err == nil {
		out := filepath.Join(dir, GateName)
		c := exec.Command(goBin, "build", "-o", out, "github.com/rbee/rbee-hive/cmd/rbee-gate")
		c.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := c.CombinedOutput(); err != nil {
			return testGateBinary{err: errors.New("go build ./cmd/rbee-gate: " + err.Error() + ": " + string(b))}
		}
		return testGateBinary{path: out}
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), GateName)
		if _, err := os.Stat(p); err == nil {
			return testGateBinary{path: p}
		}
	}
	return testGateBinary{err: errors.New("no Go toolchain to build cmd/rbee-gate and no " + GateName + " beside the test binary")}
}

// requireTestGate fails (never skips: the path must be tested everywhere)
// when no gate binary is available.
func requireTestGate(t testing.TB) string {
	t.Helper()
	if testGate.err != nil || testGate.path == "" {
		t.Fatalf("rbee-gate binary: %v", testGate.err)
	}
	return testGate.path
}

func TestResolveGate(t *testing.T) {
	gateBin := requireTestGate(t)
	dir := t.TempDir()
	copyTo := func(name string, mode os.FileMode) string {
		b, err := os.ReadFile(gateBin)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := copyTo("good", 0o755)
	worldWritable := copyTo("ww", 0o757)
	notExec := copyTo("noexec", 0o644)
	cases := []struct {
		opt     string
		want    string
		wantErr string
	}{
		{GateSelf, GateSelf, ""},
		{good, good, ""},
		{"relative/rbee-gate", "", "must be absolute"},
		{filepath.Join(dir, "missing"), "", "no such file"},
		{worldWritable, "", "writable by group or others"},
		{notExec, "", "not executable"},
		{dir, "", "not a regular file"},
		// Tests run from a build directory without an rbee-gate beside
		// the test binary: the running binary is the gate.
		{"", GateSelf, ""},
	}
	if exe, err := os.Executable(); err == nil {
		if _, err := os.Stat(filepath.Join(filepath.Dir(exe), GateName)); err == nil {
			// The VM: run.sh puts one there, so auto-detection finds it.
			cases[len(cases)-1].want = filepath.Join(filepath.Dir(exe), GateName)
		}
	}
	for _, tc := range cases {
		got, err := resolveGate(tc.opt)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("resolveGate(%q) = %q, %v; want error containing %q", tc.opt, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("resolveGate(%q) = %q, %v; want %q", tc.opt, got, err, tc.want)
		}
	}
}

// TestGateBinaryNotAGate: rbee-gate started by hand (no gate environment)
// refuses to do anything; with a malformed one it exits with the placement
// failure code, never running the named program.
func TestGateBinaryNotAGate(t *testing.T) {
	gateBin := requireTestGate(t)
	marker := filepath.Join(t.TempDir(), "ran")
	for _, tc := range []struct {
		name string
		args []string
		env  []string
		code int
	}{
		{"by-hand", []string{GateName, "/usr/bin/touch", "touch", marker}, nil, 2},
		{"malformed-env", []string{gateArg0, "/usr/bin/touch", "touch", marker}, []string{gateEnv + "=x"}, gateExitPlacementFailed},
		{"bad-fds", []string{gateArg0, "/usr/bin/touch", "touch", marker}, []string{gateEnv + "=1:2"}, gateExitPlacementFailed},
		{"malformed-iso", []string{gateArg0, "/usr/bin/touch", "touch", marker}, []string{gateEnv + "=3:4", gateIsoEnv + "=1:2"}, gateExitPlacementFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &exec.Cmd{Path: gateBin, Args: tc.args, Env: tc.env}
			err := c.Run()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != tc.code {
				t.Fatalf("exit %v, want code %d", err, tc.code)
			}
			if _, err := os.Stat(marker); err == nil {
				t.Fatal("the gate ran the program")
			}
		})
	}
}
