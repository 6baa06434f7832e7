package main

import (
	"io"
	"log/slog"

	"github.com/rbee/rbee-hive/config"
)

// newLogger builds the one slog handler the hive logs through.
func newLogger(cfg config.Config, stderr io.Writer) (*slog.Logger, func(), error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch cfg.LogFormat {
	case "json":
		h = slog.NewJSONHandler(stderr, opts)
	default:
		h = slog.NewTextHandler(stderr, opts)
	}
	return slog.New(h), func() {}, nil
}
