package workerstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// migrations[i] takes the schema from version i to i+1. Append, never edit:
// a hive upgraded in place opens the file its predecessor wrote.
var migrations = []string{
	`CREATE TABLE workers (
		id             TEXT PRIMARY KEY,
		backend        TEXT NOT NULL,
		model          TEXT NOT NULL,
		argv           TEXT NOT NULL,
		uid            INTEGER NOT NULL,
		port           INTEGER NOT NULL,
		url            TEXT NOT NULL,
		cgroup_path    TEXT NOT NULL,
		pid            INTEGER NOT NULL,
		pid_start      INTEGER NOT NULL,
		restart_policy TEXT NOT NULL,
		restart_count  INTEGER NOT NULL,
		failures       TEXT NOT NULL,
		memory_limit   INTEGER NOT NULL,
		vram_claim     INTEGER NOT NULL,
		gpu            TEXT NOT NULL,
		token_hash     BLOB,
		state          TEXT NOT NULL,
		adopted_at_ms  INTEGER NOT NULL,
		created_at_ms  INTEGER NOT NULL,
		updated_at_ms  INTEGER NOT NULL
	)`,
	// How far the hive has shipped each worker's output files.
	`ALTER TABLE workers ADD COLUMN stdout_offset INTEGER NOT NULL DEFAULT 0;
	 ALTER TABLE workers ADD COLUMN stderr_offset INTEGER NOT NULL DEFAULT 0`,
}

// migrate brings db to len(steps). A version newer than this binary knows
// (a downgrade) makes the file unusable: its rows may mean something else.
func migrate(db *sql.DB, steps []string) error {
	if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("schema_version: %w", err)
	}
	var n int
	if err := db.QueryRow(`SELECT COUNT(*) FROM schema_version`).Scan(&n); err != nil {
		return fmt.Errorf("schema_version: %w", err)
	}
	if n == 0 {
		if _, err := db.Exec(`INSERT INTO schema_version (version) VALUES (0)`); err != nil {
			return fmt.Errorf("schema_version: %w", err)
		}
	} else if n > 1 {
		return fmt.Errorf("%w: schema_version has %d rows", errUnusable, n)
	}
	var v any
	if err := db.QueryRow(`SELECT version FROM schema_version`).Scan(&v); err != nil {
		return fmt.Errorf("schema_version: %w", err)
	}
	cur, ok := v.(int64)
	if !ok || cur < 0 || cur > int64(len(steps)) {
		return fmt.Errorf("%w: schema version %v, this hive knows 0..%d", errUnusable, v, len(steps))
	}
	for i := int(cur); i < len(steps); i++ {
		if err := step(db, i, steps[i]); err != nil {
			return err
		}
	}
	return nil
}

func step(db *sql.DB, from int, stmt string) error {
	tx, err := db.Begin()
	if err != nil {
		return fmt.Errorf("migration %d: %w", from+1, err)
	}
	defer tx.Rollback()
	if _, err := tx.Exec(stmt); err != nil {
		// A table that exists where the migration creates it was not made by
		// this schema history.
		return fmt.Errorf("%w: migration %d: %w", errUnusable, from+1, err)
	}
	if _, err := tx.Exec(`UPDATE schema_version SET version = ?`, from+1); err != nil {
		return fmt.Errorf("migration %d: %w", from+1, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("migration %d: %w", from+1, err)
	}
	return nil
}

// checkColumns catches a workers table altered by hand (a column dropped or
// renamed), which every query would otherwise fail on.
func checkColumns(db *sql.DB) error {
	rows, err := db.Query(`SELECT name FROM pragma_table_info('workers')`)
	if err != nil {
		return fmt.Errorf("table_info: %w", err)
	}
	defer rows.Close()
	have := map[string]bool{}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return fmt.Errorf("table_info: %w", err)
		}
		have[name] = true
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("table_info: %w", err)
	}
	for _, c := range strings.Split(cols, ",") {
		if c = strings.TrimSpace(c); !have[c] {
			return fmt.Errorf("%w: workers table lacks column %s", errUnusable, c)
		}
	}
	return nil
}

