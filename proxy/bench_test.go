package proxy

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/api"
)

// BenchmarkInference streams a 64-token answer straight from the worker
// and through the proxy; compare the two ns/op (go run ./bench/proxybench
// prints the ratio with percentiles and a parallel throughput figure).
func BenchmarkInference(b *testing.B) {
	const tokens = 64
	up := httptest.NewServer(&worker{tokens: tokens, decodeMs: 1})
	defer up.Close()
	upURL, _ := url.Parse(up.URL)
	p, err := New(prometheus.NewRegistry(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	router := api.NewRouter(slog.New(slog.DiscardHandler))
	router.HandleFunc("POST /v1/workers/{id}/inference", nil, func(w http.ResponseWriter, r *http.Request) {
		p.Serve(w, r, upURL, testLabels, Hooks{})
	})
	hive := httptest.NewServer(router)
	defer hive.Close()

	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}}
	for _, bc := range []struct{ name, url string }{
		{"direct", up.URL + "/v1/inference"},
		{"proxy", hive.URL + "/v1/workers/w-1/inference"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				resp, err := c.Post(bc.url, "application/json", strings.NewReader(body))
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != http.StatusOK || n == 0 {
					b.Fatalf("status %d, %d bytes, %v", resp.StatusCode, n, err)
				}
			}
			b.ReportMetric(float64(b.N*tokens)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}
