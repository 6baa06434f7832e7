//go:build tools

package tools

import (
	_ "github.com/NVIDIA/go-nvml/pkg/nvml"
	_ "github.com/containerd/cgroups/v3"
	_ "github.com/coreos/go-systemd/v22/daemon"
	_ "github.com/gpustack/gguf-parser-go"
	_ "github.com/grafana/grafana-foundation-sdk/go/dashboard"
	_ "github.com/pelletier/go-toml/v2"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/prometheus/procfs"
	_ "golang.org/x/sys/unix"
	_ "modernc.org/sqlite"
)
