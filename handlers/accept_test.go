package handlers_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
)

// stores runs a test with each store.
func stores(t *testing.T, run func(t *testing.T, redis bool)) {
	for _, redis := range []bool{false, true} {
		name := "embedded"
		if redis {
			name = "redis"
		}
		t.Run(name, func(t *testing.T) { run(t, redis) })
	}
}

// TestMicroService: `nats micro info volumed` shows one endpoint per
// command subject, in the volumed queue group.
func TestMicroService(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	reply, err := h.nc.Request("$SRV.INFO."+commands.ServiceName, nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var info micro.Info
	if err := json.Unmarshal(reply.Data, &info); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"create": commands.SubjectCreate, "attach": commands.SubjectAttach,
		"attach-root": commands.SubjectAttachRoot, "detach": commands.SubjectDetach, "delete": commands.SubjectDelete,
		"export": commands.SubjectExport, "unexport": commands.SubjectUnexport, "force-sync": commands.SubjectForceSync,
		"snapshot": commands.SubjectSnapshot, "delete_snapshot": commands.SubjectDeleteSnapshot, "revert": commands.SubjectRevert,
		"resize": commands.SubjectResize, "tags": commands.SubjectTags,
		"failover": commands.SubjectFailover, "rollback": commands.SubjectRollback}
	got := map[string]string{}
	for _, ep := range info.Endpoints {
		got[ep.Name] = ep.Subject
		if ep.QueueGroup != handlers.QueueGroup {
			t.Errorf("endpoint %s in queue group %q", ep.Name, ep.QueueGroup)
		}
	}
	if info.Name != commands.ServiceName || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("service %q endpoints %v, want %v", info.Name, got, want)
	}
	// `nats micro ls` pings every service.
	if reply, err := h.nc.Request("$SRV.PING", nil, 5*time.Second); err != nil || !strings.Contains(string(reply.Data), `"name":"volumed"`) {
		t.Fatalf("ping: %v %v", reply, err)
	}
	// A command through the service counts in its stats.
	if a := h.command(commands.SubjectCreate, createBody("counted"), ""); a.status != http.StatusCreated {
		t.Fatalf("create: %d %s", a.status, a.body)
	}
	stats := h.stats()
	i := slices.IndexFunc(stats.Endpoints, func(e *micro.EndpointStats) bool { return e.Name == "create" })
	if i < 0 || stats.Endpoints[i].NumRequests != 1 {
		t.Fatalf("stats: %+v", stats.Endpoints)
	}
}

// stats asks the micro service for its stats.
func (h *harness) stats() micro.Stats {
	h.t.Helper()
	reply, err := h.nc.Request("$SRV.STATS."+commands.ServiceName, nil, 5*time.Second)
	if err != nil {
		h.t.Fatal(err)
	}
	var stats micro.Stats
	if err := json.Unmarshal(reply.Data, &stats); err != nil {
		h.t.Fatal(err)
	}
	return stats
}

// inflight is the number of commands being accepted, from the stats.
func (h *harness) inflight() int64 {
	var data map[string]int64
	st := h.stats()
	if len(st.Endpoints) == 0 || json.Unmarshal(st.Endpoints[0].Data, &data) != nil {
		h.t.Fatalf("stats without data: %+v", st)
	}
	return data["inflight"]
}

