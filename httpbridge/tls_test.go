package httpbridge_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/pki"
	"github.com/volumed/volumed/state"
)

// testTrust is a CA of the test's own and a certificate it issued for
// loopback.
func testTrust(t testing.TB) pki.Trust {
	t.Helper()
	ca, err := pki.LoadCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	k, err := pki.NewKeeper(pki.KeeperConfig{Issuer: ca, Name: "bridge", Hosts: []string{"127.0.0.1", "localhost"}, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close(context.Background()) })
	return pki.Trust{Certs: k, Roots: ca.Pool()}
}

// TestPlainHTTPRefusedOffLoopback: Start refuses to serve plain HTTP off
// loopback; with TLS, a plain request gets no API answer, and HTTP/2 is
// spoken.
func TestPlainHTTPRefusedOffLoopback(t *testing.T) {
	cfg := baseConfig(t)
	cfg.Listen, cfg.Token = "0.0.0.0:0", testToken
	srv := httpbridge.New(cfg)
	if err := srv.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "plain HTTP") {
		_ = srv.Close(context.Background())
		t.Fatalf("started plain HTTP off loopback: %v", err)
	}

	h := newHarness(t, options{listen: "0.0.0.0:0", token: testToken, tls: true})
	_, port, _ := net.SplitHostPort(h.srv.Addr())
	conn, err := net.Dial("tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET /api/v1/operations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+testToken+"\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err == nil {
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusBadRequest || strings.Contains(string(body), "[") {
			t.Fatalf("plain request to the HTTPS port: %d %s", resp.StatusCode, body)
		}
	}
	status, _, r := h.send(t, "GET", "/operations", bearer(testToken))
	if status != 200 || r.ProtoMajor != 2 || r.TLS == nil {
		t.Fatalf("HTTPS: %d over %s, want 200 over HTTP/2 with TLS", status, r.Proto)
	}
	if h.srv.URL() != "https://"+h.srv.Addr()+httpbridge.BasePath {
		t.Fatalf("URL %q", h.srv.URL())
	}
}

// TestTokensAndRequester: each named token is let in and named in
// requested_by with the client address; a token removed by a reload is
// refused at once; the single token is "default"; no token on loopback
// is loopback@address.
func TestTokensAndRequester(t *testing.T) {
	byName, err := httpbridge.ParseTokens(strings.NewReader("# ops team\nalice: aaaaaaaaaaaaaaaaaaaa\n\nci-bot:bbbbbbbbbbbbbbbbbbbb\n"))
	if err != nil {
		t.Fatal(err)
	}
	tokens, err := httpbridge.NewTokens(byName)
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, options{token: testToken, tokens: tokens})
	detach := func(headers map[string]string) int {
		status, _, _ := h.send(t, "POST", "/volumes/"+vol1+"/detach", headers)
		return status
	}
	for _, hd := range []map[string]string{bearer("aaaaaaaaaaaaaaaaaaaa"), bearer("bbbbbbbbbbbbbbbbbbbb"), bearer(testToken), nil} {
		if s := detach(hd); s != 201 {
			t.Fatalf("detach: %d", s)
		}
	}
	h.commands.mu.Lock()
	got := slices.Clone(h.commands.requesters)
	h.commands.mu.Unlock()
	want := []string{"api-token:alice@127.0.0.1", "api-token:ci-bot@127.0.0.1", "api-token:default@127.0.0.1", "loopback@127.0.0.1"}
	if !slices.Equal(got, want) {
		t.Fatalf("requested_by %q, want %q", got, want)
	}
	if err := tokens.Set(map[string]string{"ci-bot": "bbbbbbbbbbbbbbbbbbbb"}); err != nil {
		t.Fatal(err)
	}
	if s := detach(bearer("aaaaaaaaaaaaaaaaaaaa")); s != 401 {
		t.Fatalf("revoked token: %d, want 401", s)
	}
	if s := detach(bearer("bbbbbbbbbbbbbbbbbbbb")); s != 201 {
		t.Fatalf("kept token: %d, want 201", s)
	}
}

func TestParseTokensRefuses(t *testing.T) {
	for name, text := range map[string]string{
		"no colon":    "alice\n",
		"empty token": "alice:\n",
		"twice":       "a:aaaaaaaaaaaaaaaaaaaa\na:bbbbbbbbbbbbbbbbbbbb\n",
	} {
		if _, err := httpbridge.ParseTokens(strings.NewReader(text)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	for name, m := range map[string]map[string]string{
		"short":    {"a": "short"},
		"bad name": {"a b": "aaaaaaaaaaaaaaaaaaaa"},
		"same":     {"a": "aaaaaaaaaaaaaaaaaaaa", "b": "aaaaaaaaaaaaaaaaaaaa"},
	} {
		tokens, _ := httpbridge.NewTokens(map[string]string{"keep": "kkkkkkkkkkkkkkkkkkkk"})
		if err := tokens.Set(m); err == nil {
			t.Errorf("%s: accepted", name)
		}
		if _, ok := tokens.Lookup("kkkkkkkkkkkkkkkkkkkk"); !ok {
			t.Errorf("%s: a refused set changed the tokens", name)
		}
	}
}

// filterStore records the filter of ListOperations.
type filterStore struct {
	state.Store
	got chan state.Filter
}

func (s filterStore) ListOperations(ctx context.Context, f state.Filter) ([]commands.Operation, string, error) {
	s.got <- f
	return s.Store.ListOperations(ctx, f)
}

// TestRequestedByFilter: ?requested_by reaches the store's filter (the
// store's own filtering is tested with the store).
func TestRequestedByFilter(t *testing.T) {
	base := baseConfig(t)
	fs := filterStore{Store: base.Store, got: make(chan state.Filter, 1)}
	h := newHarness(t, options{store: fs})
	who := "api-token:alice@10.0.0.7"
	resp, body := h.do(t, "GET", "/operations?requested_by="+url.QueryEscape(who), "")
	if resp.StatusCode != 200 {
		t.Fatalf("list: %d %s", resp.StatusCode, body)
	}
	if f := <-fs.got; f.RequestedBy != who {
		t.Fatalf("filter requested_by %q, want %q", f.RequestedBy, who)
	}
	resp, body = h.do(t, "GET", "/operations?requested_by="+strings.Repeat("x", 300), "")
	if resp.StatusCode != 400 {
		t.Fatalf("a 300-character requested_by: %d %s, want 400", resp.StatusCode, body)
	}
}
