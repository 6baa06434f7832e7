package router

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// listHive is a hive whose workers are fixed and always ready.
type listHive struct{ ws []Worker }

func (h listHive) Workers(context.Context, string) ([]Worker, error) { return h.ws, nil }
func (h listHive) Spawn(context.Context, string) (Worker, error) {
	return Worker{}, errors.New("no spawns here")
}
func (h listHive) Stop(context.Context, string) error { return nil }

// TestUnreachableWorkerRoutedAgain: a forwarder's 502 before any byte (a
// worker that died a moment ago) is held back once and the request goes to
// another worker; a second 502 reaches the client.
func TestUnreachableWorkerRoutedAgain(t *testing.T) {
	u, _ := url.Parse("http://127.0.0.1:1")
	hive := listHive{ws: []Worker{{ID: "w-dead", URL: u, State: StateReady}, {ID: "w-live", URL: u, State: StateReady}}}
	for _, tc := range []struct {
		name       string
		dead       map[string]bool
		wantStatus int
		wantCalls  string
	}{
		{"one dead", map[string]bool{"w-dead": true}, 200, "w-dead w-live"},
		{"both dead", map[string]bool{"w-dead": true, "w-live": true}, 502, "w-dead w-live"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var calls []string
			fwd := ForwarderFunc(func(w http.ResponseWriter, r *http.Request, tg Target, route string) {
				mu.Lock()
				calls = append(calls, tg.WorkerID)
				mu.Unlock()
				b, _ := io.ReadAll(r.Body)
				if !strings.Contains(string(b), `"model":"m"`) {
					t.Errorf("attempt on %s got body %q", tg.WorkerID, b)
				}
				if tc.dead[tg.WorkerID] {
					WriteError(w, http.StatusBadGateway, "server_error", "worker_unreachable", "connection refused", 0)
					return
				}
				w.Header().Set("Content-Type", "application/json")
				_, _ = io.WriteString(w, `{"ok":true}`)
			})
			r, err := New(hive, fwd, []Model{{Name: "m", Autoload: true, Queue: 4, LoadTimeout: time.Second}}, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			srv := httptest.NewServer(r.Handler())
			defer srv.Close()
			resp, err := http.Post(srv.URL+PathChatCompletions, "application/json", strings.NewReader(`{"model":"m"}`))
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.wantStatus || strings.Count(string(body), "{") > 2 {
				t.Errorf("status %d body %q, want %d and one answer", resp.StatusCode, body, tc.wantStatus)
			}
			if got := strings.Join(calls, " "); got != tc.wantCalls {
				t.Errorf("attempts %q, want %q", got, tc.wantCalls)
			}
		})
	}
}
