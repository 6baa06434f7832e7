package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/model"
)

func runModels(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: models needs ls, pull or rm", errUsage)
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("models "+sub, flag.ContinueOnError)
	c, err := parseClient(fs, args)
	if err != nil {
		return err
	}
	switch sub {
	case "ls", "list":
		var list model.ListResponse
		if err := c.do(ctx, "GET", "/v1/models", nil, &list); err != nil {
			return err
		}
		if c.json {
			return printJSON(stdout, list)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "REF\tSIZE\tIN USE\tLAST USED\tPATH")
		for _, m := range list.Models {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", m.Ref, gpu.FormatBytes(m.SizeBytes), m.InUse,
				time.Unix(m.LastUsed, 0).UTC().Format(time.RFC3339), m.LocalPath)
		}
		return tw.Flush()
	case "pull":
		if fs.NArg() != 1 {
			return fmt.Errorf("%w: models pull needs one model reference", errUsage)
		}
		return modelsPull(ctx, c, fs.Arg(0), stdout, stderr)
	case "rm":
		if fs.NArg() != 1 {
			return fmt.Errorf("%w: models rm needs one model reference", errUsage)
		}
		var out model.DeleteResponse
		if err := c.do(ctx, "DELETE", "/v1/models/"+url.PathEscape(fs.Arg(0)), nil, &out); err != nil {
			return err
		}
		if c.json {
			return printJSON(stdout, out)
		}
		fmt.Fprintf(stdout, "%s removed\n", fs.Arg(0))
		return nil
	default:
		return fmt.Errorf("%w: unknown models command %q", errUsage, sub)
	}
}

// modelsPull starts a download and draws its progress until it ends.
func modelsPull(ctx context.Context, c *client, ref string, stdout, stderr io.Writer) error {
	var started model.DownloadResponse
	if err := c.do(ctx, "POST", "/v1/models/download", model.DownloadRequest{ModelRef: ref}, &started); err != nil {
		return err
	}
	if started.DownloadID == "cached" && started.LocalPath != nil {
		fmt.Fprintf(stdout, "%s already present at %s\n", ref, *started.LocalPath)
		return nil
	}
	resp, err := c.stream(ctx, "GET", "/v1/models/download/progress?id="+url.QueryEscape(started.DownloadID))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var final model.Progress
	err = model.ReadProgress(resp.Body, func(p model.Progress) {
		final = p
		if p.Stage == model.StageDownloading && !c.json {
			fmt.Fprintf(stderr, "\r%s", progressBar(p.BytesDownloaded, p.BytesTotal, p.SpeedMbps))
		}
	})
	if !c.json {
		fmt.Fprintln(stderr)
	}
	if err != nil {
		return fmt.Errorf("progress stream: %w", err)
	}
	if c.json {
		return printJSON(stdout, final)
	}
	switch final.Stage {
	case model.StageComplete:
		fmt.Fprintf(stdout, "%s downloaded to %s\n", ref, final.LocalPath)
		return nil
	case model.StageError:
		return fmt.Errorf("download failed: %s", final.Message)
	default:
		return fmt.Errorf("progress stream ended in stage %q", final.Stage)
	}
}

// progressBar renders "[#####.....]  42%  1.2 GiB / 3.0 GiB  85.1 Mbit/s".
func progressBar(done, total uint64, mbps float64) string {
	const width = 30
	frac := 0.0
	if total > 0 {
		frac = float64(done) / float64(total)
	}
	if frac > 1 {
		frac = 1
	}
	n := int(frac * width)
	return fmt.Sprintf("[%s%s] %3.0f%%  %s / %s  %.1f Mbit/s", strings.Repeat("#", n), strings.Repeat(".", width-n),
		frac*100, gpu.FormatBytes(done), gpu.FormatBytes(total), mbps)
}
