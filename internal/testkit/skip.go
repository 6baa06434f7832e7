package testkit

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// InCI reports whether the tests run under CI (the CI variable is set to
// anything but "" or "false"): there every test must run, so a skip fails.
func InCI() bool {
	v := os.Getenv("CI")
	return v != "" && v != "false" && v != "0"
}

// Skip is the one place that decides a skip: outside CI it skips with the
// reason; in CI it fails the test instead, because a missing tool or
// privilege there means the suite silently tested less than it claims.
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	why := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("%s (CI must run every test: scripts/install-deps.sh installs the tools, CI runs as root)", why)
	}
	t.Skip(why)
}

// RequireRoot skips (fails in CI) unless the test runs as root, which
// creating cgroups and mounts needs.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root: creates cgroups or mounts")
	}
}

// RequireCommand returns the path of a program (a name looked up in PATH,
// or an absolute path that must exist) or skips (fails in CI) without it.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	if strings.HasPrefix(name, "/") {
		if _, err := os.Stat(name); err != nil {
			Skip(t, "%s not installed: %v", name, err)
		}
		return name
	}
	p, err := exec.LookPath(name)
	if err != nil {
		Skip(t, "%s not installed: %v", name, err)
	}
	return p
}
