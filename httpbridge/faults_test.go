package httpbridge_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// commandCases are one request per command endpoint.
var commandCases = []struct{ method, path, body string }{
	{"POST", "/volumes", "create.json"},
	{"POST", "/volumes/" + vol1 + "/attach", "attach.json"},
	{"POST", "/volumes/" + vol1 + "/attach-root", "attach.json"},
	{"POST", "/volumes/" + vol1 + "/detach", ""},
	{"DELETE", "/volumes/" + vol1, ""},
	{"POST", "/admin/force-sync", ""},
}

// expectCommandErrors sends every command and wants status and code.
func expectCommandErrors(t *testing.T, h *harness, status int, code string) {
	t.Helper()
	for _, c := range commandCases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			resp, body := h.do(t, c.method, c.path, readTestdata(t, c.body))
			if e := decodeAs[apiErr](t, body); resp.StatusCode != status || e.Code != code {
				t.Errorf("%d %s, want %d %s", resp.StatusCode, body, status, code)
			}
		})
	}
}

func TestNoResponders(t *testing.T) {
	h := newHarness(t, options{noResponders: true})
	expectCommandErrors(t, h, 503, commands.CodeServiceUnavailable)
}

func TestCommandTimeout(t *testing.T) {
	h := newHarness(t, options{noResponders: true, commandTimeout: 200 * time.Millisecond})
	// A command service that takes the requests and never answers.
	for _, c := range []string{commands.SubjectCreate, commands.SubjectAttach, commands.SubjectAttachRoot,
		commands.SubjectDetach, commands.SubjectDelete, commands.SubjectForceSync} {
		sub, err := h.bus.Subscribe(c, func(*nats.Msg) {})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := h.bus.Flush(); err != nil {
		t.Fatal(err)
	}
	expectCommandErrors(t, h, 503, commands.CodeServiceUnavailable)
}

func TestReplyWithoutStatus(t *testing.T) {
	h := newHarness(t, options{noResponders: true})
	sub, err := h.bus.Subscribe(commands.SubjectForceSync, func(m *nats.Msg) { _ = m.Respond([]byte(`{}`)) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := h.bus.Flush(); err != nil {
		t.Fatal(err)
	}
	resp, body := h.do(t, "POST", "/admin/force-sync", "")
	if e := decodeAs[apiErr](t, body); resp.StatusCode != 500 || e.Code != commands.CodeInternalError {
		t.Errorf("%d %s", resp.StatusCode, body)
	}
}

// storeDownCases are the reads answered from the store.
var storeDownCases = []string{
	"/operations/" + opAttach,
	"/operations/" + opAttach + "?wait=1s",
	"/volumes/" + vol1 + "/device",
}

// TestStoreDown stops the store's server under a running bridge: the
// embedded KV store on its own NATS server, and Redis.
func TestStoreDown(t *testing.T) {
	t.Run("kv", func(t *testing.T) {
		storeBus := testenv.StartBus(t)
		kv, err := state.NewKV(context.Background(), storeBus.JetStream(), state.KVConfig{Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = kv.Close(context.Background()) })
		h := newHarness(t, options{store: kv})
		h.seedOperation(t, opAttach, commands.OpAttach, commands.StatusExecuting, vol1, vm1, 31)
		h.seedMapping(t, vol1, "/dev/vdb")
		if err := storeBus.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		expectStoreDown(t, h, storeDownCases)
	})
	t.Run("redis", func(t *testing.T) {
		redis := testenv.StartRedis(t)
		rs, err := state.NewRedis(context.Background(), state.RedisConfig{
			URL: redis.URL() + "?max_retries=-1&dial_timeout=1s", Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = rs.Close(context.Background()) })
		h := newHarness(t, options{store: rs})
		h.seedOperation(t, opAttach, commands.OpAttach, commands.StatusExecuting, vol1, vm1, 31)
		h.seedMapping(t, vol1, "/dev/vdb")
		redis.Stop()
		expectStoreDown(t, h, append([]string{"/operations", "/devices/dev%2Fvdb/volume"}, storeDownCases...))
		// The command service cannot record the operation either.
		resp, body := h.do(t, "POST", "/volumes", readTestdata(t, "create.json"))
		if e := decodeAs[apiErr](t, body); resp.StatusCode != 503 || e.Code != commands.CodeServiceUnavailable {
			t.Errorf("create with the store down: %d %s", resp.StatusCode, body)
		}
	})
}

func expectStoreDown(t *testing.T, h *harness, paths []string) {
	t.Helper()
	for _, p := range paths {
		resp, body := h.do(t, "GET", p, "")
		if e := decodeAs[apiErr](t, body); resp.StatusCode != 503 || e.Code != commands.CodeServiceUnavailable {
			t.Errorf("GET %s with the store down: %d %s", p, resp.StatusCode, body)
		}
	}
}
