package client_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
)

// The daemon itself is driven through this client by the e2e tests; these
// cover what a real volumed does not send: answers from a proxy in front
// of it, and server URLs.

func TestNewServerURL(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"", client.DefaultServer, true},
		{"http://h:8090", "http://h:8090", true},
		{"http://h:8090/", "http://h:8090", true},
		{"https://h/api/v1", "https://h", true},
		{"http://h:8090/api/v1/", "http://h:8090", true},
		{"ftp://h", "", false},
		{"h:8090", "", false},
		{"http://h?x=1", "", false},
	}
	for _, tc := range tests {
		c, err := client.New(tc.in)
		if (err == nil) != tc.ok || (tc.ok && c.Server() != tc.want) {
			t.Errorf("New(%q) = %v, %v; want %q ok=%v", tc.in, c, err, tc.want, tc.ok)
		}
	}
}

func TestErrorAnswers(t *testing.T) {
	tests := []struct {
		name       string
		status     int
		header     map[string]string
		body       string
		code       string
		message    string
		retryAfter time.Duration
	}{
		{"documented error", 409, nil, `{"error":"attached elsewhere","code":"CONFLICT","details":{"vm_id":"x"}}`,
			commands.CodeConflict, "attached elsewhere", 0},
		{"retry after", 503, map[string]string{"Retry-After": "3"}, `{"error":"busy","code":"SERVICE_UNAVAILABLE"}`,
			commands.CodeServiceUnavailable, "busy", 3 * time.Second},
		{"a proxy's page", 502, nil, "<html>Bad Gateway</html>", "", "<html>Bad Gateway</html>", 0},
		{"empty body", 504, map[string]string{"Retry-After": "soon"}, "", "", "Gateway Timeout", 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				for k, v := range tc.header {
					w.Header().Set(k, v)
				}
				w.WriteHeader(tc.status)
				_, _ = w.Write([]byte(tc.body))
			}))
			defer srv.Close()
			c, err := client.New(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.GetVolume(context.Background(), "v")
			var e *client.Error
			if !errors.As(err, &e) || e.Status != tc.status || e.Code() != tc.code || e.API.Message != tc.message ||
				e.RetryAfter != tc.retryAfter || string(e.Body) != tc.body {
				t.Fatalf("error %#v (%v)", e, err)
			}
			if tc.code == commands.CodeConflict && e.Details()["vm_id"] != "x" {
				t.Fatalf("details %v", e.Details())
			}
		})
	}
}

// TestHealthUnhealthy: the 503 of an unhealthy daemon is its health
// document, not an error.
func TestHealthUnhealthy(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v1/health" || r.Header.Get("Authorization") != "Bearer t0k" {
			http.Error(w, "wrong request", http.StatusTeapot)
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = w.Write([]byte(`{"status":"unhealthy","database_health":"unhealthy"}`))
	}))
	defer srv.Close()
	c, err := client.New(srv.URL, client.WithToken("t0k"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := c.Health(context.Background())
	if err != nil || h.Status != commands.Unhealthy || h.DatabaseHealth != commands.Unhealthy {
		t.Fatalf("Health: %+v %v", h, err)
	}
}

// TestIdempotencyKey: every operation-starting call sends the key of
// WithIdempotencyKey as the Idempotency-Key header, and none without it.
func TestIdempotencyKey(t *testing.T) {
	type seen struct{ method, path, key string }
	got := make(chan seen, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- seen{r.Method, r.URL.Path, r.Header.Get(commands.IdempotencyKeyHeader)}
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte(`{"id":"op-1","status":"pending"}`))
	}))
	defer srv.Close()
	c, err := client.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	calls := []struct {
		method, path string
		call         func(...client.CallOption) (commands.Operation, error)
	}{
		{"POST", "/api/v1/volumes", func(o ...client.CallOption) (commands.Operation, error) {
			return c.CreateVolume(ctx, commands.CreateRequest{Name: "n"}, o...)
		}},
		{"POST", "/api/v1/volumes/v1/attach", func(o ...client.CallOption) (commands.Operation, error) {
			return c.AttachVolume(ctx, "v1", "vm1", o...)
		}},
		{"POST", "/api/v1/volumes/v1/attach-root", func(o ...client.CallOption) (commands.Operation, error) {
			return c.AttachRoot(ctx, "v1", "vm1", o...)
		}},
		{"POST", "/api/v1/volumes/v1/detach", func(o ...client.CallOption) (commands.Operation, error) {
			return c.DetachVolume(ctx, "v1", o...)
		}},
		{"DELETE", "/api/v1/volumes/v1", func(o ...client.CallOption) (commands.Operation, error) {
			return c.DeleteVolume(ctx, "v1", o...)
		}},
		{"POST", "/api/v1/exports", func(o ...client.CallOption) (commands.Operation, error) {
			return c.CreateExport(ctx, commands.ExportRequest{VolumeID: "v1"}, o...)
		}},
		{"DELETE", "/api/v1/exports/v1", func(o ...client.CallOption) (commands.Operation, error) {
			return c.DeleteExport(ctx, "v1", o...)
		}},
	}
	for _, tc := range calls {
		for _, key := range []string{"job-7", ""} {
			var opts []client.CallOption
			if key != "" {
				opts = append(opts, client.WithIdempotencyKey(key))
			}
			op, err := tc.call(opts...)
			if err != nil || op.ID != "op-1" {
				t.Fatalf("%s %s: %+v %v", tc.method, tc.path, op, err)
			}
			if s := <-got; s != (seen{tc.method, tc.path, key}) {
				t.Errorf("server saw %+v, want %s %s with key %q", s, tc.method, tc.path, key)
			}
		}
	}
}

