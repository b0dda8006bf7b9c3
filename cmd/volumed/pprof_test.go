package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
)

// TestPprofServer checks that the pprof listener serves the profiles'
// index on loopback, and nothing once closed.
func TestPprofServer(t *testing.T) {
	p, err := startPprof("127.0.0.1:0", slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	u := "http://" + p.addr() + "/debug/pprof/"
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "goroutine") {
		t.Fatalf("GET %s: %s\n%s", u, resp.Status, body)
	}
	if err := p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(context.Background()); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if resp, err := http.Get(u); err == nil {
		resp.Body.Close()
		t.Fatalf("GET %s after Close: %s", u, resp.Status)
	}
}
