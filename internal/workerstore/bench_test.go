package workerstore

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
)

// BenchmarkSetState is the hot-path cost a state change adds to its caller
// (enqueue only), against BenchmarkSyncUpdate, the same change written
// synchronously, measured in the same run.
func BenchmarkSetState(b *testing.B) {
	s := open(b, filepath.Join(b.TempDir(), "w.db"), nil)
	for i := range 100 {
		s.Put(sample(fmt.Sprintf("w-%d", i)))
	}
	flush(b, s)
	ids := make([]string, 100)
	for i := range ids {
		ids[i] = fmt.Sprintf("w-%d", i)
	}
	states := [2]string{StateBusy, StateIdle}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		s.SetState(ids[i%100], states[i&1])
	}
	b.StopTimer()
	flush(b, s)
	st := s.Stats()
	b.ReportMetric(float64(st.Batches), "batches")
}

func BenchmarkSyncUpdate(b *testing.B) {
	s := open(b, filepath.Join(b.TempDir(), "w.db"), nil)
	for i := range 100 {
		s.Put(sample(fmt.Sprintf("w-%d", i)))
	}
	flush(b, s)
	states := [2]string{StateBusy, StateIdle}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := s.db.ExecContext(ctx, `UPDATE workers SET state = ?, updated_at_ms = ? WHERE id = ?`,
			states[i&1], int64(i), fmt.Sprintf("w-%d", i%100)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoad100 reads back 100 workers, as a restarted hive does before
// adopting them.
func BenchmarkLoad100(b *testing.B) {
	s := open(b, filepath.Join(b.TempDir(), "w.db"), nil)
	for i := range 100 {
		s.Put(sample(fmt.Sprintf("w-%d", i)))
	}
	flush(b, s)
	b.ReportAllocs()
	for b.Loop() {
		if ws, _, err := s.Load(context.Background()); err != nil || len(ws) != 100 {
			b.Fatal(len(ws), err)
		}
	}
}
