package workerstore

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

const root = "/sys/fs/cgroup/rbee-hive"

func sample(id string) Worker {
	return Worker{
		ID: id, Backend: "llamacpp", Model: "hf:org/m:q4.gguf",
		Argv: []string{"/usr/bin/llama-server", "--port", "9001", "--model", "/m/q4 with space.gguf"},
		UID:  64000, Port: 9001, URL: "http://127.0.0.1:9001",
		CgroupPath: root + "/workers/" + id, PID: 4242, PIDStart: 123456789,
		RestartPolicy: "on-failure", RestartCount: 2,
		Failures:    []time.Time{time.UnixMilli(1_700_000_000_123), time.UnixMilli(1_700_000_100_456)},
		MemoryLimit: 8 << 30, VRAMClaim: 6 << 30, GPU: "GPU-0e3f",
		TokenHash: HashToken("secret-token"), State: StateIdle, StdoutOffset: 1 << 33, StderrOffset: 77,
		AdoptedAt: time.UnixMilli(1_700_000_200_000), CreatedAt: time.UnixMilli(1_699_999_999_000),
	}
}

func open(t testing.TB, path string, log *slog.Logger) *Store {
	t.Helper()
	s, err := Open(Options{Path: path, CgroupRoot: root, Logger: log, RetryAfter: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

func flush(t testing.TB, s *Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
}

func load(t testing.TB, s *Store) ([]Worker, []Dropped) {
	t.Helper()
	ws, dropped, err := s.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ws, dropped
}

func TestRoundTripAcrossReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "workers.db")
	s := open(t, path, nil)
	want := sample("w-a1")
	if err := s.Put(want); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(Worker{ID: "w-b2", Argv: []string{}, State: StateDownloading}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	s = open(t, path, nil)
	ws, dropped := load(t, s)
	if len(dropped) != 0 || len(ws) != 2 {
		t.Fatalf("loaded %d, dropped %v", len(ws), dropped)
	}
	got := ws[0]
	if got.ID != "w-a1" {
		got = ws[1]
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, want)
	}
	if !got.TokenMatches("secret-token") || got.TokenMatches("secret-tokeN") {
		t.Error("TokenMatches does not tell the stored token from another")
	}
}

func TestFileModes(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "workers.db")
	// A file left world-readable by hand is tightened.
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	s := open(t, path, nil)
	if err := s.Put(sample("w-a")); err != nil {
		t.Fatal(err)
	}
	flush(t, s)
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", filepath.Base(p), st.Mode().Perm())
		}
	}
	raw, err := os.ReadFile(path + "-wal")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte("secret-token")) {
		t.Error("the clear token reached the database")
	}
}

func TestCoalescingLatestWins(t *testing.T) {
	sampleOff := [2]int64{1 << 33, 77}
	tests := []struct {
		name  string
		ops   func(s *Store)
		state string // "" = row absent
		off   [2]int64
	}{
		{"put then states", func(s *Store) {
			s.Put(sample("w-x"))
			s.SetState("w-x", StateBusy)
			s.SetState("w-x", StateStale)
		}, StateStale, sampleOff},
		{"put then delete", func(s *Store) {
			s.Put(sample("w-x"))
			s.Delete("w-x")
		}, "", [2]int64{}},
		{"delete then state stays deleted", func(s *Store) {
			s.Put(sample("w-x"))
			flushNoT(s)
			s.Delete("w-x")
			s.SetState("w-x", StateBusy)
		}, "", [2]int64{}},
		{"delete then put", func(s *Store) {
			s.Delete("w-x")
			w := sample("w-x")
			w.State = StateLoading
			s.Put(w)
		}, StateLoading, sampleOff},
		{"state after a written put", func(s *Store) {
			s.Put(sample("w-x"))
			flushNoT(s)
			s.SetState("w-x", StateRestarting)
		}, StateRestarting, sampleOff},
		{"offsets fold into a pending put", func(s *Store) {
			s.Put(sample("w-x"))
			s.SetOutputOffsets("w-x", 10, 20)
			s.SetState("w-x", StateBusy)
		}, StateBusy, [2]int64{10, 20}},
		{"offsets and state combine after a written put", func(s *Store) {
			s.Put(sample("w-x"))
			flushNoT(s)
			s.SetOutputOffsets("w-x", 1, 2)
			s.SetState("w-x", StateBusy)
			s.SetOutputOffsets("w-x", 300, 400)
		}, StateBusy, [2]int64{300, 400}},
		{"an offset update keeps the written state", func(s *Store) {
			s.Put(sample("w-x"))
			s.SetState("w-x", StateStale)
			flushNoT(s)
			s.SetOutputOffsets("w-x", 5, 6)
		}, StateStale, [2]int64{5, 6}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t, filepath.Join(t.TempDir(), "w.db"), nil)
			tc.ops(s)
			flush(t, s)
			ws, _ := load(t, s)
			switch {
			case tc.state == "" && len(ws) != 0:
				t.Errorf("row present in state %s, want none", ws[0].State)
			case tc.state != "" && (len(ws) != 1 || ws[0].State != tc.state):
				t.Errorf("rows %+v, want one in state %s", ws, tc.state)
			case tc.state != "" && [2]int64{ws[0].StdoutOffset, ws[0].StderrOffset} != tc.off:
				t.Errorf("offsets %d/%d, want %v", ws[0].StdoutOffset, ws[0].StderrOffset, tc.off)
			}
		})
	}
}

