package e2e_test

import (
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestBadRequests sends every bad input of testdata/bad_requests.json and
// requires the documented error, with nothing recorded.
func TestBadRequests(t *testing.T) {
	var cases []struct {
		Name, Method, Path, Body, Code, Field string
		Status                                int
	}
	data, err := os.ReadFile("testdata/bad_requests.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &cases); err != nil {
		t.Fatal(err)
	}
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			var body any
			if tc.Body != "" {
				body = tc.Body
			}
			status, data := d.call(tc.Method, tc.Path, body)
			var e commands.Error
			if status != tc.Status || json.Unmarshal(data, &e) != nil || e.Code != tc.Code || e.Message == "" {
				t.Fatalf("status %d body %s; want %d %s", status, data, tc.Status, tc.Code)
			}
			if tc.Field != "" && e.Details["field"] != tc.Field {
				t.Fatalf("details %v; want field %q", e.Details, tc.Field)
			}
		})
	}
	var ops []commands.OperationSummary
	d.mustCall(http.StatusOK, http.MethodGet, "/operations", nil, &ops)
	if len(ops) != 0 {
		t.Fatalf("bad requests recorded operations: %+v", ops)
	}
	if calls := sim.Stats().Calls; calls["createVolume"]+calls["attachVolume"]+calls["detachVolume"]+calls["deleteVolume"] != 0 {
		t.Fatalf("bad requests reached CloudStack: %v", calls)
	}
}

// TestOversizedBody sends a body over the limit.
func TestOversizedBody(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	big := `{"name":"` + strings.Repeat("x", commands.MaxBodyBytes) + `"}`
	status, data := d.call(http.MethodPost, "/volumes", big)
	if status/100 != 4 || !strings.Contains(string(data), commands.CodeInvalidRequest) {
		t.Fatalf("oversized body: %d %s", status, data)
	}
}

// TestStoreUnavailable stops Redis under a running daemon: commands get
// 503 SERVICE_UNAVAILABLE and nothing is half-recorded.
func TestStoreUnavailable(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	redis := testenv.StartRedis(t)
	d := startDaemon(t, sim, daemonOpts{redisURL: redis.URL()})
	redis.Stop()
	status, data := d.call(http.MethodPost, "/volumes", map[string]any{"name": "no-store", "size": 1 << 30,
		"disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
	var e commands.Error
	if status != http.StatusServiceUnavailable || json.Unmarshal(data, &e) != nil || e.Code != commands.CodeServiceUnavailable {
		t.Fatalf("create with Redis down: %d %s", status, data)
	}
	var h commands.Health
	d.mustCall(http.StatusServiceUnavailable, http.MethodGet, "/health", nil, &h)
	if h.Status != commands.Unhealthy || h.DatabaseHealth != commands.Unhealthy {
		t.Fatalf("health with Redis down: %+v", h)
	}
	if n := sim.Stats().Calls["createVolume"]; n != 0 {
		t.Fatalf("createVolume called %d times for a command that was refused", n)
	}
}
