package model

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"time"

	"modernc.org/sqlite" // registers the "sqlite" driver
)

// Model is one catalog entry.
type Model struct {
	Ref          string      `json:"ref"`
	Provider     string      `json:"provider"`
	Repo         string      `json:"repo"`
	Revision     string      `json:"revision"`
	Files        []ModelFile `json:"files"`
	LocalPath    string      `json:"local_path"`
	SizeBytes    uint64      `json:"size_bytes"`
	SHA256       string      `json:"sha256,omitempty"` // of the main file, when it is one file
	DownloadedAt int64       `json:"downloaded_at"`    // unix seconds (docs/compat.md)
	LastUsed     int64       `json:"last_used"`        // unix seconds
	InUse        int         `json:"in_use"`           // workers holding it now

	lastUsedMS int64 // LRU order needs more than seconds
}

// ModelFile is one downloaded file of a model.
type ModelFile struct {
	Path   string `json:"path"`
	Size   uint64 `json:"size"`
	SHA256 string `json:"sha256,omitempty"`
}

const schema = `
CREATE TABLE IF NOT EXISTS models (
	ref           TEXT PRIMARY KEY,
	provider      TEXT NOT NULL,
	repo          TEXT NOT NULL,
	revision      TEXT NOT NULL,
	files         TEXT NOT NULL,
	local_path    TEXT NOT NULL,
	size_bytes    INTEGER NOT NULL,
	sha256        TEXT NOT NULL,
	downloaded_at INTEGER NOT NULL,
	last_used_ms  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS models_last_used ON models(last_used_ms);
`

// catalog is the SQLite table of downloaded models. WAL lets List run while
// a registration writes; busy_timeout makes concurrent writers wait, not fail.
type catalog struct {
	db *sql.DB
}

func openCatalog(path string) (*catalog, error) {
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("model: open catalog %s: %w", path, err)
	}
	if _, err := db.Exec(schema); err != nil {
		db.Close()
		return nil, fmt.Errorf("model: init catalog %s: %w", path, err)
	}
	// A file whose header is intact can still have torn pages; the catalog
	// is small, so check it whole before trusting it.
	var res string
	if err := db.QueryRow(`PRAGMA quick_check`).Scan(&res); err != nil || res != "ok" {
		db.Close()
		if err == nil {
			err = errors.New(res)
		}
		return nil, fmt.Errorf("model: check catalog %s: %w: %w", path, errCatalogCorrupt, err)
	}
	return &catalog{db: db}, nil
}

var errCatalogCorrupt = errors.New("catalog is corrupt")

// isCorrupt reports whether err says the catalog file itself is damaged
// (SQLITE_CORRUPT, SQLITE_NOTADB), as opposed to e.g. a permission error,
// which moving the file aside would not fix.
func isCorrupt(err error) bool {
	const sqliteCorrupt, sqliteNotADB = 11, 26
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff { // the low byte is the primary result code
		case sqliteCorrupt, sqliteNotADB:
			return true
		}
	}
	return errors.Is(err, errCatalogCorrupt)
}

// openCatalogOrRecover opens the catalog. A corrupt one is moved aside
// (with its WAL) and a new, empty one is opened, so a damaged cache cannot
// keep the hive from starting; rebuild then tells the caller to refill it
// from the model files on disk.
func openCatalogOrRecover(path string, log *slog.Logger, met *metrics) (cat *catalog, rebuild bool, err error) {
	cat, err = openCatalog(path)
	if err == nil || !isCorrupt(err) {
		return cat, false, err
	}
	aside := path + ".corrupt-" + time.Now().UTC().Format("20060102T150405.000Z")
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if rerr := os.Rename(path+suffix, aside+suffix); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return nil, false, fmt.Errorf("model: move corrupt catalog aside: %w (it failed with: %w)", rerr, err)
		}
	}
	met.catalogRebuilds.Inc()
	log.Error("model catalog is corrupt; moved it aside and rebuilding it from the model files on disk",
		"catalog", path, "moved_to", aside, "error", err)
	cat, err = openCatalog(path)
	if err != nil {
		return nil, false, err
	}
	return cat, true, nil
}

