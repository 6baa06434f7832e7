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

func runStatus(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	c, err := parseClient(fs, args)
	if err != nil {
		return err
	}
	var health map[string]any
	if err := c.do(ctx, "GET", "/v1/health", nil, &health); err != nil {
		return err
	}
	var list struct {
		Workers []workerView `json:"workers"`
	}
	listErr := c.do(ctx, "GET", "/v1/workers/list", nil, &list)
	if c.json {
		out := map[string]any{"health": health}
		if listErr == nil {
			out["workers"] = list.Workers
		}
		return printJSON(stdout, out)
	}
	fmt.Fprintf(stdout, "hive:    %s %v (api %v)\n", c.base, health["status"], health["api_version"])
	fmt.Fprintf(stdout, "version: %v\n", health["version"])
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

func runWorkers(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: workers needs ls, spawn, stop or logs", errUsage)
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("workers "+sub, flag.ContinueOnError)
	var spawn struct {
		backend, model, restart string
		device                  int
		memory                  string
	}
	var stream string
	switch sub {
	case "spawn":
		fs.StringVar(&spawn.backend, "backend", "sim", "backend name from the hive's config")
		fs.StringVar(&spawn.model, "model", "", "model reference (hf:org/repo[:file], file:/path)")
		fs.IntVar(&spawn.device, "device", 0, "device index")
		fs.StringVar(&spawn.restart, "restart", "", "never, on-failure or always")
		fs.StringVar(&spawn.memory, "memory", "", "memory limit, e.g. 4GiB")
	case "logs":
		fs.StringVar(&stream, "stream", "", "stdout or stderr (default both)")
	}
	c, err := parseClient(fs, args)
	if err != nil {
		return err
	}
	switch sub {
	case "ls", "list":
		return workersList(ctx, c, stdout)
	case "spawn":
		if spawn.model == "" {
			return fmt.Errorf("%w: workers spawn needs --model", errUsage)
		}
		body := map[string]any{"model_ref": spawn.model, "backend": spawn.backend, "device": spawn.device, "model_path": ""}
		if spawn.restart != "" {
			body["restart"] = spawn.restart
		}
		if spawn.memory != "" {
			n, err := parseSizeFlag(spawn.memory)
			if err != nil {
				return err
			}
			body["memory_limit_bytes"] = n
		}
		var out map[string]any
		if err := c.do(ctx, "POST", "/v1/workers/spawn", body, &out); err != nil {
			return err
		}
		if c.json {
			return printJSON(stdout, out)
		}
		fmt.Fprintf(stdout, "%v %v %v\n", out["worker_id"], out["state"], out["url"])
		return nil
	case "stop", "logs", "show":
		if fs.NArg() != 1 {
			return fmt.Errorf("%w: workers %s needs one worker id", errUsage, sub)
		}
		id := url.PathEscape(fs.Arg(0))
		switch sub {
		case "stop":
			var out map[string]any
			if err := c.do(ctx, "DELETE", "/v1/workers/"+id, nil, &out); err != nil {
				return err
			}
			if c.json {
				return printJSON(stdout, out)
			}
			fmt.Fprintf(stdout, "%s stopped\n", fs.Arg(0))
			return nil
		case "show":
			var out map[string]any
			if err := c.do(ctx, "GET", "/v1/workers/"+id, nil, &out); err != nil {
				return err
			}
			return printJSON(stdout, out)
		default:
			q := ""
			if stream != "" {
				q = "?stream=" + url.QueryEscape(stream)
			}
			resp, err := c.send(ctx, "GET", "/v1/workers/"+id+"/logs"+q, nil)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			_, err = io.Copy(stdout, resp.Body)
			return err
		}
	default:
		return fmt.Errorf("%w: unknown workers command %q", errUsage, sub)
	}
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
		if w.Health == "degraded" {
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
