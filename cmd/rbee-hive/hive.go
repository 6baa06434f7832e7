package main

import (
	"context"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/config"
)

// hive wires the supervisor's parts together; it owns their lifetimes.
type hive struct {
	log *slog.Logger
}

func newHive(ctx context.Context, cfg *config.Config, log *slog.Logger, reg *prometheus.Registry, token string) (*hive, error) {
	return &hive{log: log}, nil
}

func (h *hive) routes(rt *api.Router, auth api.AuthFunc) {}
func (h *hive) ready()                                   {}
func (h *hive) stopping()                                {}
func (h *hive) shutdown()                                {}
func (h *hive) close()                                   {}
