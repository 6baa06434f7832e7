package systemd

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
)

// Levels beyond slog's four, for syslog priorities slog has no name for.
// They sort between slog's levels, so Enabled and level filters keep working.
const (
	LevelNotice   = slog.Level(2)  // PRIORITY 5: normal but significant (e.g. a worker restarted)
	LevelCritical = slog.Level(12) // PRIORITY 2: the hive cannot do its job
)

// Priority maps a slog level to a syslog priority: Debug 7, Info 6,
// LevelNotice 5, Warn 4, Error 3, LevelCritical and above 2. Alert and
// emergency are never used: journald broadcasts emerg to every terminal.
func Priority(l slog.Level) journal.Priority {
	switch {
	case l < slog.LevelInfo:
		return journal.PriDebug
	case l < LevelNotice:
		return journal.PriInfo
	case l < slog.LevelWarn:
		return journal.PriNotice
	case l < slog.LevelError:
		return journal.PriWarning
	case l < LevelCritical:
		return journal.PriErr
	default:
		return journal.PriCrit
	}
}

// DefaultIdentifier is the hive's SYSLOG_IDENTIFIER (journalctl -t rbee-hive).
const DefaultIdentifier = "rbee-hive"

// JournalOptions configures a JournalHandler. Zero values pick defaults.
type JournalOptions struct {
	Level      slog.Leveler // minimum level; nil: Info
	Identifier string       // SYSLOG_IDENTIFIER; "": DefaultIdentifier
	QueueSize  int          // entries waiting for journald; 0: 1024
	QueueBytes int64        // bytes waiting for journald; 0: 4 MiB
}

// JournalHandler is a slog.Handler that files each record as a native
// journal entry: MESSAGE, PRIORITY (see Priority), SYSLOG_IDENTIFIER,
// CODE_FILE/CODE_LINE/CODE_FUNC when the record has a source, and one field
// per attribute. Attribute keys become journal field names: groups joined
// with '_', upper-cased, every other character '_', no leading '_' or digit
// (worker_id → WORKER_ID, req.id → REQ_ID). Keys that would overwrite the
// fields above get an X_ prefix.
//
// Handle never blocks: entries go through a bounded queue to one sender
// goroutine, and entries that do not fit, or that journald refuses, are
// dropped and counted (Dropped). Handlers from WithAttrs/WithGroup share the
// queue. Close flushes and stops it.
type JournalHandler struct {
	c      *journalCore
	prefix string   // groups opened with WithGroup, as "A_B_"
	attrs  []kvPair // from WithAttrs, already named
}

type journalCore struct {
	level slog.Leveler
	ident string
	sink  *sink
}

type kvPair struct{ k, v string }

// NewJournalHandler starts a handler and its sender goroutine. It does not
// check that journald is there (NewLogHandler does): without it every entry
// is dropped and counted.
func NewJournalHandler(opts JournalOptions) *JournalHandler {
	if opts.Level == nil {
		opts.Level = slog.LevelInfo
	}
	if opts.Identifier == "" {
		opts.Identifier = DefaultIdentifier
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 1024
	}
	if opts.QueueBytes <= 0 {
		opts.QueueBytes = 4 << 20
	}
	return &JournalHandler{c: &journalCore{
		level: opts.Level,
		ident: opts.Identifier,
		sink:  newSink(opts.QueueSize, opts.QueueBytes, sendJournal),
	}}
}

// sendJournal is the real transport: go-systemd's native-protocol client
// (one datagram per entry, large ones passed as a file descriptor).
func sendJournal(e entry) error { return journal.Send(e.msg, e.pri, e.vars) }

// Enabled implements slog.Handler.
func (h *JournalHandler) Enabled(_ context.Context, l slog.Level) bool {
	return l >= h.c.level.Level()
}

// Handle implements slog.Handler. It only formats and enqueues.
func (h *JournalHandler) Handle(_ context.Context, r slog.Record) error {
	vars := make(map[string]string, 4+len(h.attrs)+r.NumAttrs())
	size := int64(len(r.Message))
	add := func(k, v string) {
		if reservedField(k) {
			k = "X_" + k
		}
		vars[k] = v
		size += int64(len(k) + len(v) + 2)
	}
	for _, a := range h.attrs {
		add(a.k, a.v)
	}
	r.Attrs(func(a slog.Attr) bool {
		flattenAttr(h.prefix, a, add)
		return true
	})
	vars["SYSLOG_IDENTIFIER"] = h.c.ident
	if r.PC != 0 {
		f, _ := runtime.CallersFrames([]uintptr{r.PC}).Next()
		if f.File != "" {
			vars["CODE_FILE"] = f.File
			vars["CODE_LINE"] = strconv.Itoa(f.Line)
			vars["CODE_FUNC"] = f.Function
		}
	}
	h.c.sink.enqueue(entry{msg: r.Message, pri: Priority(r.Level), vars: vars, size: size})
	return nil
}

// WithAttrs implements slog.Handler.
func (h *JournalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	if len(as) == 0 {
		return h
	}
	h2 := *h
	h2.attrs = append([]kvPair(nil), h.attrs...)
	for _, a := range as {
		flattenAttr(h.prefix, a, func(k, v string) { h2.attrs = append(h2.attrs, kvPair{k, v}) })
	}
	return &h2
}

