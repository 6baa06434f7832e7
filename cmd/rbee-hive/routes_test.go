package main

import (
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/api"
)

// TestRouteTableAuth walks the daemon's route table: every route that is
// not public answers 401 with WWW-Authenticate to a request without a
// token, so a route registered without auth cannot slip in; every route is
// served (none is a 404 or 405 of the mux).
func TestRouteTableAuth(t *testing.T) {
	d := startDaemon(t, "")
	noAuth := func(*http.Request) *api.Error { return nil } // only the table is read here
	table := (&hive{}).routeTable(prometheus.NewRegistry(), slog.New(slog.DiscardHandler), noAuth)
	if len(table) < 10 {
		t.Fatalf("route table has %d routes", len(table))
	}
	public := 0
	for _, rt := range table {
		method, path, ok := strings.Cut(rt.Pattern, " ")
		if !ok {
			t.Fatalf("route %q has no method", rt.Pattern)
		}
		path = strings.NewReplacer("{id}", "w-nosuchworker", "{ref...}", "hf:org/repo").Replace(path)
		req, err := http.NewRequest(method, d.url+path, strings.NewReader(`{}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", rt.Pattern, err)
		}
		resp.Body.Close()
		switch rt.Auth {
		case api.AuthPublic:
			public++
			if resp.StatusCode != http.StatusOK {
				t.Errorf("%s (public): %d without a token", rt.Pattern, resp.StatusCode)
			}
		case api.AuthToken, api.AuthWorkerToken:
			if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("%s (%s): %d WWW-Authenticate=%q without a token, want 401 and a Bearer challenge",
					rt.Pattern, rt.Auth, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
			}
		default:
			t.Errorf("%s: auth class %q", rt.Pattern, rt.Auth)
		}
	}
	if public != 2 {
		t.Errorf("%d public routes, want 2 (health and metrics)", public)
	}
}
