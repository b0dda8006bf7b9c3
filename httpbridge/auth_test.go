package httpbridge_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/apitest"
)

const testToken = "0123456789abcdef0123456789abcdef"

// send does one request with headers, validated against the OpenAPI
// document, and returns the status, the error code if any and the response.
func (h *harness) send(t *testing.T, method, path string, headers map[string]string) (int, string, *http.Response) {
	t.Helper()
	req := apitest.NewRequest(t, method, h.base+path, "")
	for k, v := range headers {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	resp, body := h.v.Do(t, h.client, req)
	var e struct {
		Code string `json:"code"`
	}
	if resp.StatusCode >= 400 {
		if err := json.Unmarshal(body, &e); err != nil {
			t.Fatalf("%s %s: error body %s: %v", method, path, body, err)
		}
	}
	return resp.StatusCode, e.Code, resp
}

// operations counts the recorded operations (GET /operations with the
// token).
func (h *harness) operations(t *testing.T) int {
	t.Helper()
	req := apitest.NewRequest(t, "GET", h.base+"/operations", "")
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, body := h.v.Do(t, h.client, req)
	var ops []json.RawMessage
	if resp.StatusCode != 200 || json.Unmarshal(body, &ops) != nil {
		t.Fatalf("list operations: %d %s", resp.StatusCode, body)
	}
	return len(ops)
}

func bearer(token string) map[string]string {
	return map[string]string{"Authorization": "Bearer " + token}
}

func TestTokenRequiredOffLoopback(t *testing.T) {
	h := newHarness(t, options{listen: "0.0.0.0:0", token: testToken, tls: true})
	tests := []struct {
		name         string
		method, path string
		headers      map[string]string
		status       int
		code         string
	}{
		{"health is open", "GET", "/health", nil, 200, ""},
		{"openapi is open", "GET", "/openapi.json", nil, 200, ""},
		{"read without token", "GET", "/operations", nil, 401, commands.CodeUnauthorized},
		{"command without token", "POST", "/volumes/" + vol1 + "/detach", nil, 401, commands.CodeUnauthorized},
		{"unknown route without token", "GET", "/nothing", nil, 401, commands.CodeUnauthorized},
		{"wrong token", "POST", "/volumes/" + vol1 + "/detach", bearer(testToken + "x"), 401, commands.CodeUnauthorized},
		{"token prefix", "GET", "/operations", bearer(testToken[:20]), 401, commands.CodeUnauthorized},
		{"basic scheme", "GET", "/operations", map[string]string{"Authorization": "Basic " + testToken}, 401, commands.CodeUnauthorized},
		{"read with token", "GET", "/operations", bearer(testToken), 200, ""},
		{"scheme is case-insensitive", "GET", "/operations", map[string]string{"Authorization": "bearer " + testToken}, 200, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, code, resp := h.send(t, tc.method, tc.path, tc.headers)
			if status != tc.status || code != tc.code {
				t.Fatalf("%s %s: %d %s, want %d %s", tc.method, tc.path, status, code, tc.status, tc.code)
			}
			if status == 401 && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("401 without WWW-Authenticate: Bearer: %v", resp.Header)
			}
		})
	}
	if n := h.operations(t); n != 0 {
		t.Fatalf("%d operations recorded by refused requests", n)
	}
	if status, _, _ := h.send(t, "POST", "/volumes/"+vol1+"/detach", bearer(testToken)); status != 201 {
		t.Fatalf("command with the token: %d, want 201", status)
	}
}

func TestTokenOptionalOnLoopback(t *testing.T) {
	h := newHarness(t, options{token: testToken})
	_, port, _ := net.SplitHostPort(h.srv.Addr())
	tests := []struct {
		name    string
		headers map[string]string
		status  int
		code    string
	}{
		{"no token", nil, 200, ""},
		{"right token", bearer(testToken), 200, ""},
		{"wrong token", bearer("not-the-token-at-all"), 401, commands.CodeUnauthorized},
		{"localhost", map[string]string{"Host": "localhost:" + port}, 200, ""},
		// A DNS name rebound to 127.0.0.1 by a hostile page gets nothing
		// without the token.
		{"rebound name without token", map[string]string{"Host": "evil.example:" + port}, 403, commands.CodeForbidden},
		{"rebound name with token", map[string]string{"Host": "evil.example:" + port, "Authorization": "Bearer " + testToken}, 200, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if status, code, _ := h.send(t, "GET", "/operations", tc.headers); status != tc.status || code != tc.code {
				t.Fatalf("%d %s, want %d %s", status, code, tc.status, tc.code)
			}
		})
	}
}

