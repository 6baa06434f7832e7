package notify

import (
	"context"
	"net"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var heartbeat = []byte("WATCHDOG=1\nRBEE_HEALTH=healthy\nRBEE_BUSY=0\nRBEE_TOKENS_OUT_TOTAL=123456\nRBEE_RSS_BYTES=104857600")

func BenchmarkParse(b *testing.B) {
	b.Run("fields", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(heartbeat)))
		var f Fields
		for b.Loop() {
			if err := f.Parse(heartbeat); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("map", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(heartbeat)))
		for b.Loop() {
			if _, err := Parse(heartbeat); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// ingest drives b.N heartbeats from one blocking sender goroutine through a
// real socket into recv, and reports datagrams/s and receiver-side CPU per
// datagram (process CPU; the sender shares the process, so "cpu-µs/dgram"
// counts both ends — compare it only against the baseline below).
func ingest(b *testing.B, recv func(ctx context.Context, conn *net.UnixConn, got *atomic.Uint64)) {
	path := filepath.Join(b.TempDir(), "bench.sock")
	l, err := Listen(path)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var got atomic.Uint64
	go recv(ctx, l.Conn(), &got)
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	b.ReportAllocs()
	b.ResetTimer()
	ru0 := rusage()
	start := time.Now()
	for range b.N {
		if _, err := conn.Write(heartbeat); err != nil {
			b.Fatal(err)
		}
	}
	for got.Load() < uint64(b.N) {
		time.Sleep(50 * time.Microsecond)
	}
	el := time.Since(start)
	cpu := rusage() - ru0
	b.StopTimer()
	b.ReportMetric(float64(b.N)/el.Seconds(), "dgrams/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/dgram")
}

func rusage() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkIngest: Listener.Serve (allocation-free recvmsg and parse).
func BenchmarkIngest(b *testing.B) {
	ingest(b, func(ctx context.Context, conn *net.UnixConn, got *atomic.Uint64) {
		l, _ := FromPacketConn(conn)
		l.Serve(ctx, func(m Message) { got.Add(1) })
	})
}

// BenchmarkIngestNaive is the baseline: the obvious net.UnixConn.ReadMsgUnix
// + unix.ParseSocketControlMessage/ParseUnixCredentials + Parse loop.
func BenchmarkIngestNaive(b *testing.B) {
	ingest(b, func(ctx context.Context, conn *net.UnixConn, got *atomic.Uint64) {
		buf := make([]byte, MaxDatagram)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
		context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
		for {
			n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			if flags&unix.MSG_TRUNC != 0 {
				continue
			}
			cms, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil || len(cms) == 0 {
				continue
			}
			cred, err := unix.ParseUnixCredentials(&cms[0])
			if err != nil || cred.Pid == 0 {
				continue
			}
			if _, err := Parse(buf[:n]); err == nil {
				_ = strconv.Itoa(int(cred.Pid))
				got.Add(1)
			}
		}
	})
}
