package dashboards

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Query is one PromQL expression of the dashboard, as written in the
// panel (Expr, with Grafana variables) and ready for a plain Prometheus
// query API (Eval: every hive, a one-minute rate window).
type Query struct {
	Panel string `json:"panel"`
	RefID string `json:"ref_id"`
	Expr  string `json:"expr"`
	Eval  string `json:"eval"`
}

// EvalWindow replaces $__rate_interval in Eval: four 15 s scrapes.
const EvalWindow = "1m"

// Evaluable substitutes the dashboard's variables so that expr can be sent
// to Prometheus' /api/v1/query as is.
func Evaluable(expr string) string {
	return strings.NewReplacer(
		"$__rate_interval", EvalWindow,
		`"$instance"`, `".+"`,
	).Replace(expr)
}

// panelJSON is the part of a Grafana panel that holds queries; rows of the
// classic schema may nest panels when collapsed.
type panelJSON struct {
	Title   string `json:"title"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
	Panels []panelJSON `json:"panels"`
}

// ExtractQueries reads every PromQL expression from a dashboard's JSON, in
// panel order. It reads the JSON rather than the builder so that what is
// checked is exactly what Grafana imports.
func ExtractQueries(dashboardJSON []byte) ([]Query, error) {
	var d struct {
		Panels []panelJSON `json:"panels"`
	}
	if err := json.Unmarshal(dashboardJSON, &d); err != nil {
		return nil, fmt.Errorf("parse dashboard: %w", err)
	}
	var qs []Query
	var walk func([]panelJSON)
	walk = func(ps []panelJSON) {
		for _, p := range ps {
			for _, t := range p.Targets {
				if t.Expr != "" {
					qs = append(qs, Query{Panel: p.Title, RefID: t.RefID, Expr: t.Expr, Eval: Evaluable(t.Expr)})
				}
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	return qs, nil
}

// QueriesJSON is the committed list of the overview's queries.
func QueriesJSON() ([]byte, error) {
	dj, err := OverviewJSON()
	if err != nil {
		return nil, err
	}
	qs, err := ExtractQueries(dj)
	if err != nil {
		return nil, err
	}
	return marshal(qs)
}
