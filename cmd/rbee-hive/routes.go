package main

import (
	"log/slog"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/router"
	"github.com/rbee/rbee-hive/supervisor"
)

// routeTable is every route of the hive's HTTP API, with who may call it:
// public, the API token, or the API token or the calling worker's own
// token. TestRouteTableAuth walks it against a running daemon.
func (h *hive) routeTable(reg *prometheus.Registry, log *slog.Logger, apiAuth api.AuthFunc) []api.Route {
	metrics := promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		Registry:          reg,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelError),
		EnableOpenMetrics: false,
	})
	plain := func(f http.HandlerFunc) api.HandlerFunc { return api.Plain(f) }
	return []api.Route{
		{Pattern: "GET /v1/health", Auth: api.AuthPublic, Handler: handleHealth},
		{Pattern: "GET /metrics", Auth: api.AuthPublic, Handler: api.Plain(metrics)},

		{Pattern: "POST /v1/workers/spawn", Auth: api.AuthToken, Handler: h.sup.HandleSpawn},
		{Pattern: "GET /v1/workers/list", Auth: api.AuthToken, Handler: h.sup.HandleList},
		{Pattern: "GET /v1/workers/{id}", Auth: api.AuthToken, Handler: h.sup.HandleGet},
		{Pattern: "DELETE /v1/workers/{id}", Auth: api.AuthToken, Handler: h.sup.HandleDelete},
		{Pattern: "GET /v1/workers/{id}/logs", Auth: api.AuthToken, Handler: h.sup.HandleLogs},
		{Pattern: "POST /v1/workers/{id}" + supervisor.RouteRbee, Auth: api.AuthToken, Handler: h.sup.HandleWorkerRoute(supervisor.RouteRbee)},
		{Pattern: "POST /v1/workers/{id}" + supervisor.RouteChat, Auth: api.AuthToken, Handler: h.sup.HandleWorkerRoute(supervisor.RouteChat)},
		{Pattern: "POST /v1/workers/{id}" + supervisor.RouteCompletion, Auth: api.AuthToken, Handler: h.sup.HandleWorkerRoute(supervisor.RouteCompletion)},
		{Pattern: "POST /v1/workers/{id}" + supervisor.RouteNative, Auth: api.AuthToken, Handler: h.sup.HandleWorkerRoute(supervisor.RouteNative)},
		{Pattern: "POST /v1/workers/ready", Auth: api.AuthWorkerToken, Handler: h.sup.HandleReady(apiAuth)},
		{Pattern: "POST /v1/heartbeat", Auth: api.AuthWorkerToken, Handler: h.sup.HandleHeartbeat(apiAuth)},

		{Pattern: "POST /v1/models/download", Auth: api.AuthToken, Handler: plain(h.models.HandleDownload)},
		{Pattern: "GET /v1/models/download/progress", Auth: api.AuthToken, Handler: plain(h.models.HandleProgress)},
		{Pattern: "GET /v1/models", Auth: api.AuthToken, Handler: plain(h.models.HandleList)},
		{Pattern: "DELETE /v1/models/{ref...}", Auth: api.AuthToken, Handler: plain(h.models.HandleDelete)},

		{Pattern: "GET /v1/resources", Auth: api.AuthToken, Handler: h.handleResources},

		// The host's OpenAI endpoint (docs/openai-endpoint.md); the two
		// catch-alls answer unknown routes under /openai/ in OpenAI's shape.
		{Pattern: "GET " + router.PathModels, Auth: api.AuthToken, Handler: h.handleOpenAI},
		{Pattern: "GET " + router.PathModels + "/{name}", Auth: api.AuthToken, Handler: h.handleOpenAI},
		{Pattern: "POST " + router.PathModels + "/{name}/load", Auth: api.AuthToken, Handler: h.handleOpenAI},
		{Pattern: "POST " + router.PathModels + "/{name}/unload", Auth: api.AuthToken, Handler: h.handleOpenAI},
		{Pattern: "POST " + router.PathChatCompletions, Auth: api.AuthToken, Handler: h.handleOpenAI},
		{Pattern: "POST " + router.PathCompletions, Auth: api.AuthToken, Handler: h.handleOpenAI},
		{Pattern: "GET /openai/", Auth: api.AuthToken, Handler: h.handleOpenAI},
		{Pattern: "POST /openai/", Auth: api.AuthToken, Handler: h.handleOpenAI},
	}
}

func handleHealth(w http.ResponseWriter, r *http.Request) error {
	api.WriteJSON(w, http.StatusOK, map[string]string{"status": "alive", "version": version, "api_version": "v1"})
	return nil
}

func (h *hive) handleResources(w http.ResponseWriter, r *http.Request) error {
	api.WriteJSON(w, http.StatusOK, h.ledger.Resources(r.Context()))
	return nil
}