// WithGroup implements slog.Handler.
func (h *JournalHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	h2 := *h
	h2.prefix = h.prefix + name + "_"
	return &h2
}

// Dropped is the number of entries lost so far: queue full, journald
// refused or unreachable, or logged after Close.
func (h *JournalHandler) Dropped() uint64 { return h.c.sink.dropped.Load() }

// Close flushes queued entries (for at most a couple of seconds) and stops
// the sender goroutine. Records handled afterwards are dropped.
func (h *JournalHandler) Close() { h.c.sink.close() }

// reservedField reports the fields the handler sets itself; attributes may
// not replace them.
func reservedField(k string) bool {
	switch k {
	case "MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "CODE_FILE", "CODE_LINE", "CODE_FUNC":
		return true
	}
	return false
}

// flattenAttr resolves a and passes each leaf as (field name, value) to add,
// following slog's rules: empty attributes are ignored, groups with an empty
// key are inlined, empty groups vanish.
func flattenAttr(prefix string, a slog.Attr, add func(k, v string)) {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return
	}
	if a.Value.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += a.Key + "_"
		}
		for _, g := range a.Value.Group() {
			flattenAttr(p, g, add)
		}
		return
	}
	name := FieldName(prefix + a.Key)
	if name == "" {
		return
	}
	add(name, valueString(a.Value))
}

// valueString renders an attribute value. Errors need no case of their
// own: v.String() formats with fmt, which calls Error() and, unlike a direct
// call, survives a typed nil error whose Error() dereferences its receiver.
func valueString(v slog.Value) string {
	if v.Kind() == slog.KindTime {
		return v.Time().Format(time.RFC3339Nano)
	}
	return v.String()
}

// maxFieldName is journald's limit on field name length (JOURNAL_FIELD_NAME_MAX).
const maxFieldName = 64

// FieldName turns an attribute key into a journal field name journald
// accepts: [A-Z0-9_], starting with a letter, at most 64 bytes. Letters are
// upper-cased, every other character becomes '_', leading '_' are dropped
// (journald reserves them for trusted fields) and a leading digit gets an
// "X_" prefix. It returns "" when nothing is left.
func FieldName(key string) string {
	var b strings.Builder
	b.Grow(len(key))
	for _, c := range key { // per rune: one '_' per non-ASCII character
		switch {
		case c >= 'a' && c <= 'z':
			b.WriteByte(byte(c - 'a' + 'A'))
		case c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
			b.WriteByte(byte(c))
		default:
			b.WriteByte('_')
		}
	}
	name := strings.TrimLeft(b.String(), "_")
	if name == "" {
		return ""
	}
	if name[0] >= '0' && name[0] <= '9' {
		name = "X_" + name
	}
	if len(name) > maxFieldName {
		name = name[:maxFieldName]
	}
	return name
}

// levelNames prints LevelNotice and LevelCritical by name in the text and
// JSON handlers (slog would print INFO+2 and ERROR+4).
func levelNames(_ []string, a slog.Attr) slog.Attr {
	if a.Key != slog.LevelKey {
		return a
	}
	if l, ok := a.Value.Any().(slog.Level); ok {
		switch l {
		case LevelNotice:
			a.Value = slog.StringValue("NOTICE")
		case LevelCritical:
			a.Value = slog.StringValue("CRITICAL")
		}
	}
	return a
}

// NewLogHandler builds the hive's log handler for a log format:
//
//   - "journal": native journal entries (JournalHandler);
//   - "json", "text": slog's handlers writing to stderr;
//   - "auto" or "": journal when fd 2 is the journal's stream socket
//     (JOURNAL_STREAM matches, i.e. started by systemd), else text.
//
// When journald is wanted but its socket does not answer, it falls back to
// text on stderr and says so in the first record. The returned close func
// flushes and stops the journal sender (a no-op for the others); call it
// last at shutdown. Use Dropped on a *JournalHandler (type-assert) to export
// the drop count.
func NewLogHandler(mode string, level slog.Leveler, stderr io.Writer) (slog.Handler, func(), error) {
	if level == nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: levelNames}
	text := func() slog.Handler { return slog.NewTextHandler(stderr, opts) }
	noop := func() {}
	switch mode {
	case "text":
		return text(), noop, nil
	case "json":
		return slog.NewJSONHandler(stderr, opts), noop, nil
	case "auto", "":
		isStream, err := journal.StderrIsJournalStream()
		if err != nil || !isStream {
			// A malformed JOURNAL_STREAM means we cannot tell: text is
			// always readable.
			return text(), noop, nil
		}
	case "journal":
	default:
		return nil, nil, fmt.Errorf("log format %q: want auto, journal, json or text", mode)
	}
	// journal.Enabled dials the socket on every call: ask once.
	if !journal.Enabled() {
		h := text()
		slog.New(h).Warn("journald socket not reachable; logging as text to stderr", "format", mode)
		return h, noop, nil
	}
	h := NewJournalHandler(JournalOptions{Level: level})
	return h, h.Close, nil
}
