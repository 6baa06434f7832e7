// Command proxybench measures the inference proxy's overhead: the same
// SSE inference requests straight to a worker and through the hive's
// proxy, in one run, and prints both with their ratio.
//
//	go run ./bench/proxybench [-tokens 64] [-requests 300] [-concurrency 16] [-duration 3s]
//
// The worker is an in-process net/http server that streams unpaced tokens
// in llm-worker-rbee's shape, so the numbers show the proxy's cost, not a
// model's.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/proxy"
)

func main() {
	tokens := flag.Int("tokens", 64, "tokens per streamed answer")
	requests := flag.Int("requests", 300, "sequential requests for the latency figures")
	concurrency := flag.Int("concurrency", 16, "parallel clients for the throughput figures")
	duration := flag.Duration("duration", 3*time.Second, "how long each throughput run lasts")
	flag.Parse()
	if err := run(*tokens, *requests, *concurrency, *duration); err != nil {
		fmt.Fprintln(os.Stderr, "proxybench:", err)
		os.Exit(1)
	}
}

func serve(h http.Handler) (string, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	return "http://" + ln.Addr().String(), func() { srv.Close() }, nil
}

// worker streams started, n tokens, end and [DONE], flushing each event.
func worker(n int) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		rc := http.NewResponseController(w)
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: {\"type\":\"started\",\"job_id\":\"job-1\",\"model\":\"model\",\"started_at\":\"0\"}\n\n")
		rc.Flush()
		for i := range n {
			fmt.Fprintf(w, "data: {\"type\":\"token\",\"t\":\"tok \",\"i\":%d}\n\n", i)
			if rc.Flush() != nil {
				return
			}
		}
		fmt.Fprintf(w, "data: {\"type\":\"end\",\"tokens_out\":%d,\"decode_time_ms\":1,\"stop_reason\":\"MAX_TOKENS\"}\n\ndata: [DONE]\n\n", n)
		rc.Flush()
	})
}

const body = `{"job_id":"job-1","prompt":"hello","max_tokens":64}`

// one does a request and returns the time to the first token event and to
// the end of the stream.
func one(ctx context.Context, c *http.Client, target string) (ttft, total time.Duration, err error) {
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, strings.NewReader(body))
	if err != nil {
		return 0, 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("status %d", resp.StatusCode)
	}
	br := bufio.NewReader(resp.Body)
	done := false
	for {
		line, err := br.ReadString('\n')
		if ttft == 0 && strings.Contains(line, `"type":"token"`) {
			ttft = time.Since(start)
		}
		if strings.HasPrefix(line, "data: [DONE]") {
			done = true
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				return 0, 0, err
			}
			break
		}
	}
	if !done {
		return 0, 0, errors.New("stream ended without [DONE]")
	}
	return ttft, time.Since(start), nil
}

type result struct {
	p50, p99, ttft50 time.Duration
	rps, tps         float64
}

func measure(c *http.Client, target string, tokens, requests, concurrency int, d time.Duration) (result, error) {
	ctx := context.Background()
	for range 20 { // warm connections and code paths
		if _, _, err := one(ctx, c, target); err != nil {
			return result{}, err
		}
	}
	totals := make([]time.Duration, 0, requests)
	ttfts := make([]time.Duration, 0, requests)
	for range requests {
		ttft, total, err := one(ctx, c, target)
		if err != nil {
			return result{}, err
		}
		totals, ttfts = append(totals, total), append(ttfts, ttft)
	}
	slices.Sort(totals)
	slices.Sort(ttfts)
	r := result{p50: totals[len(totals)/2], p99: totals[len(totals)*99/100], ttft50: ttfts[len(ttfts)/2]}

	var n atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	deadline := time.Now().Add(d)
	start := time.Now()
	for range concurrency {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				if _, _, err := one(ctx, c, target); err != nil {
					mu.Lock()
					firstErr = errors.Join(firstErr, err)
					mu.Unlock()
					return
				}
				n.Add(1)
			}
		})
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	r.rps = float64(n.Load()) / el
	r.tps = r.rps * float64(tokens)
	return r, firstErr
}

func run(tokens, requests, concurrency int, d time.Duration) error {
	up, stopUp, err := serve(worker(tokens))
	if err != nil {
		return err
	}
	defer stopUp()
	upURL, err := url.Parse(up)
	if err != nil {
		return err
	}
	p, err := proxy.New(prometheus.NewRegistry(), proxy.Options{})
	if err != nil {
		return err
	}
	router := api.NewRouter(slog.New(slog.DiscardHandler))
	labels := proxy.Labels{Backend: "bench", Model: "bench"}
	router.HandleFunc("POST /v1/workers/{id}/inference", nil, func(w http.ResponseWriter, r *http.Request) {
		p.Serve(w, r, upURL, labels, proxy.Hooks{})
	})
	hive, stopHive, err := serve(router)
	if err != nil {
		return err
	}
	defer stopHive()

	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: concurrency * 2, DisableCompression: true}}
	direct, err := measure(c, up+"/v1/inference", tokens, requests, concurrency, d)
	if err != nil {
		return fmt.Errorf("direct: %w", err)
	}
	via, err := measure(c, hive+"/v1/workers/w-1/inference", tokens, requests, concurrency, d)
	if err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	fmt.Printf("proxybench: %d tokens/answer, %d sequential requests, %d parallel clients for %s\n", tokens, requests, concurrency, d)
	fmt.Printf("%-8s %12s %12s %12s %14s %14s\n", "path", "p50", "p99", "ttft p50", "requests/s", "tokens/s")
	for _, row := range []struct {
		name string
		r    result
	}{{"direct", direct}, {"proxy", via}} {
		fmt.Printf("%-8s %12s %12s %12s %14.0f %14.0f\n", row.name, row.r.p50, row.r.p99, row.r.ttft50, row.r.rps, row.r.tps)
	}
	fmt.Printf("ratio proxy/direct: latency p50 %.2fx, p99 %.2fx, ttft p50 %.2fx, throughput %.2fx\n",
		float64(via.p50)/float64(direct.p50), float64(via.p99)/float64(direct.p99),
		float64(via.ttft50)/float64(direct.ttft50), via.rps/direct.rps)
	return nil
}
