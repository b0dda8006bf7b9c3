package httpbridge_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/apitest"
	"github.com/volumed/volumed/internal/testenv"
)

func TestNormalizeDevicePath(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "device_paths.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cases []struct {
		In   string `json:"in"`
		Want string `json:"want"`
		Err  bool   `json:"err"`
	}
	if err := json.Unmarshal(data, &cases); err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		got, err := httpbridge.NormalizeDevicePath(tc.In)
		if tc.Err {
			var e *commands.Error
			if !errors.As(err, &e) || e.Status != 400 || e.Details["field"] != "device_path" {
				t.Errorf("NormalizeDevicePath(%q) = %q, %v; want a 400 on device_path", tc.In, got, err)
			}
			continue
		}
		if err != nil || got != tc.Want {
			t.Errorf("NormalizeDevicePath(%q) = %q, %v; want %q", tc.In, got, err, tc.Want)
		}
	}
}

func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	cfg := baseConfig(t)
	s := httpbridge.New(cfg)
	if s.Addr() != "" {
		t.Errorf("Addr before Start = %q", s.Addr())
	}
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(s.Addr(), "127.0.0.1:") || strings.HasSuffix(s.Addr(), ":0") {
		t.Errorf("Addr = %q, want the bound port", s.Addr())
	}
	if err := s.Start(ctx); err == nil {
		t.Error("second Start succeeded")
	}
	resp, _ := validator.Do(t, nil, apitest.NewRequest(t, "GET", "http://"+s.Addr()+"/api/v1/health", ""))
	if resp.StatusCode != 200 {
		t.Errorf("health: %d", resp.StatusCode)
	}
	for i := range 2 {
		if err := s.Close(ctx); err != nil {
			t.Errorf("Close #%d: %v", i+1, err)
		}
	}
	if err := s.Start(ctx); err == nil {
		t.Error("Start after Close succeeded")
	}

	unstarted := httpbridge.New(httpbridge.Config{Logger: testLogger(t)})
	if err := unstarted.Close(ctx); err != nil {
		t.Errorf("Close of an unstarted server: %v", err)
	}

	incomplete := httpbridge.New(httpbridge.Config{Listen: "127.0.0.1:0", Logger: testLogger(t)})
	if err := incomplete.Start(ctx); err == nil || !strings.Contains(err.Error(), "required") {
		_ = incomplete.Close(ctx)
		t.Errorf("Start without Conn, Commands, Store and Backend: %v", err)
	}

	occupied := httpbridge.New(cfg)
	if err := occupied.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = occupied.Close(ctx) })
	cfg.Listen = occupied.Addr()
	busy := httpbridge.New(cfg)
	if err := busy.Start(ctx); err == nil {
		t.Error("Start on a taken port succeeded")
	}
}

func TestRequestLog(t *testing.T) {
	var logs testenv.Buffer
	cfg := baseConfig(t)
	cfg.Logger = slog.New(slog.NewJSONHandler(&logs, nil))
	s := httpbridge.New(cfg)
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	base := "http://" + s.Addr() + "/api/v1"
	validator.Do(t, nil, apitest.NewRequest(t, "GET", base+"/devices/dev%2Fvdb%2F..%2Fsda/volume", ""))
	validator.Do(t, nil, apitest.NewRequest(t, "GET", base+"/volumes/"+volPanic, ""))

	want := []struct {
		path   string
		status float64
	}{{"/api/v1/devices/dev%2Fvdb%2F..%2Fsda/volume", 400}, {"/api/v1/volumes/" + volPanic, 500}}
	testenv.Eventually(t, 5*time.Second, func() bool {
		found := 0
		for _, line := range logs.Lines() {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) != nil || rec["msg"] != "request" {
				continue
			}
			for _, w := range want {
				if rec["component"] == "httpbridge" && rec["method"] == "GET" && rec["path"] == w.path &&
					rec["status"] == w.status && rec["duration"] != nil {
					found++
				}
			}
		}
		return found == len(want)
	}, "request log lines for %v in %v", want, logs.Lines())
}
