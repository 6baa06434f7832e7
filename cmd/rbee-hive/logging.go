package main

import (
	"io"
	"log/slog"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/systemd"
)

// newLogger builds the one slog handler the hive logs through: journald under
// systemd (or with log_format = "journal"), else text or JSON on stderr.
func newLogger(cfg config.Config, stderr io.Writer) (*slog.Logger, func(), error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		level = slog.LevelInfo
	}
	h, closeFn, err := systemd.NewLogHandler(string(cfg.LogFormat), level, stderr)
	if err != nil {
		return nil, nil, err
	}
	return slog.New(h), closeFn, nil
}
