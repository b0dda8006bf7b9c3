package csapi

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// step is one scripted answer of the replay server.
type step struct {
	// status is the HTTP status (200 when 0).
	status int
	// file is the testdata file sent as the body.
	file string
	// key picks one sample out of a file of several (cloudstack-go's own
	// test data is keyed by command).
	key string
	// drop hijacks and closes the connection without answering.
	drop bool
	// hang answers only when the request's context ends.
	hang bool
	// header is added to the answer.
	header map[string]string
}

// replay is an HTTP server that answers each command with its scripted
// steps in order (the last one repeats) and records the requests.
type replay struct {
	t      *testing.T
	url    string
	mu     sync.Mutex
	script map[string][]step
	forms  []url.Values
}

// startReplay serves script and returns a Client pointed at it.
func startReplay(t *testing.T, script map[string][]step) (*replay, *Client) {
	t.Helper()
	r := &replay{t: t, script: script}
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	r.url = srv.URL + "/client/api"
	c := New(Config{URL: r.url, APIKey: "key", SecretKey: "secret", PollMin: time.Millisecond, PollMax: 4 * time.Millisecond})
	return r, c
}

// ServeHTTP answers with the command's next step.
func (r *replay) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if err := req.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	cmd := req.Form.Get("command")
	r.mu.Lock()
	r.forms = append(r.forms, req.Form)
	steps := r.script[cmd]
	if len(steps) == 0 {
		r.mu.Unlock()
		r.t.Errorf("replay: unscripted command %q", cmd)
		http.Error(w, "unscripted", http.StatusNotImplemented)
		return
	}
	s := steps[0]
	if len(steps) > 1 {
		r.script[cmd] = steps[1:]
	}
	r.mu.Unlock()
	switch {
	case s.drop:
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			r.t.Errorf("replay: hijack: %v", err)
			return
		}
		conn.Close()
		return
	case s.hang:
		<-req.Context().Done()
		return
	}
	body := readTestdata(r.t, s.file, s.key)
	w.Header().Set("Content-Type", "application/json")
	for k, v := range s.header {
		w.Header().Set(k, v)
	}
	w.WriteHeader(max(s.status, http.StatusOK))
	w.Write(body)
}

// form returns the i-th recorded request's parameters.
func (r *replay) form(i int) url.Values {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i >= len(r.forms) {
		r.t.Fatalf("replay: %d requests recorded, want request %d", len(r.forms), i)
	}
	return r.forms[i]
}

// requests counts the requests received.
func (r *replay) requests() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.forms)
}

// readTestdata reads a testdata file, or the sample under key in it.
func readTestdata(t testing.TB, file, key string) []byte {
	b, err := os.ReadFile(filepath.Join("testdata", file))
	if err != nil {
		t.Errorf("testdata: %v", err)
		return nil
	}
	if key == "" {
		return b
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil || m[key] == nil {
		t.Errorf("testdata %s: no sample %q (%v)", file, key, err)
		return nil
	}
	return m[key]
}

// ctxTimeout is a test context that ends with the test.
func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
