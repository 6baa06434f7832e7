package main

import (
	"io"
	"strings"
	"testing"
	"time"
)

// TestSIGTERMEndsLongStream: a stream longer than the shutdown drain is
// not cut: at the drain deadline it gets the HIVE_SHUTTING_DOWN error event
// and [DONE], then the response ends and the hive exits 0.
func TestSIGTERMEndsLongStream(t *testing.T) {
	// 2000 tokens at 5/s: far longer than the drain.
	s := startDrainStream(t, "5", `{"job_id":"drain-long","prompt":"hello","max_tokens":2000}`)
	events, err := s.readToDone()
	if err != nil {
		t.Fatalf("stream cut during the drain after %d more events (last %q): %v", len(events), lastOf(events), err)
	}
	if len(events) < 2 || !strings.Contains(events[len(events)-2], `"code":"HIVE_SHUTTING_DOWN"`) {
		t.Errorf("event before [DONE] %q, want the HIVE_SHUTTING_DOWN error", lastOf(events[:len(events)-1]))
	}
	if rest, err := io.ReadAll(s.rd); err != nil || strings.TrimSpace(string(rest)) != "" {
		t.Errorf("after [DONE]: %q, %v; want a clean end", rest, err)
	}
	s.waitExit0(t, 60*time.Second)
}

func lastOf(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[len(s)-1]
}