func flushNoT(s *Store) { s.Flush(context.Background()) }

func TestPutRejectsInvalid(t *testing.T) {
	tests := []struct {
		name string
		edit func(w *Worker)
		want string
	}{
		{"bad id", func(w *Worker) { w.ID = "../etc" }, "id does not match"},
		{"negative pid", func(w *Worker) { w.PID = -1 }, "negative pid"},
		{"pid without start", func(w *Worker) { w.PIDStart = 0 }, "without a start time"},
		{"cgroup outside root", func(w *Worker) { w.CgroupPath = "/sys/fs/cgroup/system.slice/workers/" + w.ID }, "outside"},
		{"cgroup with dots", func(w *Worker) { w.CgroupPath = root + "/workers/../../x/" + w.ID }, "not a clean absolute path"},
		{"cgroup of another worker", func(w *Worker) { w.CgroupPath = root + "/workers/w-other" }, "not the worker's leaf"},
		{"unknown state", func(w *Worker) { w.State = "zombie" }, "unknown state"},
		{"short token hash", func(w *Worker) { w.TokenHash = []byte("abc") }, "token hash"},
		{"port", func(w *Worker) { w.Port = 70000 }, "port"},
	}
	s := open(t, filepath.Join(t.TempDir(), "w.db"), nil)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := sample("w-ok")
			tc.edit(&w)
			err := s.Put(w)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Put: %v, want ErrInvalid with %q", err, tc.want)
			}
		})
	}
	if err := s.SetState("w-ok", "zombie"); !errors.Is(err, ErrInvalid) {
		t.Errorf("SetState unknown state: %v", err)
	}
}

