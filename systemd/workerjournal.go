package systemd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"

	"github.com/coreos/go-systemd/v22/journal"
)

// Worker output reaches the journal through this sink, which the supervisor
// feeds line by line from the worker's stdout/stderr pipes. The simpler
// stream protocol (handing the worker a socket to /run/systemd/journal/stdout,
// as systemd does for services) cannot attach fields per entry: every line of
// a stream gets the same identifier and nothing like RBEE_WORKER_ID, BACKEND
// or MODEL, so `journalctl RBEE_WORKER_ID=w-…` could not work. Native entries
// can carry them.

// WorkerIdentifier is the SYSLOG_IDENTIFIER of worker output
// (journalctl -t rbee-worker).
const WorkerIdentifier = "rbee-worker"

// MaxLineBytes is where a worker line is cut: journald's own LineMax default
// for stream clients, so a runaway line cannot eat the queue's byte budget.
const MaxLineBytes = 48 << 10

// WorkerJournalOptions configures a WorkerJournal. Zero values pick defaults.
type WorkerJournalOptions struct {
	Identifier string // SYSLOG_IDENTIFIER; "": WorkerIdentifier
	QueueSize  int    // lines waiting for journald; 0: 4096
	QueueBytes int64  // bytes waiting for journald; 0: 8 MiB
	// Fallback receives lines as "rbee-worker[<id>] <stream>: <line>" when
	// journald is not reachable at construction (foreground runs, tests).
	// nil: such lines are dropped and counted.
	Fallback io.Writer
	// NoLevelPrefix turns off "<N>" parsing (sd-daemon(3) SD_ERR etc.); by
	// default a line starting with <0>..<7> gets that priority, the prefix
	// removed, as journald does for services.
	NoLevelPrefix bool
}

// WorkerJournal files worker output lines as native journal entries:
// MESSAGE=<line>, SYSLOG_IDENTIFIER=rbee-worker, RBEE_WORKER_ID=<id>,
// RBEE_STREAM=stdout|stderr, PRIORITY 6 (info) for both streams unless the
// line starts with a <N> prefix, plus the worker's fixed fields (BACKEND,
// MODEL, ...). stderr is not a severity: llama-server and the simworker
// write every ordinary INFO line there, and filing them at warning drowned
// `journalctl -p warning` in noise. A worker that means a warning says so
// with <4>, as journald's stream protocol reads it; RBEE_STREAM keeps the
// stream for `journalctl RBEE_STREAM=stderr`.
//
// WriteLine never blocks: lines go through a bounded queue (entries and
// bytes) to one sender goroutine, separate from the hive's own log queue so
// a chatty worker cannot crowd out the hive's records. Lines that do not fit,
// or that journald refuses, are dropped and counted (Dropped).
type WorkerJournal struct {
	ident    string
	prefixes bool
	sink     *sink
}

// NewWorkerJournal starts the sink. It asks once whether journald is
// reachable; if not, lines go to opts.Fallback.
func NewWorkerJournal(opts WorkerJournalOptions) *WorkerJournal {
	if opts.Identifier == "" {
		opts.Identifier = WorkerIdentifier
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 4096
	}
	if opts.QueueBytes <= 0 {
		opts.QueueBytes = 8 << 20
	}
	send := sendJournal
	if !journal.Enabled() {
		send = fallbackSender(opts.Fallback, opts.Identifier)
	}
	return &WorkerJournal{
		ident:    opts.Identifier,
		prefixes: !opts.NoLevelPrefix,
		sink:     newSink(opts.QueueSize, opts.QueueBytes, send),
	}
}

// fallbackSender writes lines as text; still from the sender goroutine, so a
// blocked stderr pipe cannot block the supervisor either.
func fallbackSender(w io.Writer, ident string) func(entry) error {
	return func(e entry) error {
		if w == nil {
			return errors.New("journald not reachable and no fallback writer")
		}
		_, err := fmt.Fprintf(w, "%s[%s] %s: %s\n", ident, e.vars["RBEE_WORKER_ID"], e.vars["RBEE_STREAM"], e.msg)
		return err
	}
}

// WorkerLog writes the lines of one worker. Get one per worker from Worker.
type WorkerLog struct {
	j      *WorkerJournal
	id     string
	fields map[string]string // fixed fields, names already valid
}

// Worker returns the writer for one worker. fields are added to every entry
// (e.g. {"BACKEND": "llama", "MODEL": "qwen2.5-0.5b"}); their keys go through
// FieldName, and keys the sink sets itself are ignored. Adding
// "OBJECT_PID": <worker pid> makes journald attach the worker's OBJECT_COMM,
// OBJECT_EXE, ... to each entry (the sender, _PID, is always the hive).
func (j *WorkerJournal) Worker(id string, fields map[string]string) *WorkerLog {
	w := &WorkerLog{j: j, id: id, fields: make(map[string]string, len(fields))}
	for k, v := range fields {
		name := FieldName(k)
		switch name {
		case "", "MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "RBEE_WORKER_ID", "RBEE_STREAM":
			continue
		}
		w.fields[name] = v
	}
	return w
}

// WriteLine files one line of workerID's output without fixed fields; see
// WorkerLog.WriteLine.
func (j *WorkerJournal) WriteLine(workerID, stream string, line []byte) {
	j.Worker(workerID, nil).WriteLine(stream, line)
}

// WriteLine files one output line. stream is "stdout" or "stderr". A
// trailing newline is removed and lines over MaxLineBytes are cut. line is
// copied, so the caller may reuse its buffer (bufio.Scanner does).
func (w *WorkerLog) WriteLine(stream string, line []byte) {
	line = bytes.TrimRight(line, "\r\n")
	pri := journal.PriInfo // both streams; see WorkerJournal
	if w.j.prefixes && len(line) >= 3 && line[0] == '<' && line[1] >= '0' && line[1] <= '7' && line[2] == '>' {
		pri = journal.Priority(line[1] - '0')
		line = line[3:]
	}
	if len(line) > MaxLineBytes {
		line = line[:MaxLineBytes]
	}
	vars := make(map[string]string, len(w.fields)+3)
	maps.Copy(vars, w.fields)
	vars["SYSLOG_IDENTIFIER"] = w.j.ident
	vars["RBEE_WORKER_ID"] = w.id
	vars["RBEE_STREAM"] = stream
	size := int64(len(line) + len(w.id) + len(stream) + 64)
	for k, v := range w.fields {
		size += int64(len(k) + len(v) + 2)
	}
	w.j.sink.enqueue(entry{msg: string(line), pri: pri, vars: vars, size: size})
}

// Dropped is the number of lines lost so far: queue full, journald refused
// or unreachable, or written after Close.
func (j *WorkerJournal) Dropped() uint64 { return j.sink.dropped.Load() }

// Close flushes queued lines (for at most a couple of seconds) and stops
// the sender goroutine.
func (j *WorkerJournal) Close() { j.sink.close() }
