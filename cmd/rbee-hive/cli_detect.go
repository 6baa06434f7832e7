package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containerd/cgroups/v3"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/procfs"
)

// detection is what `rbee-hive detect` reports; it changes nothing on the host.
type detection struct {
	CgroupMode        string      `json:"cgroup_mode"`
	Controllers       []string    `json:"controllers"`         // where worker limits can be set
	UnifiedController []string    `json:"unified_controllers"` // hybrid hosts: what cgroup2 offers
	MemoryTotal       uint64      `json:"memory_total_bytes"`
	MemoryAvailable   uint64      `json:"memory_available_bytes"`
	GPU               gpu.Summary `json:"gpu"`
	GPUError          string      `json:"gpu_error,omitempty"`
}

func runDetect(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("detect", flag.ContinueOnError)
	path := fs.String("config", "", "config file (its [gpu] section is used)")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(*path, os.Geteuid() == 0)
	if err != nil {
		return err
	}
	d := detection{}
	switch cgroups.Mode() {
	case cgroups.Unified:
		d.CgroupMode = "v2 (unified)"
		d.Controllers = readFields("/sys/fs/cgroup/cgroup.controllers")
	case cgroups.Hybrid:
		d.CgroupMode = "v1 (hybrid: controllers on v1, cgroup2 at /sys/fs/cgroup/unified)"
		d.Controllers = v1Controllers()
		d.UnifiedController = readFields("/sys/fs/cgroup/unified/cgroup.controllers")
	case cgroups.Legacy:
		d.CgroupMode = "v1 (legacy)"
		d.Controllers = v1Controllers()
	default:
		d.CgroupMode = "unavailable"
	}
	if r, err := procfs.New(""); err == nil {
		if m, err := r.Memory(); err == nil {
			d.MemoryTotal, d.MemoryAvailable = m.TotalBytes, m.AvailableBytes
		}
	}
	g, err := gpu.Open(string(cfg.GPU.Driver), fakeDevices(&cfg))
	if err == nil {
		d.GPU, err = gpu.Detect(ctx, g)
		_ = g.Close()
	}
	if err != nil {
		d.GPUError = err.Error()
	}
	if *asJSON {
		return printJSON(stdout, d)
	}
	fmt.Fprintf(stdout, "cgroups:     %s\n", d.CgroupMode)
	fmt.Fprintf(stdout, "controllers: %s\n", strings.Join(d.Controllers, " "))
	if d.UnifiedController != nil {
		fmt.Fprintf(stdout, "cgroup2:     %q (limits are set on v1)\n", strings.Join(d.UnifiedController, " "))
	}
	fmt.Fprintf(stdout, "memory:      %s available of %s\n", gpu.FormatBytes(d.MemoryAvailable), gpu.FormatBytes(d.MemoryTotal))
	if d.GPUError != "" {
		fmt.Fprintf(stdout, "gpus:        error: %s\n", d.GPUError)
		return nil
	}
	fmt.Fprintf(stdout, "gpus:        %s\n", strings.ReplaceAll(strings.TrimSpace(d.GPU.String()), "\n", "\n             "))
	return nil
}

func readFields(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return strings.Fields(string(b))
}

// v1Controllers lists the enabled v1 controllers the hive uses, from /proc/cgroups.
func v1Controllers() []string {
	b, err := os.ReadFile("/proc/cgroups")
	if err != nil {
		return nil
	}
	want := map[string]bool{"memory": true, "pids": true, "cpu": true, "freezer": true}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		// subsys_name hierarchy num_cgroups enabled; hierarchy 0 means not on v1.
		if len(f) == 4 && want[f[0]] && f[1] != "0" && f[3] == "1" {
			out = append(out, f[0])
		}
	}
	return out
}