// TestTamperedRowsDropped edits rows behind the store's back, as an attacker
// or a broken tool could, and checks that Load keeps the good rows, drops
// and reports the bad ones and deletes them from the file.
func TestTamperedRowsDropped(t *testing.T) {
	tests := []struct {
		name string
		sql  string
		want string
	}{
		{"invalid id", `UPDATE workers SET id = 'x; rm -rf /' WHERE id = 'w-bad'`, "id does not match"},
		{"negative pid", `UPDATE workers SET pid = -7 WHERE id = 'w-bad'`, "negative pid"},
		{"cgroup path outside root", `UPDATE workers SET cgroup_path = '/sys/fs/cgroup/system.slice/w-bad' WHERE id = 'w-bad'`, "outside"},
		{"unknown state", `UPDATE workers SET state = 'pwned' WHERE id = 'w-bad'`, "unknown state"},
		{"text in pid", `UPDATE workers SET pid = 'abc' WHERE id = 'w-bad'`, "want integer"},
		{"argv not json", `UPDATE workers SET argv = '{' WHERE id = 'w-bad'`, "argv"},
		{"token hash as text", `UPDATE workers SET token_hash = 'plain' WHERE id = 'w-bad'`, "token_hash"},
		{"null id", `UPDATE workers SET id = NULL WHERE id = 'w-bad'`, "want text"},
		{"negative output offset", `UPDATE workers SET stderr_offset = -1 WHERE id = 'w-bad'`, "negative output offset"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "w.db")
			var logs testkit.SyncBuffer
			s := open(t, path, slog.New(slog.NewTextHandler(&logs, nil)))
			s.Put(sample("w-good"))
			s.Put(sample("w-bad"))
			flush(t, s)
			raw, err := sql.Open("sqlite", path)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := raw.Exec(tc.sql); err != nil {
				t.Fatal(err)
			}
			raw.Close()
			ws, dropped := load(t, s)
			if len(ws) != 1 || ws[0].ID != "w-good" {
				t.Errorf("kept %+v, want only w-good", ws)
			}
			if len(dropped) != 1 || !errors.Is(dropped[0].Err, ErrInvalid) || !strings.Contains(dropped[0].Err.Error(), tc.want) {
				t.Fatalf("dropped %v, want one with %q", dropped, tc.want)
			}
			if !strings.Contains(logs.String(), "worker registry row dropped") {
				t.Errorf("drop not logged: %s", logs.String())
			}
			if _, dropped := load(t, s); len(dropped) != 0 {
				t.Errorf("second load dropped %v: the bad row was not deleted", dropped)
			}
		})
	}
}

// TestUnusableFileMovedAside: whatever the file holds, Open succeeds with an
// empty registry, and the old file is kept beside it for inspection.
func TestUnusableFileMovedAside(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
	}{
		{"not a database", func(t *testing.T, path string) {
			os.WriteFile(path, bytes.Repeat([]byte("garbage\n"), 1000), 0o600)
		}},
		{"corrupt pages", func(t *testing.T, path string) {
			s := open(t, path, nil)
			for i := range 200 {
				s.Put(sample(fmt.Sprintf("w-%d", i)))
			}
			if err := s.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			checkpoint(t, path)
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			// Keep the 100-byte header valid, smash the b-tree pages.
			f.WriteAt(bytes.Repeat([]byte{0xA5}, 8192), 4096)
			f.Close()
		}},
		{"newer schema version", func(t *testing.T, path string) {
			s := open(t, path, nil)
			s.Close(context.Background())
			execRaw(t, path, `UPDATE schema_version SET version = 99`)
		}},
		{"column dropped by hand", func(t *testing.T, path string) {
			s := open(t, path, nil)
			s.Close(context.Background())
			execRaw(t, path, `ALTER TABLE workers DROP COLUMN token_hash`)
		}},
		{"foreign workers table", func(t *testing.T, path string) {
			execRaw(t, path, `CREATE TABLE workers (x INTEGER)`)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "w.db")
			tc.prepare(t, path)
			var logs testkit.SyncBuffer
			s := open(t, path, slog.New(slog.NewTextHandler(&logs, nil)))
			if s.MovedAside() == "" || !strings.HasPrefix(s.MovedAside(), path+".corrupt-") {
				t.Fatalf("MovedAside = %q", s.MovedAside())
			}
			if _, err := os.Stat(s.MovedAside()); err != nil {
				t.Errorf("old file not kept: %v", err)
			}
			if !strings.Contains(logs.String(), "moved aside") {
				t.Errorf("not logged: %s", logs.String())
			}
			if ws, _ := load(t, s); len(ws) != 0 {
				t.Errorf("fresh registry holds %d rows", len(ws))
			}
			// The fresh file works.
			s.Put(sample("w-new"))
			flush(t, s)
			if ws, _ := load(t, s); len(ws) != 1 {
				t.Errorf("fresh registry: %d rows after a put", len(ws))
			}
		})
	}
}

func TestHealthyFileNotMovedAside(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w.db")
	s := open(t, path, nil)
	s.Put(sample("w-a"))
	s.Close(context.Background())
	s = open(t, path, nil)
	if s.MovedAside() != "" {
		t.Errorf("a healthy file was moved to %s", s.MovedAside())
	}
}

