package cgroup

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// writeFile writes one value to a cgroupfs interface file. The library's
// writers use file mode 0 and lose the file name in their errors; here the
// error names the file, which is what an operator needs to fix a delegation.
func writeFile(dir, name, value string) error {
	p := filepath.Join(dir, name)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err // *PathError already names the operation and the path
	}
	_, werr := f.WriteString(value)
	cerr := f.Close()
	if werr != nil {
		return fmt.Errorf("write %q to %s: %w", value, p, werr)
	}
	if cerr != nil {
		return fmt.Errorf("close %s: %w", p, cerr)
	}
	return nil
}

// readKV parses a flat-keyed cgroup file ("key value" per line), e.g.
// memory.events, cgroup.events, memory.oom_control, pids.events.
func readKV(path string) (map[string]uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := make(map[string]uint64)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			continue // e.g. "max"; callers only read numeric keys
		}
		out[k] = n
	}
	return out, sc.Err()
}

// readPids lists cgroup.procs of one directory (not recursive: leaves have no
// children of ours).
func readPids(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("parse %s/cgroup.procs: %w", dir, err)
		}
		pids = append(pids, n)
	}
	return pids, nil
}

// isGone reports errors that mean the cgroup directory was removed: ENOENT
// from open, or ENODEV from reading a file whose cgroup died under us.
func isGone(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENODEV)
}

// pollUntil calls cond every few milliseconds (backing off to 10 ms) until it
// returns true, returns an error, or ctx ends.
func pollUntil(ctx context.Context, cond func() (bool, error)) error {
	delay := 500 * time.Microsecond
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		if delay < 10*time.Millisecond {
			delay *= 2
		}
	}
}

// hasController reports whether name is listed in a space-separated
// controllers file (cgroup.controllers).
func hasController(list, name string) bool {
	for _, f := range strings.Fields(list) {
		if f == name {
			return true
		}
	}
	return false
}