// TestForce: WithForce sends {"force":true} on detach and delete, nothing
// without it, and is refused on other commands before anything is sent.
func TestForce(t *testing.T) {
	bodies := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies <- r.Method + " " + r.URL.Path + " " + string(b)
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte(`{"id":"op-1","status":"pending"}`))
	}))
	defer srv.Close()
	c, err := client.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		call func(...client.CallOption) (commands.Operation, error)
		want string
		opts []client.CallOption
	}{
		{func(o ...client.CallOption) (commands.Operation, error) { return c.DetachVolume(ctx, "v1", o...) },
			`POST /api/v1/volumes/v1/detach {"force":true}`, []client.CallOption{client.WithForce()}},
		{func(o ...client.CallOption) (commands.Operation, error) { return c.DetachVolume(ctx, "v1", o...) },
			`POST /api/v1/volumes/v1/detach {}`, nil},
		{func(o ...client.CallOption) (commands.Operation, error) { return c.DeleteVolume(ctx, "v1", o...) },
			`DELETE /api/v1/volumes/v1 {"force":true}`, []client.CallOption{client.WithForce()}},
	} {
		if _, err := tc.call(tc.opts...); err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(<-bodies); got != tc.want {
			t.Errorf("sent %q, want %q", got, tc.want)
		}
	}
	if _, err := c.DeleteExport(ctx, "v1", client.WithForce()); err == nil || !strings.Contains(err.Error(), "WithForce applies to") {
		t.Fatalf("unexport with force: %v", err)
	}
	select {
	case b := <-bodies:
		t.Fatalf("unexport with force was sent: %s", b)
	default:
	}
}

// TestWaitRidesOut503: Wait asks again while the daemon answers 503 (its
// store briefly unavailable), and returns the terminal record; another
// error ends it at once.
func TestWaitRidesOut503(t *testing.T) {
	for _, tc := range []struct {
		name     string
		failures int
		status   int
		wantErr  bool
	}{
		{"two 503s", 2, http.StatusServiceUnavailable, false},
		{"a 500", 1, http.StatusInternalServerError, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				if int(calls.Add(1)) <= tc.failures {
					w.WriteHeader(tc.status)
					_, _ = w.Write([]byte(`{"error":{"code":"SERVICE_UNAVAILABLE","message":"state store unavailable"}}`))
					return
				}
				_, _ = w.Write([]byte(`{"id":"op-1","type":"create","status":"completed","volume_id":"v","vm_id":null,"request":{}}`))
			}))
			defer srv.Close()
			c, err := client.New(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			op, err := c.Wait(ctx, "op-1")
			if tc.wantErr {
				if err == nil || calls.Load() != 1 {
					t.Fatalf("Wait after a %d: %+v %v (%d calls), want the error at once", tc.status, op, err, calls.Load())
				}
				return
			}
			if err != nil || op.Status != commands.StatusCompleted || calls.Load() != int32(tc.failures+1) {
				t.Fatalf("Wait: %+v %v after %d calls", op, err, calls.Load())
			}
		})
	}
}

// TestOperationsPastEmptyPage: Operations follows the cursor of a page
// with no rows (the server left out every record it found for it) to
// the pages after, and stops at the first page without one.
func TestOperationsPastEmptyPage(t *testing.T) {
	pages := map[string]struct{ body, next string }{
		"":   {`[]`, "c1"},
		"c1": {`[{"id":"op-2","type":"create","status":"executing","volume_id":"v"}]`, "c2"},
		"c2": {`[]`, "c3"},
		"c3": {`[{"id":"op-1","type":"create","status":"executing","volume_id":"v"}]`, ""},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, ok := pages[r.URL.Query().Get("cursor")]
		if r.URL.Path != "/api/v1/operations" || r.URL.Query().Get("status") != "executing" || !ok {
			http.Error(w, "wrong request", http.StatusTeapot)
			return
		}
		if p.next != "" {
			w.Header().Set(commands.NextCursorHeader, p.next)
		}
		_, _ = w.Write([]byte(p.body))
	}))
	defer srv.Close()
	c, err := client.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for op, err := range c.Operations(context.Background(), client.ListOptions{Status: commands.StatusExecuting, Limit: 1}) {
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, op.ID)
	}
	if strings.Join(got, ",") != "op-2,op-1" {
		t.Fatalf("Operations = %v, want op-2, op-1", got)
	}
}