func TestStateDirUnusableIsAnError(t *testing.T) {
	_, err := Open(Options{Path: filepath.Join(t.TempDir(), "missing", "w.db"), CgroupRoot: root})
	if err == nil {
		t.Fatal("Open in a missing directory succeeded")
	}
}

func execRaw(t *testing.T, path, stmt string) {
	t.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(stmt); err != nil {
		t.Fatal(err)
	}
}

func checkpoint(t *testing.T, path string) {
	execRaw(t, path, `PRAGMA wal_checkpoint(TRUNCATE)`)
}

// TestOpenMigratesVersion1File: a registry written by a hive at schema 1
// (before output offsets) opens, keeps its rows and gains the columns.
func TestOpenMigratesVersion1File(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	if err := migrate(db, migrations[:1]); err != nil {
		t.Fatal(err)
	}
	_, err = db.Exec(`INSERT INTO workers VALUES ('w-old','b','m','["/bin/w"]',1000,9000,'http://127.0.0.1:9000',
		'` + root + `/workers/w-old',42,4242,'on-failure',0,'[]',0,0,'',NULL,'idle',0,1700000000000,1700000000000)`)
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	s := open(t, path, nil)
	if s.MovedAside() != "" {
		t.Fatalf("a version-1 file was moved aside")
	}
	ws, dropped := load(t, s)
	if len(dropped) != 0 || len(ws) != 1 || ws[0].ID != "w-old" || ws[0].PIDStart != 4242 || ws[0].StdoutOffset != 0 {
		t.Fatalf("loaded %+v, dropped %v", ws, dropped)
	}
	s.SetOutputOffsets("w-old", 100, 200)
	flush(t, s)
	if ws, _ := load(t, s); ws[0].StdoutOffset != 100 || ws[0].StderrOffset != 200 {
		t.Errorf("offsets after migration: %d %d", ws[0].StdoutOffset, ws[0].StderrOffset)
	}
}

// TestMigrationsStepByStep runs a two-step history over a file at version 1.
func TestMigrationsStepByStep(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	steps := []string{`CREATE TABLE a (x INTEGER)`, `ALTER TABLE a ADD COLUMN y TEXT NOT NULL DEFAULT 'v2'`}
	if err := migrate(db, steps[:1]); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO a (x) VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	if err := migrate(db, steps); err != nil {
		t.Fatal(err)
	}
	var y string
	var v int
	if err := db.QueryRow(`SELECT y FROM a`).Scan(&y); err != nil || y != "v2" {
		t.Errorf("migrated row: %q %v", y, err)
	}
	if err := db.QueryRow(`SELECT version FROM schema_version`).Scan(&v); err != nil || v != 2 {
		t.Errorf("version %d %v", v, err)
	}
	if err := migrate(db, steps[:1]); !errors.Is(err, errUnusable) {
		t.Errorf("older binary on a newer file: %v, want errUnusable", err)
	}
}

// TestConcurrentWriters: many goroutines change many workers at once; after
// Flush the file holds exactly each worker's last change.
func TestConcurrentWriters(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "w.db"), nil)
	const workers, changes = 32, 200
	states := []string{StateLoading, StateIdle, StateBusy, StateIdle}
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("w-c%d", i)
			if err := s.Put(sample(id)); err != nil {
				t.Error(err)
			}
			for j := range changes {
				if err := s.SetState(id, states[j%len(states)]); err != nil {
					t.Error(err)
				}
				if j%50 == 0 {
					s.Flush(context.Background())
				}
			}
			if i%4 == 0 {
				s.Delete(id)
			}
		}()
	}
	wg.Wait()
	flush(t, s)
	ws, dropped := load(t, s)
	if len(dropped) != 0 {
		t.Fatalf("dropped %v", dropped)
	}
	if len(ws) != workers-workers/4 {
		t.Errorf("%d rows, want %d", len(ws), workers-workers/4)
	}
	for _, w := range ws {
		if w.State != states[(changes-1)%len(states)] {
			t.Errorf("%s in state %s, want the last one written", w.ID, w.State)
		}
	}
	st := s.Stats()
	if st.Enqueued != workers*(changes+1)+workers/4 || st.Dropped != 0 || st.Failures != 0 {
		t.Errorf("stats %+v", st)
	}
	if st.Batches >= st.Enqueued {
		t.Errorf("no coalescing: %d batches for %d changes", st.Batches, st.Enqueued)
	}
}

