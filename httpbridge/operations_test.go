package httpbridge_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/apitest"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// Operation ids seeded by TestOperations, oldest first.
const (
	opCreate   = "op-a1b2c3d4-e5f6-4890-abcd-ef1234567890"
	opAttach   = "op-b2c3d4e5-f6a7-4901-bcde-f12345678901"
	opDetach   = "op-c3d4e5f6-a7b8-4012-8def-123456789012"
	opFailed   = "op-d4e5f6a7-b8c9-4123-9ef0-234567890123"
	opPending  = "op-e5f6a7b8-c9d0-4234-af01-345678901234"
	opNotThere = "op-f6a7b8c9-d0e1-4345-b012-456789012345"
)

func ids(t *testing.T, body []byte) []string {
	t.Helper()
	var out []string
	for _, s := range decodeAs[[]commands.OperationSummary](t, body) {
		out = append(out, s.ID)
	}
	return out
}

func wantIDs(want ...string) func(*testing.T, []byte) {
	return func(t *testing.T, body []byte) {
		if got := ids(t, body); !slices.Equal(got, want) {
			t.Errorf("ids %v, want %v", got, want)
		}
	}
}

func TestOperations(t *testing.T) {
	h := newHarness(t, options{})
	h.seedOperation(t, opCreate, commands.OpCreate, commands.StatusCompleted, vol1, "", 30)
	h.seedOperation(t, opAttach, commands.OpAttach, commands.StatusCompleted, vol1, vm1, 31)
	h.seedOperation(t, opDetach, commands.OpDetach, commands.StatusExecuting, vol1, "", 32)
	h.seedOperation(t, opFailed, commands.OpAttach, commands.StatusFailed, vol2, vm1, 33)
	h.seedOperation(t, opPending, commands.OpDelete, commands.StatusPending, vol2, "", 34)

	runCases(t, h, []endpointCase{
		{name: "get", method: "GET", path: "/operations/" + opAttach, status: 200, check: func(t *testing.T, body []byte) {
			op := decodeAs[commands.Operation](t, body)
			if op.ID != opAttach || op.Status != commands.StatusCompleted || op.CompletedAt == nil || ptr(op.VMID) != vm1 {
				t.Errorf("operation %s", body)
			}
		}},
		{name: "get bare uuid", method: "GET", path: "/operations/" + opAttach[3:], status: 200, check: func(t *testing.T, body []byte) {
			if op := decodeAs[commands.Operation](t, body); op.ID != opAttach {
				t.Errorf("operation %s", body)
			}
		}},
		{name: "get terminal with wait answers at once", method: "GET", path: "/operations/" + opFailed + "?wait=5m", status: 200,
			check: func(t *testing.T, body []byte) {
				if op := decodeAs[commands.Operation](t, body); op.Status != commands.StatusFailed {
					t.Errorf("operation %s", body)
				}
			}},
		{name: "get unknown", method: "GET", path: "/operations/" + opNotThere, status: 404, code: commands.CodeNotFound},
		{name: "get unknown with wait", method: "GET", path: "/operations/" + opNotThere + "?wait=1m", status: 404, code: commands.CodeNotFound},
		{name: "get malformed id", method: "GET", path: "/operations/op-123", status: 400, code: commands.CodeInvalidRequest, field: "operation_id"},
		{name: "get bad wait", method: "GET", path: "/operations/" + opAttach + "?wait=soon", status: 400, code: commands.CodeInvalidRequest, field: "wait"},
		{name: "get negative wait", method: "GET", path: "/operations/" + opAttach + "?wait=-1s", status: 400, code: commands.CodeInvalidRequest, field: "wait"},
		{name: "get bare-number wait", method: "GET", path: "/operations/" + opAttach + "?wait=30", status: 400, code: commands.CodeInvalidRequest, field: "wait"},
		{name: "list all newest first", method: "GET", path: "/operations", status: 200,
			check: wantIDs(opPending, opFailed, opDetach, opAttach, opCreate)},
		{name: "list type", method: "GET", path: "/operations?type=attach", status: 200, check: wantIDs(opFailed, opAttach)},
		{name: "list status", method: "GET", path: "/operations?status=completed", status: 200, check: wantIDs(opAttach, opCreate)},
		{name: "list type and status", method: "GET", path: "/operations?type=attach&status=pending", status: 200, check: wantIDs()},
		{name: "list volume prefixed", method: "GET", path: "/operations?volume_id=vol-" + vol2, status: 200, check: wantIDs(opPending, opFailed)},
		{name: "list vm", method: "GET", path: "/operations?vm_id=vm-" + vm1, status: 200, check: wantIDs(opFailed, opAttach)},
		{name: "list limit", method: "GET", path: "/operations?limit=2", status: 200, check: wantIDs(opPending, opFailed)},
		{name: "list none is []", method: "GET", path: "/operations?volume_id=" + volUnknown, status: 200, check: func(t *testing.T, body []byte) {
			if string(body) != "[]" {
				t.Errorf("body %s, want []", body)
			}
		}},
		{name: "list unknown type", method: "GET", path: "/operations?type=frobnicate", status: 400, code: commands.CodeInvalidRequest, field: "type"},
		{name: "list unknown status", method: "GET", path: "/operations?status=done", status: 400, code: commands.CodeInvalidRequest, field: "status"},
		{name: "list long unknown type is cut in the answer", method: "GET", path: "/operations?type=" + strings.Repeat("x", 5000), status: 400,
			code: commands.CodeInvalidRequest, field: "type", check: func(t *testing.T, body []byte) {
				if len(body) > 1000 {
					t.Errorf("a 5000-byte type echoed in a %d-byte answer: %.200s…", len(body), body)
				}
			}},
		{name: "list malformed volume", method: "GET", path: "/operations?volume_id=abc", status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "list malformed vm", method: "GET", path: "/operations?vm_id=abc", status: 400, code: commands.CodeInvalidRequest, field: "vm_id"},
		{name: "list zero limit", method: "GET", path: "/operations?limit=0", status: 400, code: commands.CodeInvalidRequest, field: "limit"},
		{name: "list negative limit", method: "GET", path: "/operations?limit=-3", status: 400, code: commands.CodeInvalidRequest, field: "limit"},
		{name: "list non-integer limit", method: "GET", path: "/operations?limit=2.5", status: 400, code: commands.CodeInvalidRequest, field: "limit"},
		{name: "list limit at the cap", method: "GET", path: "/operations?limit=1000", status: 200},
		{name: "list limit over the cap", method: "GET", path: "/operations?limit=1001", status: 400, code: commands.CodeInvalidRequest, field: "limit"},
		{name: "list limit overflowing int", method: "GET", path: "/operations?limit=99999999999999999999", status: 400, code: commands.CodeInvalidRequest, field: "limit"},
		{name: "list empty limit", method: "GET", path: "/operations?limit=", status: 400, code: commands.CodeInvalidRequest, field: "limit"},
	})
}