// TestAcceptSlowCloudStack: with CloudStack answering its list calls
// slowly, concurrent attaches of one volume are answered within the
// accept timeout, each 201 with its operation recorded, or 503 with
// Retry-After and nothing recorded.
func TestAcceptSlowCloudStack(t *testing.T) {
	stores(t, func(t *testing.T, redis bool) {
		for _, tc := range []struct {
			name     string
			slots, n int
		}{{"room for all", 0, 6}, {"more than the slots", 4, 24}} {
			t.Run(tc.name, func(t *testing.T) {
				check := 300 * time.Millisecond
				h := newHarness(t, harnessOpts{redis: redis, cfg: handlers.Config{AcceptConcurrency: tc.slots, CheckTimeout: check}})
				vol := h.createVolume("slow")
				h.setFaults(cloudsim.Faults{Latency: map[string]cloudsim.Duration{
					"listVolumes": cloudsim.Duration(6 * time.Second), "listVirtualMachines": cloudsim.Duration(6 * time.Second)}})
				answers := make([]answer, tc.n)
				var wg sync.WaitGroup
				for i := range tc.n {
					wg.Go(func() {
						answers[i] = h.command(commands.SubjectAttach, map[string]string{"volume_id": vol, "vm_id": cloudsim.RemoteVMID},
							fmt.Sprintf("slow-%d", i))
					})
				}
				wg.Wait()
				accepted := 0
				for i, a := range answers {
					id := handlers.OperationIDForKey(fmt.Sprintf("slow-%d", i))
					switch a.status {
					case http.StatusCreated:
						accepted++
						if a.op.ID != id || !h.recorded(id) {
							t.Errorf("answer %d: 201 with %s, recorded %v", i, a.op.ID, h.recorded(id))
						}
						if a.elapsed > check+3*time.Second {
							t.Errorf("answer %d: 201 after %v, past the check budget", i, a.elapsed)
						}
					case http.StatusServiceUnavailable:
						if a.header.Get(commands.RetryAfterHeader) != "1" || a.header.Get(micro.ErrorCodeHeader) != "503" ||
							a.err.Code != commands.CodeServiceUnavailable {
							t.Errorf("answer %d: 503 with headers %v: %s", i, a.header, a.body)
						}
						if h.recorded(id) {
							t.Errorf("answer %d: 503, yet %s is recorded", i, id)
						}
					default:
						t.Errorf("answer %d: %d %s", i, a.status, a.body)
					}
					if a.elapsed >= commands.AcceptTimeout {
						t.Errorf("answer %d after %v, past the accept timeout", i, a.elapsed)
					}
				}
				if ops := h.operations(); len(ops) != accepted {
					t.Errorf("%d operations recorded, %d answered 201", len(ops), accepted)
				}
				switch {
				case tc.slots == 0 && accepted != tc.n:
					t.Errorf("%d of %d accepted with room for all", accepted, tc.n)
				case tc.slots > 0 && (accepted == 0 || accepted > tc.slots):
					t.Errorf("%d of %d accepted with %d slots", accepted, tc.n, tc.slots)
				}
			})
		}
	})
}

// TestBackpressure: with every slot taken, a command is answered 503 at
// once, with Retry-After, and nothing is recorded; the commands holding
// the slots are accepted.
func TestBackpressure(t *testing.T) {
	for _, way := range []string{"nats", "in process"} {
		t.Run(way, func(t *testing.T) {
			h := newHarness(t, harnessOpts{cfg: handlers.Config{AcceptConcurrency: 2, CheckTimeout: 2 * time.Second}})
			send := func(subject string, body any, key string) answer {
				if way == "nats" {
					return h.command(subject, body, key)
				}
				return h.local(context.Background(), subject, body, key)
			}
			vol := h.createVolume("held")
			h.setFaults(cloudsim.Faults{Latency: map[string]cloudsim.Duration{"listVolumes": cloudsim.Duration(10 * time.Second)}})
			held := make([]answer, 2)
			var wg sync.WaitGroup
			for i := range held {
				// One slot taken each way: the pool is one for both.
				wg.Go(func() {
					if i == 0 {
						held[i] = h.command(commands.SubjectDetach, map[string]string{"volume_id": vol}, "")
					} else {
						held[i] = h.local(context.Background(), commands.SubjectDetach, map[string]string{"volume_id": vol}, "")
					}
				})
			}
			testenv.Eventually(t, 5*time.Second, func() bool { return h.inflight() == 2 }, "both slots taken")
			a := send(commands.SubjectCreate, createBody("refused"), "refused")
			if a.status != http.StatusServiceUnavailable || a.header.Get(commands.RetryAfterHeader) != "1" || a.elapsed > time.Second {
				t.Fatalf("command past the slots: %d after %v, headers %v: %s", a.status, a.elapsed, a.header, a.body)
			}
			if h.recorded(handlers.OperationIDForKey("refused")) {
				t.Fatal("a command answered 503 is recorded")
			}
			wg.Wait()
			for i, a := range held {
				if a.status != http.StatusCreated || !h.recorded(a.op.ID) {
					t.Fatalf("held command %d: %d %s", i, a.status, a.body)
				}
			}
			if n := len(h.operations()); n != 2 {
				t.Fatalf("%d operations recorded, want the 2 accepted", n)
			}
		})
	}
}