// TestWriteFailureRetried: a failing batch is logged and counted, Flush
// reports it, nothing panics, and the change lands once writes work again.
func TestWriteFailureRetried(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w.db")
	var logs testkit.SyncBuffer
	s := open(t, path, slog.New(slog.NewTextHandler(&logs, nil)))
	execRaw(t, path, `ALTER TABLE workers RENAME TO workers_away`)
	s.Put(sample("w-r"))
	if err := s.Flush(context.Background()); err == nil {
		t.Fatal("Flush succeeded while the table was gone")
	}
	if s.Stats().Failures == 0 || !strings.Contains(logs.String(), "worker registry write failed") {
		t.Errorf("failure not counted/logged: %+v %s", s.Stats(), logs.String())
	}
	s.SetState("w-r", StateBusy) // a newer change merges with the failed one
	execRaw(t, path, `ALTER TABLE workers_away RENAME TO workers`)
	for {
		if err := s.Flush(context.Background()); err == nil {
			break
		}
	}
	ws, _ := load(t, s)
	if len(ws) != 1 || ws[0].State != StateBusy || ws[0].PID != 4242 {
		t.Errorf("after recovery: %+v", ws)
	}
}

func TestQueueBoundDropsAndCounts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w.db")
	var logs testkit.SyncBuffer
	s, err := Open(Options{Path: path, CgroupRoot: root, MaxPending: 2, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	// Hold the writer inside a batch: an exclusive lock makes its commit wait.
	block, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer block.Close()
	tx, err := block.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`DELETE FROM workers WHERE 0`); err != nil {
		t.Fatal(err)
	}
	s.Put(sample("w-first")) // the writer takes this batch and waits on the lock
	// Wait until the writer has taken the batch (pending empty again).
	for {
		s.mu.Lock()
		n := len(s.pending)
		s.mu.Unlock()
		if n == 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	s.Put(sample("w-a"))
	s.Put(sample("w-b"))
	s.Put(sample("w-c"))         // a third pending worker: dropped
	s.SetState("w-a", StateBusy) // a pending worker still coalesces
	tx.Rollback()
	flush(t, s)
	if st := s.Stats(); st.Dropped != 1 {
		t.Errorf("dropped %d, want 1", st.Dropped)
	}
	if !strings.Contains(logs.String(), "queue full") {
		t.Errorf("drop not logged")
	}
	ws, _ := load(t, s)
	ids := map[string]string{}
	for _, w := range ws {
		ids[w.ID] = w.State
	}
	if len(ids) != 3 || ids["w-a"] != StateBusy || ids["w-c"] != "" {
		t.Errorf("rows %v", ids)
	}
}

func TestClosedStore(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "w.db"), CgroupRoot: root})
	if err != nil {
		t.Fatal(err)
	}
	s.Put(sample("w-z"))
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := s.SetState("w-z", StateBusy); !errors.Is(err, ErrClosed) {
		t.Errorf("SetState after Close: %v", err)
	}
	if err := s.Flush(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Flush after Close: %v", err)
	}
}

// TestSetStateAllocations: the hot-path call allocates nothing once the
// worker has a pending slot (steady state while the writer cycles).
func TestSetStateAllocations(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "w.db"), nil)
	s.Put(sample("w-h"))
	flush(t, s)
	states := [2]string{StateBusy, StateIdle}
	i := 0
	allocs := testing.AllocsPerRun(2000, func() {
		s.SetState("w-h", states[i&1])
		i++
	})
	if allocs > 0.5 {
		t.Errorf("SetState allocates %.2f times per call", allocs)
	}
}