// waitResult is the outcome of one long poll.
type waitResult struct {
	resp *http.Response
	body []byte
	took time.Duration
}

// longPoll asks for an operation with ?wait in the background; its
// answer, checked against the API document, comes on the channel.
func longPoll(t *testing.T, h *harness, id, wait string) <-chan waitResult {
	t.Helper()
	done := make(chan waitResult, 1)
	req := apitest.NewRequest(t, "GET", h.base+"/operations/"+id+"?wait="+wait, "")
	go func() {
		start := time.Now()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			done <- waitResult{}
			return
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		h.v.Check(t, req, resp, json.RawMessage(raw))
		done <- waitResult{resp: resp, body: raw, took: time.Since(start)}
	}()
	return done
}

// startWait long-polls an operation in the background on its own
// connection-counting bridge and returns once the bridge has subscribed
// to the operation's events.
func startWait(t *testing.T, h *harness, bridgeConn *nats.Conn, id, wait string) <-chan waitResult {
	t.Helper()
	before := bridgeConn.NumSubscriptions()
	done := longPoll(t, h, id, wait)
	testenv.Eventually(t, 10*time.Second, func() bool { return bridgeConn.NumSubscriptions() > before },
		"bridge subscribed to %s", commands.OpSubject(id))
	return done
}

// publishUntil publishes an operation event every 20 ms until the long
// poll answers (an event sent before the bridge's subscription reached
// the server is lost, as on a real bus), and returns the answer.
func publishUntil(t *testing.T, nc *nats.Conn, op commands.Operation, done <-chan waitResult) waitResult {
	t.Helper()
	data, _ := json.Marshal(op)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(30 * time.Second)
	for {
		if err := nc.Publish(commands.OpSubject(op.ID), data); err != nil {
			t.Fatalf("publish: %v", err)
		}
		select {
		case r := <-done:
			return r
		case <-tick.C:
		case <-timeout:
			t.Fatalf("long poll of %s did not answer after a terminal event", op.ID)
		}
	}
}

