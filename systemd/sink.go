package systemd

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
)

// entry is one journal entry waiting in a sink's queue.
type entry struct {
	msg  string
	pri  journal.Priority
	vars map[string]string
	size int64 // bytes counted against the queue's byte budget
}

// sink is a bounded queue in front of one sender goroutine. Callers never
// block: journald can stall (its receive queue is full while it is stopped
// or slow, and go-systemd's socket has no deadline), so an entry that does
// not fit is dropped and counted instead.
type sink struct {
	queue    chan entry
	maxBytes int64
	queued   atomic.Int64 // bytes in queue
	send     func(entry) error
	dropped  atomic.Uint64
	closed   atomic.Bool
	cancel   context.CancelFunc
	done     chan struct{}
	once     sync.Once
}

// Flush budget on close: enough to hand a few thousand queued entries to a
// healthy journald, short enough that a stalled one cannot hang shutdown.
const closeFlushTimeout = 2 * time.Second

func newSink(entries int, maxBytes int64, send func(entry) error) *sink {
	ctx, cancel := context.WithCancel(context.Background())
	s := &sink{
		queue:    make(chan entry, entries),
		maxBytes: maxBytes,
		send:     send,
		cancel:   cancel,
		done:     make(chan struct{}),
	}
	go s.run(ctx)
	return s
}

// enqueue hands e to the sender or drops it; it never blocks.
func (s *sink) enqueue(e entry) {
	if s.closed.Load() {
		s.dropped.Add(1)
		return
	}
	if s.queued.Add(e.size) > s.maxBytes {
		s.queued.Add(-e.size)
		s.dropped.Add(1)
		return
	}
	select {
	case s.queue <- e:
	default:
		s.queued.Add(-e.size)
		s.dropped.Add(1)
	}
}

func (s *sink) run(ctx context.Context) {
	defer close(s.done)
	for {
		select {
		case e := <-s.queue:
			s.deliver(e)
		case <-ctx.Done():
			for { // flush what is already queued; close bounds the wait
				select {
				case e := <-s.queue:
					s.deliver(e)
				default:
					return
				}
			}
		}
	}
}

func (s *sink) deliver(e entry) {
	s.queued.Add(-e.size)
	if err := s.send(e); err != nil {
		// journald gone (ECONNREFUSED/ENOENT) or the entry refused: there
		// is nowhere to report it but the counter.
		s.dropped.Add(1)
	}
}

// close stops accepting entries, flushes the queue for at most
// closeFlushTimeout and stops the sender. Safe to call more than once.
func (s *sink) close() {
	s.once.Do(func() {
		s.closed.Store(true)
		s.cancel()
		select {
		case <-s.done:
		case <-time.After(closeFlushTimeout):
			// The sender is stuck in a send to a stalled journald; it
			// exits once that send returns.
		}
	})
}
