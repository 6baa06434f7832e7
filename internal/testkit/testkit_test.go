package testkit

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
)

func TestSyncBufferConcurrent(t *testing.T) {
	var b SyncBuffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				_, _ = b.Write([]byte("x"))
				_ = b.String()
			}
		}()
	}
	wg.Wait()
	if n := len(b.String()); n != 800 {
		t.Errorf("got %d bytes, want 800", n)
	}
}

func TestFreePortIsBindable(t *testing.T) {
	p := FreePort(t)
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
	if err != nil {
		t.Fatalf("port %d not bindable: %v", p, err)
	}
	ln.Close()
}

// TestSkipFailsInCI runs a test that skips in a child test binary, once
// with CI set and once without: only the latter may pass.
func TestSkipFailsInCI(t *testing.T) {
	if os.Getenv("TESTKIT_CHILD") == "1" {
		Skip(t, "child skip")
		return
	}
	for _, tt := range []struct {
		ci       string
		wantFail bool
	}{{"", false}, {"false", false}, {"true", true}, {"1", true}} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSkipFailsInCI$", "-test.v")
		cmd.Env = append(os.Environ(), "TESTKIT_CHILD=1", "CI="+tt.ci)
		out, err := cmd.CombinedOutput()
		if failed := err != nil; failed != tt.wantFail {
			t.Errorf("CI=%q: failed=%v, want %v\n%s", tt.ci, failed, tt.wantFail, out)
		}
		if !tt.wantFail && !strings.Contains(string(out), "--- SKIP") {
			t.Errorf("CI=%q: want a skip\n%s", tt.ci, out)
		}
	}
}