// eventsOnly is a store that does not tell of ends in process (as Redis):
// a wait follows the operation events.
type eventsOnly struct{ state.Store }

// newKV is a KV store on b's default bucket.
func newKV(t *testing.T, b *bus.Bus) *state.KV {
	t.Helper()
	kv, err := state.NewKV(context.Background(), b.JetStream(), state.KVConfig{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("kv store: %v", err)
	}
	t.Cleanup(func() { _ = kv.Close(context.Background()) })
	return kv
}

// TestOperationWait: with a store that does not tell of ends, a wait
// follows the operation's events and answers the store's record.
func TestOperationWait(t *testing.T) {
	b := testenv.StartBus(t)
	bridgeConn := testenv.Connect(t, b, bus.RoleDaemon, nats.Name("bridge-under-test"))
	h := newHarnessOnBus(t, b, options{conn: bridgeConn, store: eventsOnly{newKV(t, b)}})

	t.Run("terminal event ends the wait with the stored record", func(t *testing.T) {
		op := h.seedOperation(t, opPending, commands.OpDelete, commands.StatusPending, vol2, "", 34)
		done := startWait(t, h, bridgeConn, op.ID, "5m")
		op.Status, op.Error = commands.StatusFailed, "CloudStack refused"
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := h.store.UpdateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
		r := publishUntil(t, h.bus, op, done)
		if got := decodeAs[commands.Operation](t, r.body); r.resp.StatusCode != 200 || got.Status != commands.StatusFailed || got.Error != op.Error {
			t.Errorf("answer %d %s", r.resp.StatusCode, r.body)
		}
	})
	t.Run("the answer is the store's record, not the event", func(t *testing.T) {
		op := h.seedOperation(t, opDetach, commands.OpDetach, commands.StatusPending, vol1, "", 32)
		done := startWait(t, h, bridgeConn, op.ID, "5m")
		event := op
		event.Status = commands.StatusCompleted
		r := publishUntil(t, h.bus, event, done)
		if got := decodeAs[commands.Operation](t, r.body); got.Status != commands.StatusPending {
			t.Errorf("answer %s, want the stored pending record", r.body)
		}
	})
	t.Run("non-terminal events wait until the deadline", func(t *testing.T) {
		op := h.seedOperation(t, opAttach, commands.OpAttach, commands.StatusExecuting, vol1, vm1, 31)
		const wait = 300 * time.Millisecond
		done := startWait(t, h, bridgeConn, op.ID, wait.String())
		data, _ := json.Marshal(op)
		if err := h.bus.Publish(commands.OpSubject(op.ID), data); err != nil {
			t.Fatal(err)
		}
		r := <-done
		if r.resp == nil {
			t.Fatal("long poll failed")
		}
		if got := decodeAs[commands.Operation](t, r.body); r.resp.StatusCode != 200 || got.Status != commands.StatusExecuting {
			t.Errorf("answer %d %s", r.resp.StatusCode, r.body)
		}
		if r.took < wait {
			t.Errorf("answered after %v, before the %v wait ended", r.took, wait)
		}
	})
	t.Run("a consumer's copy of a terminal event does not end the wait", func(t *testing.T) {
		const id = "op-07a8b9c0-d1e2-4456-8c23-567890123456"
		op := h.seedOperation(t, id, commands.OpDetach, commands.StatusPending, vol2, "", 29)
		op.Status, op.Error = commands.StatusFailed, "CloudStack refused"
		// A push consumer of another stream delivers the terminal event
		// onto the operation's subject: its reply is an ack subject. The
		// stream and its copy are made before the wait starts, so that
		// only the consumer's delivery has to fit in the wait, also on a
		// loaded machine.
		js, err := h.bus.JetStream()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.AddStream(&nats.StreamConfig{Name: "REPLAY", Subjects: []string{"replay.>"}}); err != nil {
			t.Fatal(err)
		}
		data, _ := json.Marshal(op)
		if _, err := js.Publish("replay."+op.ID, data); err != nil {
			t.Fatal(err)
		}
		const wait = 5 * time.Second
		start := time.Now()
		done := startWait(t, h, bridgeConn, op.ID, wait.String())
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := h.store.UpdateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
		if _, err := js.AddConsumer("REPLAY", &nats.ConsumerConfig{Durable: "replay", DeliverSubject: commands.OpSubject(op.ID),
			AckPolicy: nats.AckExplicitPolicy}); err != nil {
			t.Fatal(err)
		}
		testenv.Eventually(t, 30*time.Second, func() bool {
			ci, err := js.ConsumerInfo("REPLAY", "replay")
			return err == nil && ci.Delivered.Consumer >= 1
		}, "the consumer delivered its copy onto %s", commands.OpSubject(op.ID))
		if time.Since(start) >= wait {
			t.Fatalf("the copy was delivered after the %v wait ended: nothing tested", wait)
		}
		r := <-done
		if r.resp == nil || r.resp.StatusCode != 200 {
			t.Fatalf("long poll failed: %+v", r)
		}
		if r.took < wait {
			t.Errorf("answered after %v, before the %v wait ended: the consumer's copy woke it", r.took, wait)
		}
	})
	t.Run("close answers pending waits", func(t *testing.T) {
		op := h.seedOperation(t, opCreate, commands.OpCreate, commands.StatusPending, "", "", 30)
		done := startWait(t, h, bridgeConn, op.ID, "5m")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := h.srv.Close(ctx); err != nil {
			t.Fatalf("close: %v", err)
		}
		r := <-done
		if r.resp == nil || r.resp.StatusCode != 200 || decodeAs[commands.Operation](t, r.body).Status != commands.StatusPending {
			t.Errorf("answer %+v", r)
		}
		if err := h.srv.Close(ctx); err != nil {
			t.Errorf("second close: %v", err)
		}
	})
}

// readSignal is the embedded store with a signal after each read of an
// operation, so that a test knows a wait has read the record and waits.
type readSignal struct {
	*state.KV
	reads chan string
}

func (s *readSignal) GetOperation(ctx context.Context, id string) (commands.Operation, error) {
	op, err := s.KV.GetOperation(ctx, id)
	s.reads <- id
	return op, err
}

// startStoreWait long-polls an operation in the background and returns
// once the bridge has read it (and so waits for its end).
func startStoreWait(t *testing.T, h *harness, s *readSignal, id, wait string) <-chan waitResult {
	t.Helper()
	done := longPoll(t, h, id, wait)
	select {
	case got := <-s.reads:
		if got != id {
			t.Fatalf("read %s, want %s", got, id)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the wait of %s did not read it", id)
	}
	return done
}

// answer is a long poll's answer, or a failure after 30 s (the waits
// are of minutes: an answer shows what ended it).
func answer(t *testing.T, done <-chan waitResult) waitResult {
	t.Helper()
	select {
	case r := <-done:
		if r.resp == nil {
			t.Fatal("long poll failed")
		}
		return r
	case <-time.After(30 * time.Second):
		t.Fatal("the long poll did not answer")
	}
	return waitResult{}
}

// TestOperationWaitInStore: with the embedded store, a wait ends when the
// store sees the operation end, with no event: written by this process,
// it answers the record as written (what a read answers); by another, or
// deleted, it reads the store. An event alone ends nothing.
func TestOperationWaitInStore(t *testing.T) {
	b := testenv.StartBus(t)
	s := &readSignal{KV: newKV(t, b), reads: make(chan string, 16)}
	h := newHarnessOnBus(t, b, options{store: s})
	other := newKV(t, b) // another process sharing the bucket
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	end := func(t *testing.T, store state.Store, op commands.Operation, status commands.OpStatus) {
		t.Helper()
		now := time.Now().UTC()
		op.Status, op.UpdatedAt, op.CompletedAt, op.Error = status, now, &now, "CloudStack refused"
		if _, err := store.UpdateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("an end this process wrote", func(t *testing.T) {
		// The watcher's delivery of the write may reach the index before
		// the writer does (a loaded machine): the end is then another's
		// to the store, and read again, which answers the same. Of a few
		// ends, one at least must be answered as written.
		const tries = 5
		for i := range tries {
			op := h.seedOperation(t, fmt.Sprintf("op-e5f6a7b8-c9d0-4234-af01-3456789012%02d", 40+i), commands.OpDelete,
				commands.StatusPending, vol2, "", 34)
			done := startStoreWait(t, h, s, op.ID, "5m")
			end(t, s.KV, op, commands.StatusFailed)
			r := answer(t, done)
			if r.resp.StatusCode != 200 || decodeAs[commands.Operation](t, r.body).Status != commands.StatusFailed {
				t.Fatalf("answer %d %s", r.resp.StatusCode, r.body)
			}
			again := false
			select {
			case <-s.reads:
				again = true
			default:
			}
			resp, body := h.do(t, "GET", "/operations/"+op.ID, "")
			<-s.reads
			if resp.StatusCode != 200 || string(body) != string(r.body) {
				t.Fatalf("wait answered %s, a read %d %s", r.body, resp.StatusCode, body)
			}
			if !again {
				return
			}
		}
		t.Errorf("each of %d ends this process wrote was read again: the end as written is the answer", tries)
	})
	t.Run("an end another process wrote", func(t *testing.T) {
		op := h.seedOperation(t, opDetach, commands.OpDetach, commands.StatusPending, vol1, "", 32)
		done := startStoreWait(t, h, s, op.ID, "5m")
		end(t, other, op, commands.StatusCancelled)
		r := answer(t, done)
		if r.resp.StatusCode != 200 || decodeAs[commands.Operation](t, r.body).Status != commands.StatusCancelled {
			t.Fatalf("answer %d %s", r.resp.StatusCode, r.body)
		}
		if id := <-s.reads; id != op.ID {
			t.Errorf("read %s, want %s read again", id, op.ID)
		}
	})
	t.Run("a delete", func(t *testing.T) {
		op := h.seedOperation(t, opAttach, commands.OpAttach, commands.StatusPending, vol1, vm1, 31)
		done := startStoreWait(t, h, s, op.ID, "5m")
		if err := other.DeleteOperation(ctx, op.ID, op.Revision); err != nil {
			t.Fatal(err)
		}
		r := answer(t, done)
		<-s.reads
		if r.resp.StatusCode != 404 {
			t.Errorf("answer %d %s, want 404", r.resp.StatusCode, r.body)
		}
	})
	t.Run("a terminal event alone", func(t *testing.T) {
		op := h.seedOperation(t, opCreate, commands.OpCreate, commands.StatusPending, "", "", 30)
		const wait = 300 * time.Millisecond
		done := startStoreWait(t, h, s, op.ID, wait.String())
		event := op
		event.Status = commands.StatusCompleted
		data, _ := json.Marshal(event)
		if err := h.bus.Publish(commands.OpSubject(op.ID), data); err != nil {
			t.Fatal(err)
		}
		r := answer(t, done)
		<-s.reads
		if got := decodeAs[commands.Operation](t, r.body); r.resp.StatusCode != 200 || got.Status != commands.StatusPending {
			t.Errorf("answer %d %s, want the stored pending record", r.resp.StatusCode, r.body)
		}
		if r.took < wait {
			t.Errorf("answered after %v, before the %v wait ended", r.took, wait)
		}
	})
	t.Run("close answers pending waits", func(t *testing.T) {
		const id = "op-07a8b9c0-d1e2-4456-8c23-567890123456"
		h.seedOperation(t, id, commands.OpDetach, commands.StatusPending, vol2, "", 29)
		done := startStoreWait(t, h, s, id, "5m")
		if err := h.srv.Close(ctx); err != nil {
			t.Fatalf("close: %v", err)
		}
		r := answer(t, done)
		<-s.reads
		if r.resp.StatusCode != 200 || decodeAs[commands.Operation](t, r.body).Status != commands.StatusPending {
			t.Errorf("answer %d %s", r.resp.StatusCode, r.body)
		}
	})
}

// TestMaxWaitCaps checks ?wait is capped at MaxWait: a 1h wait on a
// bridge with a 200 ms cap answers the pending record.
func TestMaxWaitCaps(t *testing.T) {
	h := newHarness(t, options{maxWait: 200 * time.Millisecond})
	op := h.seedOperation(t, opPending, commands.OpDelete, commands.StatusPending, vol2, "", 34)
	resp, body := h.do(t, "GET", "/operations/"+op.ID+"?wait=1h", "")
	if resp.StatusCode != 200 || decodeAs[commands.Operation](t, body).Status != commands.StatusPending {
		t.Errorf("answer %d %s", resp.StatusCode, body)
	}
}
