package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/rbee/rbee-hive/internal/fdhandover"
)

// The in-place upgrade (SIGHUP, `systemctl reload`): the binary on disk
// replaces this one in the same pid (docs/adoption.md, section 5). Workers
// stay children and keep running; the API listener and the notify socket
// are handed over, so a client's connection waits in the backlog and a
// worker's datagram in the socket's queue; the new binary adopts the
// workers from the registry.

// reloadDrain bounds the wait for in-flight requests (inference streams)
// before the exec; those still open then are cut.
const reloadDrain = 60 * time.Second

type upgrader struct {
	log *slog.Logger
	h   *hive
	srv *http.Server
	ln  net.Listener
}

// run upgrades in place. It returns only when it did not exec: resumed
// reports that nothing was stopped yet (the hive serves on).
func (u *upgrader) run() (resumed bool, err error) {
	u.log.Info("SIGHUP received: upgrading in place")
	_ = u.h.notifier.Reloading()
	ready := func() { _ = u.h.notifier.Ready() }
	path, err := selfPath()
	if err != nil {
		ready()
		return true, err
	}
	// Pre-flight: the binary on disk must run at all.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	out, err := exec.CommandContext(ctx, path, "version").CombinedOutput()
	cancel()
	if err != nil {
		ready()
		return true, fmt.Errorf("pre-flight %s version: %w (%s)", path, err, out)
	}
	tl, ok := u.ln.(*net.TCPListener)
	if !ok {
		ready()
		return true, errors.New("the API listener is not TCP")
	}
	// Duplicates: Shutdown closes the listener, the dup keeps the socket
	// (and its backlog) open for the next binary.
	lnFile, err := tl.File()
	if err != nil {
		ready()
		return true, fmt.Errorf("api listener: %w", err)
	}
	notifyFile, err := u.h.listener.Conn().File()
	if err != nil {
		lnFile.Close()
		ready()
		return true, fmt.Errorf("notify socket: %w", err)
	}
	// From here on the API no longer takes connections: in-flight requests
	// (streams) finish within reloadDrain.
	drain, cancel := context.WithTimeout(context.Background(), reloadDrain)
	if err := u.srv.Shutdown(drain); err != nil {
		u.log.Warn("in-flight requests cut by the upgrade", "err", err)
	}
	cancel()
	fctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	err = u.h.sup.Detach(fctx)
	cancel()
	if err != nil {
		return false, err
	}
	var set fdhandover.Set
	if err := set.Add("api", lnFile); err != nil {
		return false, err
	}
	if err := set.Add("notify", notifyFile); err != nil {
		return false, err
	}
	u.log.Info("exec of the new binary", "path", path, "version_before", version)
	return false, fdhandover.Exec(path, os.Args, os.Environ(), &set)
}

// selfPath is the binary on disk this hive was started as: os.Args[0]
// resolved, not /proc/self/exe (the old inode, maybe deleted by the
// package manager).
func selfPath() (string, error) {
	p := os.Args[0]
	if filepath.Base(p) == p {
		lp, err := exec.LookPath(p)
		if err != nil {
			return "", fmt.Errorf("finding the hive binary: %w", err)
		}
		p = lp
	}
	return filepath.Abs(p)
}

// handedOver takes the API listener and the notify socket an in-place
// upgrade handed to this process; nil, nil when none was (a normal start).
func handedOver(log *slog.Logger) (net.Listener, *os.File, error) {
	if _, ok := os.LookupEnv(fdhandover.EnvFDs); !ok {
		return nil, nil, nil
	}
	r, err := fdhandover.Receive()
	if err != nil {
		log.Warn("descriptors handed over by the previous binary", "err", err)
	}
	ln, lerr := r.Listener("api")
	if lerr != nil && !errors.Is(lerr, fdhandover.ErrNotHanded) {
		return nil, nil, fmt.Errorf("handed-over API listener: %w", lerr)
	}
	nf := r.Take("notify")
	r.CloseRest()
	if ln != nil {
		log.Info("upgraded in place: serving on the handed-over listener", "addr", ln.Addr().String(), "version", version)
	}
	return ln, nf, nil
}

// processStart is when this binary began (an exec starts it anew).
var processStart = time.Now()

// runUpgrade is `rbee-hive upgrade`: SIGHUP to the hive, then wait until
// the API answers from the new binary (a new started_at) and print the
// versions. Under systemd it is the unit's ExecReload= ($MAINPID), so the
// reload job ends when the new binary serves.
func runUpgrade(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("upgrade", flag.ContinueOnError)
	pid := fs.Int("pid", 0, "the hive's pid (default $MAINPID)")
	c, err := parseClient(fs, args)
	if err != nil {
		return err
	}
	if *pid == 0 {
		if *pid, err = strconv.Atoi(os.Getenv("MAINPID")); err != nil || *pid <= 0 {
			return fmt.Errorf("%w: upgrade needs --pid or $MAINPID", errUsage)
		}
	}
	var before healthView
	if err := c.do(ctx, "GET", "/v1/health", nil, &before); err != nil {
		return err
	}
	if err := syscall.Kill(*pid, syscall.SIGHUP); err != nil {
		return fmt.Errorf("signalling the hive (pid %d): %w", *pid, err)
	}
	deadline := time.Now().Add(reloadDrain + 60*time.Second)
	for {
		var after healthView
		if err := c.do(ctx, "GET", "/v1/health", nil, &after); err == nil && after.StartedAt != before.StartedAt {
			fmt.Fprintf(stdout, "upgraded in place: pid %d, version %s -> %s\n", *pid, before.Version, after.Version)
			return nil
		}
		if syscall.Kill(*pid, 0) != nil {
			return fmt.Errorf("the hive (pid %d) ended during the upgrade", *pid)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the hive (pid %d) did not come back from the upgrade in time", *pid)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
