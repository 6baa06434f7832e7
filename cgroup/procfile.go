package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// procCgroups parses /proc/<pid>/cgroup into hierarchy key → path. The key is
// "" for the unified (v2) line ("0::/path") and each controller name for v1
// lines ("4:memory:/path", "1:cpu,cpuacct:/path" gives both "cpu" and
// "cpuacct"; "name=systemd" is kept as is).
func procCgroups(pid int) (map[string]string, error) {
	p := "/proc/self/cgroup"
	if pid > 0 {
		p = "/proc/" + strconv.Itoa(pid) + "/cgroup"
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	out := make(map[string]string)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			out[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			out[c] = parts[2]
		}
	}
	return out, sc.Err()
}

// leafFromPath maps a cgroup path (relative to its hierarchy) to the worker id
// when it lies at or below <root>/workers/<id>; the id must be valid.
func leafFromPath(root, p string) (string, bool) {
	prefix := strings.TrimSuffix(root, "/") + "/workers/"
	rest, ok := strings.CutPrefix(p, prefix)
	if !ok {
		return "", false
	}
	id, _, _ := strings.Cut(rest, "/")
	if ValidateID(id) != nil {
		return "", false
	}
	return id, true
}

// leafOf is Manager.LeafOf for both drivers: the worker leaf below
// <root>/workers that pid's /proc/<pid>/cgroup line for hierarchy key ("" for
// v2's unified line, a controller name on v1) names.
func leafOf(mode string, pid int, key, root string) (string, error) {
	if pid <= 0 {
		return "", fmt.Errorf("%w: pid %d", ErrInvalid, pid)
	}
	cgs, err := procCgroups(pid)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("cgroup %s: pid %d: %w", mode, pid, ErrNotFound)
		}
		return "", err
	}
	if id, ok := leafFromPath(root, cgs[key]); ok {
		return id, nil
	}
	return "", fmt.Errorf("cgroup %s: pid %d is in cgroup %q, not in a worker leaf: %w", mode, pid, cgs[key], ErrNotFound)
}
