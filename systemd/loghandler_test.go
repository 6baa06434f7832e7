package systemd

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/coreos/go-systemd/v22/journal"
)

func TestFieldName(t *testing.T) {
	tests := []struct{ in, want string }{
		{"worker_id", "WORKER_ID"},
		{"WORKER_ID", "WORKER_ID"},
		{"req.id", "REQ_ID"},
		{"http-status", "HTTP_STATUS"},
		{"_pid", "PID"},
		{"__x", "X"},
		{"9lives", "X_9LIVES"},
		{"_9", "X_9"},
		{"größe", "GR__E"}, // non-ASCII bytes become '_'
		{"", ""},
		{"___", ""},
		{"..", ""},
		{strings.Repeat("a", 80), strings.Repeat("A", 64)},
	}
	for _, tt := range tests {
		if got := FieldName(tt.in); got != tt.want {
			t.Errorf("FieldName(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if got := FieldName(tt.in); got != "" && !validJournalField(got) {
			t.Errorf("FieldName(%q) = %q is not a valid journal field name", tt.in, got)
		}
	}
}

// validJournalField is journald's own rule (journal_field_valid).
func validJournalField(s string) bool {
	if s == "" || len(s) > 64 || s[0] == '_' || (s[0] >= '0' && s[0] <= '9') {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

func TestPriority(t *testing.T) {
	tests := []struct {
		l    slog.Level
		want journal.Priority
	}{
		{slog.LevelDebug - 4, 7},
		{slog.LevelDebug, 7},
		{slog.LevelInfo, 6},
		{slog.LevelInfo + 1, 6},
		{LevelNotice, 5},
		{slog.LevelWarn, 4},
		{slog.LevelError, 3},
		{LevelCritical, 2},
		{LevelCritical + 100, 2}, // never alert/emerg
	}
	for _, tt := range tests {
		if got := Priority(tt.l); got != tt.want {
			t.Errorf("Priority(%v) = %d, want %d", tt.l, got, tt.want)
		}
	}
}

func TestNewLogHandlerModes(t *testing.T) {
	t.Setenv("JOURNAL_STREAM", "") // as in a terminal: auto means text
	tests := []struct {
		mode    string
		wantErr bool
		check   func(out string) bool
	}{
		{"text", false, func(s string) bool {
			return strings.Contains(s, "level=NOTICE") && strings.Contains(s, "worker_id=w-1")
		}},
		{"json", false, func(s string) bool {
			return strings.Contains(s, `"level":"NOTICE"`) && strings.Contains(s, `"worker_id":"w-1"`)
		}},
		{"auto", false, func(s string) bool { return strings.Contains(s, "level=NOTICE") }},
		{"", false, func(s string) bool { return strings.Contains(s, "level=NOTICE") }},
		{"syslog", true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.mode, func(t *testing.T) {
			var buf bytes.Buffer
			h, closeFn, err := NewLogHandler(tt.mode, slog.LevelInfo, &buf)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			defer closeFn()
			slog.New(h).Log(t.Context(), LevelNotice, "worker restarted", "worker_id", "w-1")
			slog.New(h).Debug("hidden")
			if out := buf.String(); !tt.check(out) || strings.Contains(out, "hidden") {
				t.Fatalf("output %q", out)
			}
		})
	}
}

type derefErr struct{ msg string }

func (e *derefErr) Error() string { return e.msg }

// A typed nil error (a *T that is nil inside an error interface) is a common
// Go slip; logging one must not panic the hive.
func TestJournalHandlerTypedNilError(t *testing.T) {
	h := NewJournalHandler(JournalOptions{})
	defer h.Close()
	var e *derefErr
	var err error = e
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("Handle panicked on a typed nil error: %v", r)
		}
	}()
	slog.New(h).Error("spawn failed", "err", err, "cause", &derefErr{"disk full"})
	if got := valueString(slog.AnyValue(&derefErr{"disk full"})); got != "disk full" {
		t.Errorf("valueString(error) = %q, want its Error()", got)
	}
}
