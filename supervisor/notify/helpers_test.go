package notify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/worker"
)

// The test binary doubles as the sender (and namespaced receiver) process,
// so every datagram in these tests crosses a real socket from a real,
// separate process.
const helperEnv = "RBEE_NOTIFY_TEST_HELPER"

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(runHelper(mode))
	}
	os.Exit(m.Run())
}

// helper starts this test binary in helper mode.
func helper(mode string, env ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append(env, helperEnv+"="+mode)...)
	cmd.Stderr = os.Stderr
	return cmd
}

func runHelper(mode string) int {
	ctx := context.Background()
	sock := os.Getenv("NOTIFY_SOCKET")
	fail := func(err error) int { fmt.Fprintln(os.Stderr, mode+":", err); return 3 }
	switch mode {
	case "worker":
		n := worker.New(worker.Env{NotifySocket: sock})
		if err := n.Ready(ctx, worker.ReadyInfo{}); err != nil {
			return fail(err)
		}
		if err := n.Heartbeat(ctx, worker.Health{Status: worker.Degraded, Figures: map[string]string{"TOKENS_PER_SEC": "12.5"}}); err != nil {
			return fail(err)
		}
		if err := n.Stopping(ctx); err != nil {
			return fail(err)
		}
	case "sdnotify":
		for _, s := range []string{daemon.SdNotifyReady, "WATCHDOG=1\nRBEE_HEALTH=healthy\nSTATUS=serving 3 requests"} {
			if ok, err := daemon.SdNotify(false, s); !ok || err != nil {
				return fail(fmt.Errorf("SdNotify: %v %w", ok, err))
			}
		}
	case "flood":
		n, _ := strconv.Atoi(os.Getenv("FLOOD_N"))
		res, err := flood(sock, n)
		if err != nil {
			return fail(err)
		}
		json.NewEncoder(os.Stdout).Encode(res)
	case "activated":
		l, err := FromActivation()
		if err != nil {
			return fail(err)
		}
		defer l.Close()
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		fmt.Println("serving") // SO_PASSCRED is on from here
		var got Message
		l.Serve(ctx, func(m Message) { got = m.Clone(); cancel() })
		json.NewEncoder(os.Stdout).Encode(struct {
			PID    int32
			Fields map[string]string
			Stats  Stats
		}{got.PID, got.Fields.Map(), l.Stats()})
	case "nsrecv":
		return nsReceiver(sock)
	default:
		return fail(errors.New("unknown helper mode"))
	}
	return 0
}

// floodResult is the sender's own account of what it sent and what the
// kernel refused (EAGAIN/ENOBUFS on a full receive queue).
type floodResult struct {
	Sent, Refused                    map[string]int
	SentTotal, RefusedTotal, Drained int
}

// flood sends n datagrams without blocking: every 97th oversize, every
// 89th malformed, the rest heartbeats. After a refusal it waits (poll) for
// room, so the run mixes accepted and refused datagrams.
func flood(sock string, n int) (floodResult, error) {
	r := floodResult{Sent: map[string]int{}, Refused: map[string]int{}}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return r, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: sock}); err != nil {
		return r, fmt.Errorf("connect: %w", err)
	}
	big := []byte("STATUS=" + strings.Repeat("x", MaxDatagram))
	bad := []byte("WATCHDOG=1\nno equals sign")
	for i := range n {
		kind, b := "ok", []byte("WATCHDOG=1\nRBEE_HEALTH=healthy\nRBEE_SEQ="+strconv.Itoa(i))
		switch {
		case i%97 == 0:
			kind, b = ReasonOversize, big
		case i%89 == 0:
			kind, b = ReasonMalformed, bad
		}
		r.Sent[kind]++
		r.SentTotal++
		if err := unix.Send(fd, b, 0); err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.ENOBUFS) {
				r.Refused[kind]++
				r.RefusedTotal++
				unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}, 1000)
				continue
			}
			return r, fmt.Errorf("send %d: %w", i, err)
		}
	}
	return r, nil
}

// nsReceiver runs inside a new pid namespace: datagrams from processes
// outside it arrive with pid 0 (the kernel cannot name the sender here).
func nsReceiver(path string) int {
	l, err := Listen(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go l.Serve(ctx, func(Message) {})
	// Tell the parent we listen, then send one datagram from inside.
	fmt.Println("listening")
	os.Stdout.Sync()
	buf := make([]byte, 16)
	os.Stdin.Read(buf) // parent has sent its datagram
	n := worker.New(worker.Env{NotifySocket: path})
	if err := n.Notify(ctx, "READY=1"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	for ctx.Err() == nil && l.Stats().Received < 2 {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	time.Sleep(10 * time.Millisecond)
	json.NewEncoder(os.Stdout).Encode(struct {
		Stats Stats
		Self  int
	}{l.Stats(), os.Getpid()})
	return 0
}
