package worker

// sd_notify keys of the worker protocol: what a worker sends in a datagram
// to NOTIFY_SOCKET, and what the hive reads from it.
const (
	KeyReady    = "READY"    // READY=1: loaded and serving
	KeyWatchdog = "WATCHDOG" // WATCHDOG=1: a heartbeat
	KeyStatus   = "STATUS"   // STATUS=<text>: free-form status line
	KeyStopping = "STOPPING" // STOPPING=1: a graceful shutdown began
	// KeyBarrier is systemd-notify's BARRIER=1, which carries no state.
	KeyBarrier = "BARRIER"
	// KeyHealth is RBEE_HEALTH=healthy|degraded, sent with each heartbeat.
	KeyHealth = "RBEE_HEALTH"
	// KeyVRAMBytes is the figure a worker reports its own VRAM use in.
	KeyVRAMBytes = "RBEE_VRAM_BYTES"
	// FigurePrefix starts every figure key (RBEE_TOKENS_PER_SEC=41.5).
	FigurePrefix = "RBEE_"
)

// Paths of the hive's callback routes, for workers without a notify socket.
const (
	PathReady     = "/v1/workers/ready"
	PathHeartbeat = "/v1/heartbeat"
)
