package model

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"strings"
)

// Progress stages, the event tags clients know (docs/compat.md).
const (
	StageDownloading = "downloading"
	StageComplete    = "complete"
	StageError       = "error"
)

// Progress is one event of GET /v1/models/download/progress. On the wire each
// stage carries exactly these fields (docs/api.md#download-progress-sse):
//
//	{"stage":"downloading","bytes_downloaded":u64,"bytes_total":u64,"speed_mbps":f64}
//	{"stage":"complete","local_path":"..."}
//	{"stage":"error","message":"..."}
//
// speed_mbps is megabits per second (10^6 bit/s) over the last second or so.
type Progress struct {
	Stage           string  `json:"stage"`
	BytesDownloaded uint64  `json:"bytes_downloaded"`
	BytesTotal      uint64  `json:"bytes_total"`
	SpeedMbps       float64 `json:"speed_mbps"`
	LocalPath       string  `json:"local_path"`
	Message         string  `json:"message"`
}

// Done reports whether p is a terminal event.
func (p Progress) Done() bool { return p.Stage == StageComplete || p.Stage == StageError }

// MarshalJSON emits only the fields of p's stage.
func (p Progress) MarshalJSON() ([]byte, error) {
	switch p.Stage {
	case StageComplete:
		return json.Marshal(struct {
			Stage     string `json:"stage"`
			LocalPath string `json:"local_path"`
		}{p.Stage, p.LocalPath})
	case StageError:
		return json.Marshal(struct {
			Stage   string `json:"stage"`
			Message string `json:"message"`
		}{p.Stage, p.Message})
	default:
		return json.Marshal(struct {
			Stage           string  `json:"stage"`
			BytesDownloaded uint64  `json:"bytes_downloaded"`
			BytesTotal      uint64  `json:"bytes_total"`
			SpeedMbps       float64 `json:"speed_mbps"`
		}{p.Stage, p.BytesDownloaded, p.BytesTotal, p.SpeedMbps})
	}
}

// DownloadError is what ReadProgress returns for a {"stage":"error"} event.
type DownloadError struct{ Message string }

func (e *DownloadError) Error() string { return "model download failed: " + e.Message }

// ReadProgress parses the progress SSE stream from r (the body of
// GET /v1/models/download/progress), calling fn for every event, until
// "data: [DONE]". It returns nil after a complete event, a *DownloadError
// after an error event, and io.ErrUnexpectedEOF if the stream ends early.
// Comments (keep-alives) and unknown fields are ignored.
func ReadProgress(r io.Reader, fn func(Progress)) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var data []string
	var last Progress
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if len(data) == 0 {
				continue
			}
			payload := strings.Join(data, "\n")
			data = data[:0]
			if payload == "[DONE]" {
				switch last.Stage {
				case StageError:
					return &DownloadError{Message: last.Message}
				case StageComplete:
					return nil
				}
				// Success needs the complete event: a caller would otherwise
				// take a download that never finished for one that did.
				return fmt.Errorf("model: progress stream ended with [DONE] before a complete event: %w", io.ErrUnexpectedEOF)
			}
			var p Progress
			if err := json.Unmarshal([]byte(payload), &p); err != nil {
				return fmt.Errorf("model: bad progress event %q: %w", payload, err)
			}
			last = p
			fn(p)
		case strings.HasPrefix(line, ":"):
		case strings.HasPrefix(line, "data:"):
			data = append(data, strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " "))
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("model: read progress: %w", err)
	}
	if last.Stage == StageError {
		return &DownloadError{Message: last.Message}
	}
	return fmt.Errorf("model: progress stream ended before [DONE]: %w", io.ErrUnexpectedEOF)
}
