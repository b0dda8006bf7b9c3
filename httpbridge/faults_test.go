package httpbridge_test

import (
	"context"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
)

// commandCases are one request per command endpoint.
var commandCases = []struct{ method, path, body string }{
	{"POST", "/volumes", "create.json"},
	{"POST", "/volumes/" + vol1 + "/attach", "attach.json"},
	{"POST", "/volumes/" + vol1 + "/attach-root", "attach.json"},
	{"POST", "/volumes/" + vol1 + "/detach", ""},
	{"DELETE", "/volumes/" + vol1, ""},
	{"POST", "/admin/force-sync", ""},
	{"POST", "/failovers", "failover.json"},
	{"POST", "/failovers/" + opFailover + "/rollback", ""},
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
		rs, err := redisstore.New(context.Background(), redisstore.Config{
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
