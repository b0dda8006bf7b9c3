package handlers_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
	"github.com/volumed/volumed/test/cloudsim"
	"github.com/volumed/volumed/test/simtest"
)

// harness is a real command service: the handlers on an embedded NATS
// server with JetStream, a real store, the real CloudStack client against
// the simulator.
type harness struct {
	t     testing.TB
	bus   *bus.Bus
	store state.Store
	sim   *cloudsim.Sim
	svc   *handlers.Service
	nc    *nats.Conn // the client's connection
}

// harnessOpts configure newHarness.
type harnessOpts struct {
	redis bool
	cfg   handlers.Config // Conn, JetStream, Store and CloudStack are filled in
	// wrap, when set, wraps the store the service uses (a fault).
	wrap func(state.Store) state.Store
	// wrapJS, when set, wraps the service's JetStream.
	wrapJS func(jetstream.JetStream) jetstream.JetStream
	// inventory, when set, replaces the simulator's.
	inventory *cloudsim.Inventory
	// wrapCS, when set, wraps the service's CloudStack client (a fault).
	wrapCS func(csapi.API) csapi.API
}

func newHarness(t testing.TB, o harnessOpts) *harness {
	t.Helper()
	ctx := context.Background()
	h := &harness{t: t, bus: testenv.StartBus(t)}
	h.sim = simtest.Start(t, cloudsim.Config{JobDuration: 50 * time.Millisecond, LocalDevices: cloudsim.LocalDevicesOff, Inventory: o.inventory})
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	if o.redis {
		r := testenv.StartRedis(t)
		st, err := redisstore.New(ctx, redisstore.Config{URL: r.URL(), Logger: log})
		if err != nil {
			t.Fatalf("redis store: %v", err)
		}
		h.store = st
	} else {
		st, err := state.NewKV(ctx, h.bus.JetStream(), state.KVConfig{Logger: log})
		if err != nil {
			t.Fatalf("kv store: %v", err)
		}
		h.store = st
	}
	t.Cleanup(func() { _ = h.store.Close(context.Background()) })
	cfg := o.cfg
	cfg.Conn, cfg.ServiceConn, cfg.JetStream, cfg.Store = h.bus.Conn(), h.bus.ServiceConn(), h.bus.JetStream(), h.store
	if o.wrap != nil {
		cfg.Store = o.wrap(h.store)
	}
	if o.wrapJS != nil {
		cfg.JetStream = o.wrapJS(cfg.JetStream)
	}
	cfg.CloudStack = csapi.New(csapi.Config{URL: h.sim.URL(), APIKey: h.sim.APIKey(), SecretKey: h.sim.SecretKey()})
	if o.wrapCS != nil {
		cfg.CloudStack = o.wrapCS(cfg.CloudStack)
	}
	cfg.VMID, cfg.Logger = cloudsim.ApplianceVMID, log
	if cfg.SyncInterval == 0 {
		cfg.SyncInterval = -1
	}
	h.svc = handlers.New(cfg)
	if err := h.svc.Start(ctx); err != nil {
		t.Fatalf("start handlers: %v", err)
	}
	t.Cleanup(func() { _ = h.svc.Close(context.Background()) })
	h.nc = testenv.Connect(t, h.bus, bus.RoleOperator, nats.Name("test-client"))
	return h
}

// answer is one command reply.
type answer struct {
	status  int
	header  nats.Header
	body    []byte
	op      commands.Operation
	err     commands.Error
	elapsed time.Duration
}

// command sends one command over NATS, with an Idempotency-Key when key
// is not empty.
func (h *harness) command(subject string, body any, key string) answer {
	h.t.Helper()
	msg := nats.NewMsg(subject)
	msg.Data, _ = json.Marshal(body)
	if key != "" {
		msg.Header.Set(commands.IdempotencyKeyHeader, key)
	}
	ctx, cancel := context.WithTimeout(context.Background(), commands.AcceptTimeout+5*time.Second)
	defer cancel()
	start := time.Now()
	reply, err := h.nc.RequestMsgWithContext(ctx, msg)
	if err != nil {
		h.t.Errorf("request %s: %v", subject, err)
		return answer{}
	}
	a := answer{header: reply.Header, body: reply.Data, elapsed: time.Since(start)}
	a.status, err = strconv.Atoi(reply.Header.Get(commands.StatusHeader))
	if err != nil {
		h.t.Errorf("reply on %s without a Status header: %v", subject, reply.Header)
	}
	a.decode(h.t, subject)
	return a
}

// decode reads the body into op (a 201) or err (any other status).
func (a *answer) decode(t testing.TB, subject string) {
	t.Helper()
	into := any(&a.err)
	if a.status == http.StatusCreated {
		into = &a.op
	}
	if err := json.Unmarshal(a.body, into); err != nil {
		t.Errorf("answer on %s: %s: %v", subject, a.body, err)
	}
}

// local runs one command in process through Service.Command, as the REST
// bridge does, under ctx.
func (h *harness) local(ctx context.Context, subject string, body any, key string) answer {
	h.t.Helper()
	data, _ := json.Marshal(body)
	start := time.Now()
	got := h.svc.Command(ctx, subject, data, key)
	a := answer{status: got.Status, header: nats.Header{}, body: got.Body, elapsed: time.Since(start)}
	if got.RetryAfter != "" {
		a.header.Set(commands.RetryAfterHeader, got.RetryAfter)
	}
	a.decode(h.t, subject)
	return a
}

// createBody is a valid create request.
func createBody(name string) map[string]any {
	return map[string]any{"name": name, "size": 1 << 30, "disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID}
}

// createVolume creates a volume in the simulator directly and returns its id.
func (h *harness) createVolume(name string) string {
	h.t.Helper()
	cs := csapi.New(csapi.Config{URL: h.sim.URL(), APIKey: h.sim.APIKey(), SecretKey: h.sim.SecretKey()})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	id, job, err := cs.CreateVolume(ctx, csapi.CreateParams{Name: name, SizeGiB: 1, DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
	if err == nil {
		_, err = cs.WaitJob(ctx, job)
	}
	if err != nil {
		h.t.Fatalf("create volume: %v", err)
	}
	return id
}

// setFaults replaces the simulator's faults through its control endpoint.
func (h *harness) setFaults(f cloudsim.Faults) {
	h.t.Helper()
	data, _ := json.Marshal(f)
	req, _ := http.NewRequest(http.MethodPut, h.sim.ControlURL()+"/faults", bytes.NewReader(data))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		h.t.Fatalf("set faults: %s", resp.Status)
	}
}

// operations lists every recorded operation.
func (h *harness) operations() []commands.Operation {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ops, err := listAll(ctx, h.store)
	if err != nil {
		h.t.Fatalf("list operations: %v", err)
	}
	return ops
}

// listAll lists every recorded operation, newest first.
func listAll(ctx context.Context, st state.Store) ([]commands.Operation, error) {
	var all []commands.Operation
	f := state.Filter{}
	for {
		ops, next, err := st.ListOperations(ctx, f)
		if err != nil {
			return nil, err
		}
		all = append(all, ops...)
		if next == "" {
			return all, nil
		}
		f.Cursor = next
	}
}

// recorded reports whether the store has the operation.
func (h *harness) recorded(id string) bool {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := h.store.GetOperation(ctx, id)
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		h.t.Fatalf("get operation %s: %v", id, err)
	}
	return err == nil
}