// Dropped is a row Load refused, and why.
type Dropped struct {
	ID  string // as stored (may itself be the problem)
	Err error
}

// Load returns every trustworthy persisted worker, oldest first. Rows that
// fail validation (tampered or written by something else) are deleted from
// the file, logged and returned in dropped; they never fail the load. Call
// it once at start, before the first write.
func (s *Store) Load(ctx context.Context) (workers []Worker, dropped []Dropped, err error) {
	rows, err := s.db.QueryContext(ctx, `SELECT rowid, `+cols+` FROM workers ORDER BY created_at_ms, id`)
	if err != nil {
		return nil, nil, fmt.Errorf("workerstore: load: %w", err)
	}
	var bad []int64
	for rows.Next() {
		vals := make([]any, 24)
		ptrs := make([]any, len(vals))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			rows.Close()
			return nil, nil, fmt.Errorf("workerstore: load: %w", err)
		}
		rowid, _ := vals[0].(int64)
		w, err := decode(vals[1:])
		if err == nil {
			err = w.validate(s.opts.CgroupRoot)
		}
		if err != nil {
			id := fmt.Sprint(vals[1])
			dropped = append(dropped, Dropped{ID: id, Err: err})
			bad = append(bad, rowid)
			s.log.Error("worker registry row dropped", "row", rowid, "worker_id", id, "err", err)
			continue
		}
		workers = append(workers, w)
	}
	err = rows.Err()
	rows.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("workerstore: load: %w", err)
	}
	for _, r := range bad {
		if _, err := s.db.ExecContext(ctx, `DELETE FROM workers WHERE rowid = ?`, r); err != nil {
			s.log.Error("worker registry: cannot delete dropped row", "row", r, "err", err)
		}
	}
	return workers, dropped, nil
}

// decode turns one row, read as loose values so that a tampered column type
// is a dropped row rather than a failed load, into a Worker.
func decode(v []any) (Worker, error) {
	var w Worker
	var errs []error
	str := func(i int) string {
		switch x := v[i].(type) {
		case string:
			return x
		case []byte:
			return string(x)
		}
		errs = append(errs, fmt.Errorf("column %d: want text, have %T", i, v[i]))
		return ""
	}
	num := func(i int) int64 {
		if x, ok := v[i].(int64); ok {
			return x
		}
		errs = append(errs, fmt.Errorf("column %d: want integer, have %T", i, v[i]))
		return 0
	}
	w.ID = str(0)
	w.Backend, w.Model = str(1), str(2)
	if err := json.Unmarshal([]byte(str(3)), &w.Argv); err != nil {
		errs = append(errs, fmt.Errorf("argv: %w", err))
	}
	w.UID, w.Port, w.URL, w.CgroupPath = int(num(4)), int(num(5)), str(6), str(7)
	w.PID = int(num(8))
	if start := num(9); start >= 0 {
		w.PIDStart = uint64(start)
	} else {
		errs = append(errs, fmt.Errorf("negative pid start %d", start))
	}
	w.RestartPolicy, w.RestartCount = str(10), int(num(11))
	var fails []int64
	if err := json.Unmarshal([]byte(str(12)), &fails); err != nil {
		errs = append(errs, fmt.Errorf("failures: %w", err))
	}
	for _, ms := range fails {
		w.Failures = append(w.Failures, time.UnixMilli(ms))
	}
	w.MemoryLimit, w.VRAMClaim, w.GPU = num(13), num(14), str(15)
	switch x := v[16].(type) {
	case nil:
	case []byte:
		w.TokenHash = x
	default:
		errs = append(errs, fmt.Errorf("token_hash: want blob, have %T", v[16]))
	}
	w.State = str(17)
	w.AdoptedAt, w.CreatedAt = fromMilli(num(18)), fromMilli(num(19))
	_ = num(20)
	w.StdoutOffset, w.StderrOffset = num(21), num(22)
	if len(errs) > 0 {
		return w, fmt.Errorf("%w: worker %q: %w", ErrInvalid, w.ID, errors.Join(errs...))
	}
	return w, nil
}
