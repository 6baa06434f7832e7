package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/supervisor"
	workerproto "github.com/rbee/rbee-hive/worker"
)

func runConfig(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("config", flag.ContinueOnError)
	path := fs.String("config", "", "TOML config file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := loadDaemonConfig(daemonFlags{configPath: *path})
	if err != nil {
		return err
	}
	b, err := cfg.TOML()
	if err != nil {
		return err
	}
	_, err = stdout.Write(b)
	return err
}

// workerView is the subset of the API's worker JSON the CLI prints.
type workerView struct {
	ID           string `json:"id"`
	URL          string `json:"url"`
	ModelRef     string `json:"model_ref"`
	Backend      string `json:"backend"`
	Device       int    `json:"device"`
	State        string `json:"state"`
	PID          *int   `json:"pid"`
	RestartCount int    `json:"restart_count"`
	Health       string `json:"health,omitempty"`
	StartedAt    string `json:"started_at,omitempty"`
	ExitReason   string `json:"exit_reason,omitempty"`
}

// healthView is the body of GET /v1/health.
type healthView struct {
	Status     string `json:"status"`
	Version    string `json:"version"`
	APIVersion string `json:"api_version"`
	StartedAt  string `json:"started_at"` // this binary's start: an in-place upgrade changes it, not the pid
}

func runStatus(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	c, err := parseClient(fs, args)
	if err != nil {
		return err
	}
	var health healthView
	if err := c.do(ctx, "GET", "/v1/health", nil, &health); err != nil {
		return err
	}
	var list struct {
		Workers []workerView `json:"workers"`
	}
	listErr := c.do(ctx, "GET", "/v1/workers/list", nil, &list)
	if c.json {
		out := struct {
			Health  healthView    `json:"health"`
			Workers *[]workerView `json:"workers,omitempty"` // absent when the list failed
		}{Health: health}
		if listErr == nil {
			out.Workers = &list.Workers
		}
		return printJSON(stdout, out)
	}
	fmt.Fprintf(stdout, "hive:    %s %s (api %s)\n", c.base, health.Status, health.APIVersion)
	fmt.Fprintf(stdout, "version: %s\n", health.Version)
	if listErr != nil {
		fmt.Fprintf(stdout, "workers: unavailable: %v\n", listErr)
		return nil
	}
	byState := map[string]int{}
	for _, w := range list.Workers {
		byState[w.State]++
	}
	states := make([]string, 0, len(byState))
	for s, n := range byState {
		states = append(states, fmt.Sprintf("%d %s", n, s))
	}
	sort.Strings(states)
	fmt.Fprintf(stdout, "workers: %d", len(list.Workers))
	if len(states) > 0 {
		fmt.Fprintf(stdout, " (%s)", strings.Join(states, ", "))
	}
	fmt.Fprintln(stdout)
	return nil
}

// runWorkers dispatches `rbee-hive workers <ls|spawn|show|stop|logs>`.
func runWorkers(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: workers needs ls, spawn, show, stop or logs", errUsage)
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("workers "+sub, flag.ContinueOnError)
	switch sub {
	case "ls", "list":
		c, err := parseClient(fs, args)
		if err != nil {
			return err
		}
		return workersList(ctx, c, stdout)
	case "spawn":
		return workersSpawn(ctx, fs, args, stdout)
	case "show":
		return workersShow(ctx, fs, args, stdout)
	case "stop":
		return workersStop(ctx, fs, args, stdout)
	case "logs":
		return workersLogs(ctx, fs, args, stdout)
	default:
		return fmt.Errorf("%w: unknown workers command %q", errUsage, sub)
	}
}

// workerIDArg parses the client flags and the one worker id argument.
func workerIDArg(fs *flag.FlagSet, args []string) (*client, string, error) {
	c, err := parseClient(fs, args)
	if err != nil {
		return nil, "", err
	}
	if fs.NArg() != 1 {
		return nil, "", fmt.Errorf("%w: %s needs one worker id", errUsage, fs.Name())
	}
	return c, fs.Arg(0), nil
}

func workersSpawn(ctx context.Context, fs *flag.FlagSet, args []string, stdout io.Writer) error {
	backend := fs.String("backend", "sim", "backend name from the hive's config")
	modelRef := fs.String("model", "", "model reference (hf:org/repo[:file], file:/path)")
	device := fs.Int64("device", 0, "device index")
	restart := fs.String("restart", "", "never, on-failure or always")
	memory := fs.String("memory", "", "memory limit, e.g. 4GiB")
	c, err := parseClient(fs, args)
	if err != nil {
		return err
	}
	if *modelRef == "" {
		return fmt.Errorf("%w: workers spawn needs --model", errUsage)
	}
	req := supervisor.SpawnRequest{ModelRef: *modelRef, Backend: *backend, Device: device,
		Restart: supervisor.RestartPolicy(*restart)}
	if *memory != "" {
		n, err := parseSizeFlag(*memory)
		if err != nil {
			return err
		}
		req.MemoryLimitBytes = &n
	}
	var out supervisor.SpawnResult
	if err := c.do(ctx, "POST", "/v1/workers/spawn", req, &out); err != nil {
		return err
	}
	if c.json {
		return printJSON(stdout, out)
	}
	fmt.Fprintf(stdout, "%s %s %s\n", out.WorkerID, out.State, out.URL)
	return nil
}

func workersShow(ctx context.Context, fs *flag.FlagSet, args []string, stdout io.Writer) error {
	c, id, err := workerIDArg(fs, args)
	if err != nil {
		return err
	}
	var wi supervisor.WorkerInfo
	if err := c.do(ctx, "GET", "/v1/workers/"+url.PathEscape(id), nil, &wi); err != nil {
		return err
	}
	if c.json {
		return printJSON(stdout, wi)
	}
	return printWorker(stdout, wi, time.Now())
}

func workersStop(ctx context.Context, fs *flag.FlagSet, args []string, stdout io.Writer) error {
	c, id, err := workerIDArg(fs, args)
	if err != nil {
		return err
	}
	var wi supervisor.WorkerInfo
	if err := c.do(ctx, "DELETE", "/v1/workers/"+url.PathEscape(id), nil, &wi); err != nil {
		return err
	}
	if c.json {
		return printJSON(stdout, wi)
	}
	fmt.Fprintf(stdout, "%s stopped\n", id)
	return nil
}

func workersLogs(ctx context.Context, fs *flag.FlagSet, args []string, stdout io.Writer) error {
	stream := fs.String("stream", "", "stdout or stderr (default both)")
	c, id, err := workerIDArg(fs, args)
	if err != nil {
		return err
	}
	q := ""
	if *stream != "" {
		q = "?stream=" + url.QueryEscape(*stream)
	}
	resp, err := c.send(ctx, "GET", "/v1/workers/"+url.PathEscape(id)+"/logs"+q, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(stdout, resp.Body)
	return err
}

// printWorker is the human view of one worker: a "key: value" line per
// field that has a value.
func printWorker(out io.Writer, wi supervisor.WorkerInfo, now time.Time) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	line := func(k, format string, v ...any) { fmt.Fprintf(tw, "%s:\t"+format+"\n", append([]any{k}, v...)...) }
	state := string(wi.State)
	if wi.StateReason != "" {
		state += " (" + wi.StateReason + ")"
	}
	line("id", "%s", wi.ID)
	line("state", "%s", state)
	line("backend", "%s (device %d, health mode %s)", wi.Backend, wi.Device, wi.HealthMode)
	line("model", "%s", wi.ModelRef)
	line("url", "%s", wi.URL)
	if wi.PID != nil {
		line("pid", "%d", *wi.PID)
	}
	if wi.StartedAt != nil {
		line("uptime", "%s", now.Sub(*wi.StartedAt).Truncate(time.Second))
	}
	if wi.Health != "" {
		line("health", "%s", wi.Health)
	}
	if wi.Status != "" {
		line("status", "%s", wi.Status)
	}
	if wi.LastHeartbeat != nil {
		line("last heartbeat", "%s ago", now.Sub(*wi.LastHeartbeat).Truncate(time.Millisecond))
	}
	line("restarts", "%d (policy %s)", wi.RestartCount, wi.RestartPolicy)
	if wi.ExitReason != "" {
		exit := string(wi.ExitReason)
		if wi.ExitCode != nil {
			exit += fmt.Sprintf(", code %d", *wi.ExitCode)
		}
		if wi.ExitSignal != nil {
			exit += fmt.Sprintf(", signal %d", *wi.ExitSignal)
		}
		line("last exit", "%s", exit)
	}
	line("memory limit", "%s", gpu.FormatBytes(uint64(wi.MemoryLimitBytes)))
	if r := wi.Resources; r != nil {
		line("memory", "%s (peak %s)", gpu.FormatBytes(r.MemoryCurrentBytes), gpu.FormatBytes(r.MemoryPeakBytes))
		if r.CPUPercent != nil {
			line("cpu", "%.1f%%", *r.CPUPercent)
		}
		if r.VRAMBytes != nil {
			line("vram", "%s", gpu.FormatBytes(*r.VRAMBytes))
		}
	}
	line("in flight", "%d", wi.InFlight)
	keys := make([]string, 0, len(wi.Figures))
	for k := range wi.Figures {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		line(k, "%s", wi.Figures[k])
	}
	return tw.Flush()
}

func workersList(ctx context.Context, c *client, stdout io.Writer) error {
	var list struct {
		Workers []workerView `json:"workers"`
	}
	if err := c.do(ctx, "GET", "/v1/workers/list", nil, &list); err != nil {
		return err
	}
	sort.Slice(list.Workers, func(i, j int) bool { return list.Workers[i].ID < list.Workers[j].ID })
	if c.json {
		return printJSON(stdout, list)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tBACKEND\tDEVICE\tPID\tRESTARTS\tUPTIME\tURL\tMODEL")
	for _, w := range list.Workers {
		pid := "-"
		if w.PID != nil {
			pid = fmt.Sprint(*w.PID)
		}
		up := "-"
		if t, err := time.Parse(time.RFC3339Nano, w.StartedAt); err == nil {
			up = time.Since(t).Truncate(time.Second).String()
		}
		state := w.State
		if w.Health == string(workerproto.Degraded) {
			state += " (degraded)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%s\t%s\t%s\n", w.ID, state, w.Backend, w.Device, pid, w.RestartCount, up, w.URL, w.ModelRef)
	}
	return tw.Flush()
}

func parseSizeFlag(s string) (int64, error) {
	n, err := config.ParseSize(s)
	return int64(n), err
}