func (c *catalog) close() error { return c.db.Close() }

const cols = `ref, provider, repo, revision, files, local_path, size_bytes, sha256, downloaded_at, last_used_ms`

func scanModel(row interface{ Scan(...any) error }) (Model, error) {
	var m Model
	var files string
	var size int64
	if err := row.Scan(&m.Ref, &m.Provider, &m.Repo, &m.Revision, &files, &m.LocalPath, &size, &m.SHA256, &m.DownloadedAt, &m.LastUsed); err != nil {
		return m, err
	}
	m.lastUsedMS = m.LastUsed
	m.LastUsed /= 1000
	m.SizeBytes = uint64(size)
	if err := json.Unmarshal([]byte(files), &m.Files); err != nil {
		return m, fmt.Errorf("model: catalog row %s: files: %w", m.Ref, err)
	}
	return m, nil
}

// get returns the model, or ok=false.
func (c *catalog) get(ctx context.Context, ref string) (Model, bool, error) {
	m, err := scanModel(c.db.QueryRowContext(ctx, `SELECT `+cols+` FROM models WHERE ref = ?`, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return Model{}, false, nil
	}
	if err != nil {
		return Model{}, false, fmt.Errorf("model: catalog get %s: %w", ref, err)
	}
	return m, true, nil
}

func (c *catalog) put(ctx context.Context, m Model) error {
	files, err := json.Marshal(m.Files)
	if err != nil {
		return fmt.Errorf("model: catalog put: %w", err)
	}
	_, err = c.db.ExecContext(ctx, `INSERT OR REPLACE INTO models (`+cols+`) VALUES (?,?,?,?,?,?,?,?,?,?)`,
		m.Ref, m.Provider, m.Repo, m.Revision, string(files), m.LocalPath, int64(m.SizeBytes), m.SHA256, m.DownloadedAt, m.lastUsedMS)
	if err != nil {
		return fmt.Errorf("model: catalog put %s: %w", m.Ref, err)
	}
	return nil
}

// list returns all models, least recently used first.
func (c *catalog) list(ctx context.Context) ([]Model, error) {
	rows, err := c.db.QueryContext(ctx, `SELECT `+cols+` FROM models ORDER BY last_used_ms, ref`)
	if err != nil {
		return nil, fmt.Errorf("model: catalog list: %w", err)
	}
	defer rows.Close()
	var out []Model
	for rows.Next() {
		m, err := scanModel(rows)
		if err != nil {
			return nil, fmt.Errorf("model: catalog list: %w", err)
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("model: catalog list: %w", err)
	}
	return out, nil
}

func (c *catalog) remove(ctx context.Context, ref string) (bool, error) {
	res, err := c.db.ExecContext(ctx, `DELETE FROM models WHERE ref = ?`, ref)
	if err != nil {
		return false, fmt.Errorf("model: catalog delete %s: %w", ref, err)
	}
	n, _ := res.RowsAffected()
	return n > 0, nil
}

func (c *catalog) touch(ctx context.Context, ref string, at time.Time) error {
	if _, err := c.db.ExecContext(ctx, `UPDATE models SET last_used_ms = ? WHERE ref = ?`, at.UnixMilli(), ref); err != nil {
		return fmt.Errorf("model: catalog touch %s: %w", ref, err)
	}
	return nil
}

func (c *catalog) totalBytes(ctx context.Context) (uint64, error) {
	var n sql.NullInt64
	if err := c.db.QueryRowContext(ctx, `SELECT SUM(size_bytes) FROM models`).Scan(&n); err != nil {
		return 0, fmt.Errorf("model: catalog size: %w", err)
	}
	return uint64(n.Int64), nil
}
