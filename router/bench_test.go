package router

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func timedPost(b *testing.B, url, body string) time.Duration {
	t0 := time.Now()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		b.Fatalf("status %d", resp.StatusCode)
	}
	return time.Since(t0)
}

// BenchmarkOverhead: a warm worker asked directly, through a bare proxy hop
// and through the router, interleaved in the same run; reports all three
// and the ratios.
func BenchmarkOverhead(b *testing.B) {
	h := newFakeHive(b, 1000, map[string]simModel{"a": {memMiB: 100, slots: 4}})
	_, srv := newTestRouter(b, h, Model{Name: "a", Autoload: true})
	for _, stream := range []bool{false, true} {
		name := map[bool]string{false: "json", true: "stream"}[stream]
		b.Run(name, func(b *testing.B) {
			body := chatBody("a", 16, stream)
			timedPost(b, srv.URL+PathChatCompletions, body) // load, warm both connections
			ws, _ := h.Workers(context.Background(), "a")
			direct := ws[0].URL.JoinPath(RouteChatCompletions).String()
			timedPost(b, direct, body)
			// The same forwarder to a fixed worker without the router: the
			// hop's own cost, to tell it from routing's.
			fwd := &HTTPForwarder{}
			hop := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				fwd.Forward(w, r, Target{Served: "a", WorkerID: ws[0].ID, URL: ws[0].URL}, RouteChatCompletions)
			}))
			defer hop.Close()
			timedPost(b, hop.URL, body)
			var d, p, r time.Duration
			b.ResetTimer()
			for b.Loop() {
				d += timedPost(b, direct, body)
				p += timedPost(b, hop.URL, body)
				r += timedPost(b, srv.URL+PathChatCompletions, body)
			}
			n := float64(b.N)
			b.ReportMetric(float64(d.Microseconds())/n, "direct-µs/req")
			b.ReportMetric(float64(p.Microseconds())/n, "proxied-µs/req")
			b.ReportMetric(float64(r.Microseconds())/n, "routed-µs/req")
			b.ReportMetric(float64(r)/float64(d), "routed/direct")
			b.ReportMetric(float64(r)/float64(p), "routed/proxied")
		})
	}
}

// BenchmarkColdStart: a request for an unloaded model, split into the hive's
// admission, fork/exec, load (exec to /health 200) and the rest up to the
// client's first streamed byte (routing, first token, forwarding).
func BenchmarkColdStart(b *testing.B) {
	h := newFakeHive(b, 1000, map[string]simModel{"a": {memMiB: 100}})
	r, srv := newTestRouter(b, h, Model{Name: "a", Autoload: true})
	var admit, execd, load, ttft, total time.Duration
	for b.Loop() {
		b.StopTimer()
		if _, err := r.Unload(context.Background(), "a"); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		t0 := time.Now()
		resp, err := http.Post(srv.URL+PathChatCompletions, "application/json", strings.NewReader(chatBody("a", 4, true)))
		if err != nil {
			b.Fatal(err)
		}
		rd := bufio.NewReader(resp.Body)
		if _, err := rd.ReadString('\n'); err != nil {
			b.Fatal(err)
		}
		ttft += time.Since(t0)
		_, _ = io.Copy(io.Discard, rd)
		resp.Body.Close()
		total += time.Since(t0)
		h.mu.Lock()
		admit, execd, load = admit+h.last.admit, execd+h.last.exec, load+h.last.load
		h.mu.Unlock()
	}
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / n }
	b.ReportMetric(ms(admit)*1000, "admission-µs")
	b.ReportMetric(ms(execd), "exec-ms")
	b.ReportMetric(ms(load), "load-ms")
	b.ReportMetric(ms(ttft-admit-execd-load), "rest-to-first-byte-ms")
	b.ReportMetric(ms(ttft), "first-byte-ms")
	b.ReportMetric(ms(total), "total-ms")
}
