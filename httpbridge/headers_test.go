package httpbridge_test

import (
	"net/http"
	"strconv"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/apitest"
)

// TestCommandHeaders: the Idempotency-Key goes to the command service with
// the command, and the answer's status, body and Retry-After come back as
// they are.
func TestCommandHeaders(t *testing.T) {
	h := newHarness(t, options{})
	keys := make(chan string, len(commandCases))
	body := `{"error":"full","code":"SERVICE_UNAVAILABLE"}`
	h.commands.answerAll(commands.Answer{Status: http.StatusServiceUnavailable, Body: []byte(body), RetryAfter: "7"}, keys)
	for i, c := range commandCases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			key := "key-" + strconv.Itoa(i)
			req := apitest.NewRequest(t, c.method, h.base+c.path, readTestdata(t, c.body))
			req.Header.Set(commands.IdempotencyKeyHeader, key)
			resp, got := h.v.Do(t, nil, req)
			if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get(commands.RetryAfterHeader) != "7" || string(got) != body {
				t.Fatalf("%d Retry-After %q: %s", resp.StatusCode, resp.Header.Get(commands.RetryAfterHeader), got)
			}
			if got := <-keys; got != key {
				t.Fatalf("the command service got Idempotency-Key %q, want %q", got, key)
			}
		})
	}
}