func TestCrossSiteRefused(t *testing.T) {
	h := newHarness(t, options{token: testToken})
	self := "http://" + strings.TrimPrefix(strings.TrimSuffix(h.base, httpbridge.BasePath), "http://")
	tests := []struct {
		name    string
		headers map[string]string
		status  int
	}{
		{"cross-site fetch", map[string]string{"Sec-Fetch-Site": "cross-site"}, 403},
		{"same-site fetch (another port of localhost)", map[string]string{"Sec-Fetch-Site": "same-site"}, 403},
		{"cross-site with the token", map[string]string{"Sec-Fetch-Site": "cross-site", "Authorization": "Bearer " + testToken}, 403},
		{"other origin", map[string]string{"Origin": "http://evil.example"}, 403},
		{"null origin", map[string]string{"Origin": "null"}, 403},
		{"other scheme", map[string]string{"Origin": strings.Replace(self, "http:", "https:", 1)}, 403},
		{"other port", map[string]string{"Origin": "http://127.0.0.1:1"}, 403},
		{"same origin", map[string]string{"Origin": self, "Sec-Fetch-Site": "same-origin"}, 201},
		{"typed by a user", map[string]string{"Sec-Fetch-Site": "none"}, 201},
		{"not a browser", nil, 201},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := h.operations(t)
			status, code, _ := h.send(t, "POST", "/volumes/"+vol1+"/detach", tc.headers)
			if status != tc.status {
				t.Fatalf("body-less POST: %d %s, want %d", status, code, tc.status)
			}
			after := h.operations(t)
			if tc.status == 403 && (code != commands.CodeForbidden || after != before) {
				t.Fatalf("refused with code %s; operations %d → %d", code, before, after)
			}
		})
	}
}

func TestStartRefusedOffLoopbackWithoutToken(t *testing.T) {
	for _, token := range []string{"", "short"} {
		srv := httpbridge.New(httpbridge.Config{Listen: "0.0.0.0:0", Token: token, Logger: testLogger(t)})
		err := srv.Start(context.Background())
		if err == nil {
			_ = srv.Close(context.Background())
			t.Fatalf("started off loopback with token %q", token)
		}
		if !strings.Contains(err.Error(), "off loopback") {
			t.Errorf("error %v does not say why", err)
		}
	}
}

// closedWithin reports whether the server closes conn within d (a read
// ends with EOF or a reset, not the client's own deadline).
func closedWithin(t *testing.T, conn net.Conn, d time.Duration) bool {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, conn)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

func TestServerTimeouts(t *testing.T) {
	h := newHarness(t, options{readHeaderTimeout: 200 * time.Millisecond, readTimeout: 400 * time.Millisecond,
		idleTimeout: 300 * time.Millisecond})
	addr := strings.TrimSuffix(strings.TrimPrefix(h.base, "http://"), httpbridge.BasePath)
	dial := func() net.Conn {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	t.Run("slow headers", func(t *testing.T) {
		conn := dial()
		_, _ = io.WriteString(conn, "GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
		if !closedWithin(t, conn, 5*time.Second) {
			t.Fatal("connection with unfinished headers still open after 5s")
		}
	})
	t.Run("slow body", func(t *testing.T) {
		conn := dial()
		_, _ = io.WriteString(conn, "POST /api/v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
		if !closedWithin(t, conn, 5*time.Second) {
			t.Fatal("connection with an unfinished body still open after 5s")
		}
	})
	t.Run("idle keep-alive", func(t *testing.T) {
		conn := dial()
		_, _ = io.WriteString(conn, "GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Close {
			t.Fatalf("health: %d close=%v, want 200 kept alive", resp.StatusCode, resp.Close)
		}
		if !closedWithin(t, conn, 5*time.Second) {
			t.Fatal("idle connection still open after 5s")
		}
	})
}
