package workeruser

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// HostFiles are the local id databases CheckHost reads; empty fields are
// skipped.
type HostFiles struct {
	Passwd, Group, Subuid, Subgid string
}

// DefaultHostFiles are the system's files.
func DefaultHostFiles() HostFiles {
	return HostFiles{Passwd: "/etc/passwd", Group: "/etc/group", Subuid: "/etc/subuid", Subgid: "/etc/subgid"}
}

// CheckHost fails when an account (passwd), a group (a worker's gid equals
// its uid) or a subordinate id range (rootless containers map those ids to
// their own processes) uses an id in first..last. A missing file counts as
// empty. Only the local files are read: accounts that exist only in NSS
// sources (LDAP, sssd, systemd-userdb) are not seen, so on such hosts the
// range must be kept clear of them by configuration.
func CheckHost(first, last uint32, f HostFiles) error {
	var conflicts []string
	for _, db := range []struct {
		path, kind string
		parse      func(line string) (name string, lo, hi uint64, ok bool)
	}{
		{f.Passwd, "user", parseIDLine},
		{f.Group, "group", parseIDLine},
		{f.Subuid, "subordinate uid range", parseSubIDLine},
		{f.Subgid, "subordinate gid range", parseSubIDLine},
	} {
		if db.path == "" {
			continue
		}
		b, err := os.ReadFile(db.path)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return fmt.Errorf("workeruser: %w", err)
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if line == "" || line[0] == '#' || line[0] == '+' || line[0] == '-' {
				continue // NIS compat markers name no id
			}
			name, lo, hi, ok := db.parse(line)
			if !ok || hi < uint64(first) || lo > uint64(last) {
				continue
			}
			if lo == hi {
				conflicts = append(conflicts, fmt.Sprintf("%s %q (%d) in %s", db.kind, name, lo, db.path))
			} else {
				conflicts = append(conflicts, fmt.Sprintf("%s of %q (%d-%d) in %s", db.kind, name, lo, hi, db.path))
			}
		}
		if err := sc.Err(); err != nil {
			return fmt.Errorf("workeruser: read %s: %w", db.path, err)
		}
	}
	if len(conflicts) == 0 {
		return nil
	}
	more := ""
	if len(conflicts) > 5 {
		more = fmt.Sprintf(" and %d more", len(conflicts)-5)
		conflicts = conflicts[:5]
	}
	return fmt.Errorf("workeruser: the worker uid range %d-%d is in use: %s%s; choose another range", first, last, strings.Join(conflicts, "; "), more)
}

// parseIDLine reads "name:x:id:..." (passwd and group).
func parseIDLine(line string) (string, uint64, uint64, bool) {
	f := strings.SplitN(line, ":", 4)
	if len(f) < 3 {
		return "", 0, 0, false
	}
	id, err := strconv.ParseUint(f[2], 10, 32)
	if err != nil {
		return "", 0, 0, false
	}
	return f[0], id, id, true
}

// parseSubIDLine reads "name:start:count" (subuid and subgid).
func parseSubIDLine(line string) (string, uint64, uint64, bool) {
	f := strings.Split(line, ":")
	if len(f) != 3 {
		return "", 0, 0, false
	}
	start, err1 := strconv.ParseUint(f[1], 10, 32)
	count, err2 := strconv.ParseUint(f[2], 10, 32)
	if err1 != nil || err2 != nil || count == 0 {
		return "", 0, 0, false
	}
	return f[0], start, start + count - 1, true
}
