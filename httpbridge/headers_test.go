package httpbridge_test

import (
	"net/http"
	"strconv"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/apitest"
)

// TestCommandHeaders: the Idempotency-Key goes to the command service with
// the command, and a 503's Retry-After comes back; a command nobody
// received is 503 with Retry-After too.
func TestCommandHeaders(t *testing.T) {
	h := newHarness(t, options{noResponders: true})
	for _, c := range commandCases {
		t.Run(c.method+" "+c.path+" no responders", func(t *testing.T) {
			resp, body := h.do(t, c.method, c.path, readTestdata(t, c.body))
			if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get(commands.RetryAfterHeader) != "1" {
				t.Fatalf("%d Retry-After %q: %s", resp.StatusCode, resp.Header.Get(commands.RetryAfterHeader), body)
			}
		})
	}
	keys := make(chan string, len(commandCases))
	subjects := []string{commands.SubjectCreate, commands.SubjectAttach, commands.SubjectAttachRoot,
		commands.SubjectDetach, commands.SubjectDelete, commands.SubjectForceSync}
	for _, subject := range subjects {
		sub, err := h.bus.Subscribe(subject, func(m *nats.Msg) {
			keys <- m.Header.Get(commands.IdempotencyKeyHeader)
			reply := nats.NewMsg(m.Reply)
			reply.Header.Set(commands.StatusHeader, strconv.Itoa(http.StatusServiceUnavailable))
			reply.Header.Set(commands.RetryAfterHeader, "7")
			reply.Data = []byte(`{"error":"full","code":"SERVICE_UNAVAILABLE"}`)
			_ = m.RespondMsg(reply)
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := h.bus.Flush(); err != nil {
		t.Fatal(err)
	}
	for i, c := range commandCases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			key := "key-" + strconv.Itoa(i)
			req := apitest.NewRequest(t, c.method, h.base+c.path, readTestdata(t, c.body))
			req.Header.Set(commands.IdempotencyKeyHeader, key)
			resp, body := h.v.Do(t, nil, req)
			if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get(commands.RetryAfterHeader) != "7" {
				t.Fatalf("%d Retry-After %q: %s", resp.StatusCode, resp.Header.Get(commands.RetryAfterHeader), body)
			}
			if got := <-keys; got != key {
				t.Fatalf("the command service got Idempotency-Key %q, want %q", got, key)
			}
		})
	}
}