// TestCommandInProcessOutlivesItsCaller: a command run in process whose
// caller gives up (the REST client went away) still runs to its answer,
// and the answer is what was recorded.
func TestCommandInProcessOutlivesItsCaller(t *testing.T) {
	h := newHarness(t, harnessOpts{cfg: handlers.Config{CheckTimeout: 2 * time.Second}})
	vol := h.createVolume("slow")
	h.setFaults(cloudsim.Faults{Latency: map[string]cloudsim.Duration{"listVolumes": cloudsim.Duration(time.Second)}})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	a := h.local(ctx, commands.SubjectDetach, map[string]string{"volume_id": vol}, "gone-client")
	if a.status != http.StatusCreated || a.op.ID != handlers.OperationIDForKey("gone-client") || !h.recorded(a.op.ID) {
		t.Fatalf("%d %s: want 201 with the recorded operation", a.status, a.body)
	}
	if a := h.local(context.Background(), "volumes.cmd.nothing", map[string]string{}, ""); a.status != http.StatusInternalServerError {
		t.Fatalf("unknown subject: %d %s", a.status, a.body)
	}
}

// TestCommandInProcessStops: a force-sync run in process stops with its
// caller, and once the service is closed a command is 503 with
// Retry-After and nothing recorded.
func TestCommandInProcessStops(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	// A reconcile asks CloudStack about each mapped volume, which takes 10 s.
	vol, now := h.createVolume("mapped"), time.Now().UTC()
	if _, err := h.store.PutMapping(context.Background(), commands.Mapping{ID: "mapping-" + vol, VolumeID: vol, VMID: cloudsim.RemoteVMID,
		CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxNotApplicable, LastSync: now, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	h.setFaults(cloudsim.Faults{Latency: map[string]cloudsim.Duration{"listVolumes": cloudsim.Duration(10 * time.Second)}})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if a := h.local(ctx, commands.SubjectForceSync, nil, ""); a.elapsed > 5*time.Second {
		t.Fatalf("a force-sync whose caller left ran on for %v: %d %s", a.elapsed, a.status, a.body)
	}
	h.setFaults(cloudsim.Faults{})
	if err := h.svc.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	a := h.local(context.Background(), commands.SubjectCreate, createBody("after-close"), "after-close")
	if a.status != http.StatusServiceUnavailable || a.header.Get(commands.RetryAfterHeader) != "1" {
		t.Fatalf("command after Close: %d %v %s", a.status, a.header, a.body)
	}
	if h.recorded(handlers.OperationIDForKey("after-close")) {
		t.Fatal("a command refused after Close is recorded")
	}
}

// TestForceSyncRefusesABody: a force-sync takes nothing. A body that is
// not empty or {} (malformed JSON, a field, an array, bytes that are not
// UTF-8) is 400 INVALID_REQUEST, in process and on NATS, and reconciles
// nothing: CloudStack is not asked. Empty, {} and null run the reconcile.
func TestForceSyncRefusesABody(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	// A reconcile asks CloudStack about each mapped volume.
	vol, now := h.createVolume("mapped"), time.Now().UTC()
	if _, err := h.store.PutMapping(context.Background(), commands.Mapping{ID: "mapping-" + vol, VolumeID: vol, VMID: cloudsim.RemoteVMID,
		CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxNotApplicable, LastSync: now, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	calls := func() (n int64) {
		for _, c := range h.sim.Stats().Calls {
			n += c
		}
		return n
	}
	before := calls()
	for _, body := range []string{`garbage`, `{"x":1}`, `[]`, "{\"x\":\"\xff\"}", `{} {}`} {
		got := h.svc.Command(context.Background(), commands.SubjectForceSync, []byte(body), "")
		a := answer{status: got.Status, body: got.Body}
		a.decode(t, commands.SubjectForceSync)
		if a.status != http.StatusBadRequest || a.err.Code != commands.CodeInvalidRequest {
			t.Errorf("force-sync with body %q: %d %s, want 400 INVALID_REQUEST", body, a.status, a.body)
		}
	}
	if a := h.command(commands.SubjectForceSync, map[string]int{"x": 1}, ""); a.status != http.StatusBadRequest ||
		a.err.Details["field"] != "x" {
		t.Errorf("force-sync on NATS with a field: %d %s, want 400 naming the field", a.status, a.body)
	}
	if n := calls(); n != before {
		t.Fatalf("refused force-syncs made %d CloudStack calls", n-before)
	}
	for _, body := range []string{``, `{}`, `null`} {
		if got := h.svc.Command(context.Background(), commands.SubjectForceSync, []byte(body), ""); got.Status != http.StatusOK {
			t.Errorf("force-sync with body %q: %d %s, want 200", body, got.Status, got.Body)
		}
	}
	if calls() == before {
		t.Fatal("the force-syncs answered 200 asked CloudStack nothing")
	}
}

// TestIdempotencyKey: the same key and body answer the same operation,
// concurrently too and after it ended; another body or command with the
// key is 409 CONFLICT; a malformed key is 400.
func TestIdempotencyKey(t *testing.T) {
	stores(t, func(t *testing.T, redis bool) {
		h := newHarness(t, harnessOpts{redis: redis})
		detached := h.createVolume("x")
		const key = "order-42/create"
		body := createBody("idem")
		answers := make([]answer, 8)
		var wg sync.WaitGroup
		for i := range answers {
			wg.Go(func() { answers[i] = h.command(commands.SubjectCreate, body, key) })
		}
		wg.Wait()
		id := handlers.OperationIDForKey(key)
		for i, a := range answers {
			if a.status != http.StatusCreated || a.op.ID != id || !a.op.CreatedAt.Equal(answers[0].op.CreatedAt) {
				t.Fatalf("answer %d: %d %s; want 201 with %s created at %v", i, a.status, a.body, id, answers[0].op.CreatedAt)
			}
		}
		other := createBody("idem-other")
		for _, c := range []struct {
			subject string
			body    any
		}{{commands.SubjectCreate, other}, {commands.SubjectDetach, map[string]string{"volume_id": detached}}} {
			a := h.command(c.subject, c.body, key)
			if a.status != http.StatusConflict || a.err.Code != commands.CodeConflict || a.err.Details["idempotency_key"] != key ||
				a.err.Details["operation_id"] != id {
				t.Fatalf("%s with a used key: %d %s", c.subject, a.status, a.body)
			}
		}
		if a := h.command(commands.SubjectCreate, body, "with space"); a.status != http.StatusBadRequest ||
			a.err.Details["field"] != commands.IdempotencyKeyHeader {
			t.Fatalf("malformed key: %d %s", a.status, a.body)
		}
		// The key lives as long as its operation: after it ended, the same
		// answer, now showing the end.
		testenv.Eventually(t, 30*time.Second, func() bool {
			a := h.command(commands.SubjectCreate, body, key)
			return a.status == http.StatusCreated && a.op.ID == id && a.op.Status == commands.StatusCompleted
		}, "the keyed create completed and answered again")
		if ops := h.operations(); len(ops) != 1 || ops[0].ID != id {
			t.Fatalf("recorded %d operations, want only %s", len(ops), id)
		}
		if n := h.sim.Stats().Calls["createVolume"]; n != 2 {
			t.Fatalf("createVolume called %d times, want the test's own and the keyed create's", n)
		}
	})
}

// TestCreateUnknownZoneOrOffering: a create naming a zone or disk offering
// CloudStack does not list is 422 CLOUDSTACK_ERROR at once, with
// CloudStack's code and text, and nothing recorded. When CloudStack is too
// slow to tell within the check budget, the create is accepted.
func TestCreateUnknownZoneOrOffering(t *testing.T) {
	const unknown = "0e0e0e0e-1111-4222-8333-444455556666"
	h := newHarness(t, harnessOpts{cfg: handlers.Config{CheckTimeout: 500 * time.Millisecond}})
	for _, tc := range []struct{ param, zone, offering string }{
		{"zoneid", unknown, cloudsim.CustomOfferingID},
		{"diskofferingid", cloudsim.ZoneID, unknown},
	} {
		body := createBody("nowhere")
		body["zone_id"], body["disk_offering_id"] = tc.zone, tc.offering
		a := h.command(commands.SubjectCreate, body, "")
		if a.status != http.StatusUnprocessableEntity || a.err.Code != commands.CodeCloudStackError ||
			a.err.Message != "CloudStack volume creation failed: Invalid parameter "+tc.param ||
			a.err.Details["cloudstack_error_code"] != float64(csapi.CodeParamError) ||
			a.err.Details["cloudstack_message"] != csapi.InvalidParameterText("createVolume", tc.param, unknown) {
			t.Fatalf("create with unknown %s: %d %s", tc.param, a.status, a.body)
		}
	}
	if ops := h.operations(); len(ops) != 0 {
		t.Fatalf("refused creates recorded: %+v", ops)
	}
	if n := h.sim.Stats().Calls["createVolume"]; n != 0 {
		t.Fatalf("createVolume called %d times", n)
	}
	if a := h.command(commands.SubjectCreate, createBody("somewhere"), ""); a.status != http.StatusCreated {
		t.Fatalf("create in a known zone: %d %s", a.status, a.body)
	}
	// CloudStack too slow to list the zones within the budget: accepted.
	h.setFaults(cloudsim.Faults{Latency: map[string]cloudsim.Duration{"listZones": cloudsim.Duration(5 * time.Second)}})
	time.Sleep(1100 * time.Millisecond) // past the miss gap, so the miss asks CloudStack again
	body := createBody("unchecked")
	body["zone_id"] = unknown
	if a := h.command(commands.SubjectCreate, body, ""); a.status != http.StatusCreated || a.elapsed > 2*time.Second {
		t.Fatalf("create with CloudStack slow: %d after %v: %s", a.status, a.elapsed, a.body)
	}
}

// faultyStore is the real store with faults a test cannot produce for
// real: an answer lost after the write, a store silent for a while.
type faultyStore struct {
	state.Store
	mu sync.Mutex
	// lostCreates is how many creates are written but answered
	// ErrUnavailable; failedCreates how many are refused unwritten;
	// failDeletes makes every delete fail.
	lostCreates, failedCreates int
	failDeletes                bool
}

func (f *faultyStore) CreateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error) {
	f.mu.Lock()
	lost, failed := f.lostCreates > 0, f.failedCreates > 0 && f.lostCreates == 0
	if lost {
		f.lostCreates--
	} else if failed {
		f.failedCreates--
	}
	f.mu.Unlock()
	if failed {
		return commands.Operation{}, fmt.Errorf("injected: %w", state.ErrUnavailable)
	}
	rec, err := f.Store.CreateOperation(ctx, op)
	if lost && err == nil {
		return commands.Operation{}, fmt.Errorf("injected lost answer: %w", state.ErrUnavailable)
	}
	return rec, err
}

func (f *faultyStore) DeleteOperation(ctx context.Context, id string, rev uint64) error {
	f.mu.Lock()
	fail := f.failDeletes
	f.mu.Unlock()
	if fail {
		return fmt.Errorf("injected: %w", state.ErrUnavailable)
	}
	return f.Store.DeleteOperation(ctx, id, rev)
}

// TestAmbiguousWrite: a create whose answer is lost is resolved by asking
// the store, never guessed: written once and answered 201 (and run), or,
// when the store stays silent past the budget, answered 503 and the record
// removed before anything runs it.
func TestAmbiguousWrite(t *testing.T) {
	for _, tc := range []struct {
		name         string
		lost, failed int
		want         int
	}{
		{"answer lost once", 1, 0, http.StatusCreated},
		{"refused once", 0, 1, http.StatusCreated},
		{"answer lost, then refused", 1, 2, http.StatusCreated},
		{"silent past the budget", 1, 1 << 30, http.StatusServiceUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			faulty := &faultyStore{lostCreates: tc.lost, failedCreates: tc.failed}
			h := newHarness(t, harnessOpts{wrap: func(s state.Store) state.Store { faulty.Store = s; return faulty }})
			key := "ambiguous-" + strings.ReplaceAll(tc.name, " ", "-")
			a := h.command(commands.SubjectCreate, createBody("ambiguous"), key)
			id := handlers.OperationIDForKey(key)
			if a.status != tc.want || a.elapsed >= commands.AcceptTimeout {
				t.Fatalf("answer %d after %v, want %d: %s", a.status, a.elapsed, tc.want, a.body)
			}
			if tc.want == http.StatusServiceUnavailable {
				testenv.Eventually(t, 10*time.Second, func() bool { return !h.recorded(id) },
					"the record of a create answered 503 removed")
				if n := h.sim.Stats().Calls["createVolume"]; n != 0 {
					t.Fatalf("a create answered 503 reached CloudStack %d times", n)
				}
				return
			}
			if a.op.ID != id || len(h.operations()) != 1 {
				t.Fatalf("201 with %s; %d operations recorded", a.op.ID, len(h.operations()))
			}
			testenv.Eventually(t, 30*time.Second, func() bool {
				op, err := h.store.GetOperation(context.Background(), id)
				return err == nil && op.Status == commands.StatusCompleted
			}, "the accepted create completed")
		})
	}
}

// TestQueueUnavailable: a job that cannot be queued undoes the record and
// answers 503 (its events end cancelled); if the undo fails too, the
// record stands and the answer is 201.
func TestQueueUnavailable(t *testing.T) {
	for _, undoFails := range []bool{false, true} {
		t.Run(fmt.Sprintf("undo fails %v", undoFails), func(t *testing.T) {
			faulty := &faultyStore{failDeletes: undoFails}
			h := newHarness(t, harnessOpts{wrap: func(s state.Store) state.Store { faulty.Store = s; return faulty }})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := h.bus.JetStream().DeleteStream(ctx, bus.StreamJobs); err != nil {
				t.Fatal(err)
			}
			key := fmt.Sprintf("unqueued-%v", undoFails)
			id := handlers.OperationIDForKey(key)
			events, err := h.nc.SubscribeSync(commands.OpSubject(id))
			if err != nil {
				t.Fatal(err)
			}
			a := h.command(commands.SubjectCreate, createBody("unqueued"), key)
			if undoFails {
				if a.status != http.StatusCreated || a.op.ID != id || !h.recorded(id) {
					t.Fatalf("undo failed: %d %s, recorded %v; want 201 with the record standing", a.status, a.body, h.recorded(id))
				}
				return
			}
			if a.status != http.StatusServiceUnavailable || a.header.Get(commands.RetryAfterHeader) != "1" || h.recorded(id) {
				t.Fatalf("queue gone: %d %s headers %v, recorded %v", a.status, a.body, a.header, h.recorded(id))
			}
			var statuses []commands.OpStatus
			for len(statuses) < 2 {
				m, err := events.NextMsg(5 * time.Second)
				if err != nil {
					t.Fatalf("events %v: %v", statuses, err)
				}
				var op commands.Operation
				_ = json.Unmarshal(m.Data, &op)
				statuses = append(statuses, op.Status)
			}
			if statuses[0] != commands.StatusPending || statuses[1] != commands.StatusCancelled {
				t.Fatalf("events of the undone operation: %v", statuses)
			}
		})
	}
}

// TestCloseDuringAccept: a command being accepted when the service stops
// still gets the answer of what was recorded.
func TestCloseDuringAccept(t *testing.T) {
	h := newHarness(t, harnessOpts{cfg: handlers.Config{CheckTimeout: time.Second}})
	vol := h.createVolume("closing")
	h.setFaults(cloudsim.Faults{Latency: map[string]cloudsim.Duration{"listVolumes": cloudsim.Duration(5 * time.Second)}})
	done := make(chan answer, 1)
	go func() { done <- h.command(commands.SubjectDetach, map[string]string{"volume_id": vol}, "closing") }()
	testenv.Eventually(t, 5*time.Second, func() bool { return h.inflight() == 1 }, "the detach being accepted")
	if err := h.svc.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	a := <-done
	if a.status != http.StatusCreated || a.op.ID != handlers.OperationIDForKey("closing") || !h.recorded(a.op.ID) {
		t.Fatalf("answer while stopping: %d %s, recorded %v", a.status, a.body, h.recorded(a.op.ID))
	}
}

// losingJS answers the first job publish as if JetStream kept it, and
// drops it: the instance that recorded the operation died before its job
// reached the queue.
type losingJS struct {
	jetstream.JetStream
	lost atomic.Bool
}

func (l *losingJS) Publish(ctx context.Context, subject string, data []byte, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if strings.HasPrefix(subject, bus.JobsSubjectPrefix) && l.lost.CompareAndSwap(false, true) {
		return &jetstream.PubAck{Stream: bus.StreamJobs}, nil
	}
	return l.JetStream.Publish(ctx, subject, data, opts...)
}

// TestRetriedKeyQueuesMissingJob: a client that retries with its
// Idempotency-Key an operation recorded without a job (lost with the
// instance that recorded it) gets it queued at once, not at the next
// sweep: it runs, once.
func TestRetriedKeyQueuesMissingJob(t *testing.T) {
	js := &losingJS{}
	h := newHarness(t, harnessOpts{wrapJS: func(j jetstream.JetStream) jetstream.JetStream { js.JetStream = j; return js }})
	const key = "retried/create"
	body := createBody("retried")
	first := h.command(commands.SubjectCreate, body, key)
	if first.status != http.StatusCreated || !js.lost.Load() {
		t.Fatalf("first answer %d %s, job lost %v", first.status, first.body, js.lost.Load())
	}
	// Nothing would run it before the next sweep, 4 × the 15 s ack-wait
	// away: within the 20 s below, only the retry can have queued it.
	again := h.command(commands.SubjectCreate, body, key)
	if again.status != http.StatusCreated || again.op.ID != first.op.ID {
		t.Fatalf("retry: %d %s", again.status, again.body)
	}
	testenv.Eventually(t, 20*time.Second, func() bool {
		op, err := h.store.GetOperation(context.Background(), first.op.ID)
		return err == nil && op.Status == commands.StatusCompleted
	}, "the retried operation ran")
	if n := h.sim.Stats().Calls["createVolume"]; n != 1 {
		t.Fatalf("createVolume called %d times, want 1", n)
	}
}

// TestIdempotencyKeyHeaderCase: on NATS the Idempotency-Key header is
// read whatever the case of its name, as on REST, so a retry sent with
// "idempotency-key" answers the first operation; two spellings with
// different values are 400 and record nothing.
func TestIdempotencyKeyHeaderCase(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	send := func(header nats.Header) answer {
		msg := nats.NewMsg(commands.SubjectCreate)
		msg.Data, _ = json.Marshal(createBody("case"))
		msg.Header = header
		ctx, cancel := context.WithTimeout(context.Background(), commands.AcceptTimeout+5*time.Second)
		defer cancel()
		reply, err := h.nc.RequestMsgWithContext(ctx, msg)
		if err != nil {
			t.Fatalf("request: %v", err)
		}
		a := answer{header: reply.Header, body: reply.Data}
		if a.status, err = strconv.Atoi(reply.Header.Get(commands.StatusHeader)); err != nil {
			t.Fatalf("reply without a Status header: %v", reply.Header)
		}
		a.decode(t, msg.Subject)
		return a
	}
	const key = "retry-7"
	id := handlers.OperationIDForKey(key)
	for _, name := range []string{"idempotency-key", "IDEMPOTENCY-KEY", commands.IdempotencyKeyHeader} {
		if a := send(nats.Header{name: {key}}); a.status != http.StatusCreated || a.op.ID != id {
			t.Fatalf("create with header %q: %d %s, want 201 with %s", name, a.status, a.body, id)
		}
	}
	a := send(nats.Header{"idempotency-key": {"one"}, commands.IdempotencyKeyHeader: {"two"}})
	if a.status != http.StatusBadRequest || a.err.Details["field"] != commands.IdempotencyKeyHeader {
		t.Fatalf("two keys: %d %s, want 400 naming %s", a.status, a.body, commands.IdempotencyKeyHeader)
	}
	if ops := h.operations(); len(ops) != 1 || ops[0].ID != id {
		t.Fatalf("recorded %d operations, want only %s", len(ops), id)
	}
}
