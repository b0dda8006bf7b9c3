package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
	"github.com/volumed/volumed/test/simtest"
)

// opLines is the type of lineKind's operations.
const opLines commands.OpType = "test_lines"

// lineKind is a kind whose operations touch nothing: each records when
// it starts and ends, and waits, when its request names a gate, until the
// test opens it.
type lineKind struct {
	mu     sync.Mutex
	events []lineEvent
	gates  map[string]chan struct{}
}

// lineEvent is the start or end of an operation.
type lineEvent struct {
	opID  string
	start bool
}

// lineRequest is lineKind's request.
type lineRequest struct {
	Gate string `json:"gate,omitempty"`
}

var _ engine.Kind = (*lineKind)(nil)

func (k *lineKind) Type() commands.OpType { return opLines }

func (k *lineKind) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req lineRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	k.record(j.Op.ID, true)
	if gate := k.gate(req.Gate); gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, engine.ErrStopped
		}
	} else {
		time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond) // widens the interleavings
	}
	k.record(j.Op.ID, false)
	return &commands.OpResponse{Message: "done"}, nil
}

func (k *lineKind) record(opID string, start bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.events = append(k.events, lineEvent{opID, start})
}

// gate returns the gate named name, made on first use; nil for "".
func (k *lineKind) gate(name string) chan struct{} {
	if name == "" {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.gates == nil {
		k.gates = map[string]chan struct{}{}
	}
	if k.gates[name] == nil {
		k.gates[name] = make(chan struct{})
	}
	return k.gates[name]
}

// started reports whether opID has started.
func (k *lineKind) started(opID string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Contains(k.events, lineEvent{opID, true})
}

// checkLine fails t unless the operations of ids (in acceptance order) ran
// one at a time in that order: each started after the one before ended.
func (k *lineKind) checkLine(t *testing.T, line string, ids []string) {
	t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	var got []lineEvent
	for _, e := range k.events {
		if slices.Contains(ids, e.opID) {
			got = append(got, e)
		}
	}
	var want []lineEvent
	for _, id := range ids {
		want = append(want, lineEvent{id, true}, lineEvent{id, false})
	}
	if !slices.Equal(got, want) {
		t.Errorf("line %s: ran %v, want %v (one at a time, in acceptance order)", line, got, want)
	}
}

// seqRecorder is the service's JetStream, recording the stream sequence
// each operation's job was stored at (the last of its batch, for an
// operation on several lines): the order of acceptance on the queue.
type seqRecorder struct {
	jetstream.JetStream
	mu  sync.Mutex
	seq map[string]uint64
}

func (r *seqRecorder) Publish(ctx context.Context, subject string, data []byte, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	ack, err := r.JetStream.Publish(ctx, subject, data, opts...)
	r.note(subject, ack)
	return ack, err
}

func (r *seqRecorder) PublishMsg(ctx context.Context, msg *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	ack, err := r.JetStream.PublishMsg(ctx, msg, opts...)
	r.note(msg.Subject, ack)
	return ack, err
}

func (r *seqRecorder) note(subject string, ack *jetstream.PubAck) {
	if ack == nil || ack.Duplicate {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq[subject[strings.LastIndex(subject, ".")+1:]] = ack.Sequence
}

// inOrder returns ids sorted by the sequence of their jobs.
func (r *seqRecorder) inOrder(t *testing.T, ids []string) []string {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range ids {
		if r.seq[id] == 0 {
			t.Fatalf("no job recorded for %s", id)
		}
	}
	sorted := slices.Clone(ids)
	slices.SortFunc(sorted, func(a, b string) int { return int(r.seq[a]) - int(r.seq[b]) })
	return sorted
}

// lineService is a running Service on a real embedded bus and KV store
// and the simulator, whose engine runs lineKind only.
type lineService struct {
	*Service
	kind *lineKind
	seqs *seqRecorder
	bus  *bus.Bus
}

func newLineService(t *testing.T) *lineService {
	t.Helper()
	ctx := context.Background()
	b := testenv.StartBus(t)
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	store, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close(context.Background()) })
	sim := simtest.Start(t, cloudsim.Config{LocalDevices: cloudsim.LocalDevicesOff})
	seqs := &seqRecorder{JetStream: b.JetStream(), seq: map[string]uint64{}}
	s := New(Config{Conn: b.Conn(), JetStream: seqs, Store: store, Logger: log, SyncInterval: -1,
		CloudStack: csapi.New(csapi.Config{URL: sim.URL(), APIKey: sim.APIKey(), SecretKey: sim.SecretKey()})})
	k := &lineKind{}
	s.engine = engine.New(engine.Config{Operations: store, Publisher: s, Guard: s.guard, Logger: s.log,
		Timing: engine.Timing{StepTimeout: time.Minute, Retry: backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}}}, k)
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	return &lineService{Service: s, kind: k, seqs: seqs, bus: b}
}

// acceptLines accepts an operation of lineKind on volumes (the first its
// own) and returns its id.
func (s *lineService) acceptLines(t *testing.T, gate string, volumes ...string) string {
	t.Helper()
	cmd := engine.Command{VolumeID: volumes[0], Request: lineRequest{Gate: gate}}
	if len(volumes) > 1 {
		cmd.VolumeIDs = volumes
	}
	ctx, cancel := context.WithTimeout(context.Background(), commands.AcceptTimeout)
	defer cancel()
	got, err := s.accept(ctx, "", opLines, cmd)
	if err != nil {
		t.Errorf("accept on %v: %v", volumes, err)
		return ""
	}
	var op commands.Operation
	if err := json.Unmarshal(got.(json.RawMessage), &op); err != nil {
		t.Fatal(err)
	}
	return op.ID
}

// waitEnded polls until every operation of ids is terminal.
func (s *lineService) waitEnded(t *testing.T, ids ...string) {
	t.Helper()
	within(t, 3*time.Minute, func() error {
		for _, id := range ids {
			op, err := s.cfg.Store.GetOperation(context.Background(), id)
			if err != nil {
				return err
			}
			if !op.Status.Terminal() {
				return fmt.Errorf("operation %s is %s (a deadlock?)", id, op.Status)
			}
		}
		return nil
	})
}

// waitLooked polls until the consumer has handed out every job and sent
// at least n back (not their turn), so what must wait was looked at.
func (s *lineService) waitLooked(t *testing.T, n int) {
	t.Helper()
	within(t, time.Minute, func() error {
		info, err := s.bus.JetStream().Consumer(context.Background(), bus.StreamJobs, ConsumerName)
		if err != nil {
			return err
		}
		ci := info.CachedInfo()
		if ci.NumPending > 0 || ci.NumRedelivered < n {
			return fmt.Errorf("%d jobs not handed out, %d sent back, want %d", ci.NumPending, ci.NumRedelivered, n)
		}
		return nil
	})
}

// TestLinesOrder: an operation on volumes A and B runs after what was
// accepted before it on either, and what is accepted after it on either
// (a single-volume operation on B, whose line is otherwise free) runs
// after it; its holds are gone from the queue when its job is.
func TestLinesOrder(t *testing.T) {
	s := newLineService(t)
	first := s.acceptLines(t, "first", "vol-a")
	within(t, time.Minute, func() error {
		if !s.kind.started(first) {
			return errors.New("the first operation on A has not started")
		}
		return nil
	})
	multi := s.acceptLines(t, "", "vol-a", "vol-b")
	afterA := s.acceptLines(t, "", "vol-a")
	afterB := s.acceptLines(t, "", "vol-b")
	// The operation on A and B, its hold on B, and those after it on A and
	// on B were each handed out and sent back at least once: what would
	// run out of turn would have run at its first delivery.
	s.waitLooked(t, 4)
	for _, id := range []string{multi, afterA, afterB} {
		if s.kind.started(id) {
			t.Errorf("operation %s started while the first on A runs", id)
		}
	}
	close(s.kind.gate("first"))
	s.waitEnded(t, first, multi, afterA, afterB)
	s.kind.checkLine(t, "A", []string{first, multi, afterA})
	s.kind.checkLine(t, "B", []string{multi, afterB})
	s.checkQueueEmpty(t)
}

// TestLinesSingleWaits: a single-volume operation on B sent while an
// operation on A and B runs waits for it to end.
func TestLinesSingleWaits(t *testing.T) {
	s := newLineService(t)
	multi := s.acceptLines(t, "multi", "vol-a", "vol-b")
	within(t, time.Minute, func() error {
		if !s.kind.started(multi) {
			return errors.New("the operation on A and B has not started")
		}
		return nil
	})
	single := s.acceptLines(t, "", "vol-b")
	s.waitLooked(t, 2) // the hold on B and the single one, sent back
	if s.kind.started(single) {
		t.Errorf("the operation on B started while the one on A and B runs")
	}
	close(s.kind.gate("multi"))
	s.waitEnded(t, multi, single)
	s.kind.checkLine(t, "B", []string{multi, single})
	s.checkQueueEmpty(t)
}

// TestLinesDirectGetsOff: another instance turns the job stream's
// direct gets off (it started with more replicas) while this one runs,
// which read the lines with them: the turns read from the leader, and
// the operations run in their order.
func TestLinesDirectGetsOff(t *testing.T) {
	s := newLineService(t)
	ctx := context.Background()
	stream, err := s.bus.JetStream().Stream(ctx, bus.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	cfg := stream.CachedInfo().Config
	if !cfg.AllowDirect || !s.jobs.CachedInfo().Config.AllowDirect {
		t.Fatal("one replica: the job stream's direct gets are off")
	}
	cfg.AllowDirect = false
	if _, err := s.bus.JetStream().UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	multi := s.acceptLines(t, "multi", "vol-a", "vol-b")
	within(t, time.Minute, func() error {
		if !s.kind.started(multi) {
			return errors.New("the operation on A and B has not started")
		}
		return nil
	})
	single := s.acceptLines(t, "", "vol-b")
	s.waitLooked(t, 2)
	if s.kind.started(single) {
		t.Errorf("the operation on B started while the one on A and B runs")
	}
	close(s.kind.gate("multi"))
	s.waitEnded(t, multi, single)
	s.kind.checkLine(t, "B", []string{multi, single})
	s.checkQueueEmpty(t)
}

// TestLinesHoldsRemoved: when an operation on several volumes ends, its
// runner removes its holds before it acks its job: once the job is gone,
// no hold is left on the queue (a hold left behind would keep the next job
// on its line waiting for its redelivery).
func TestLinesHoldsRemoved(t *testing.T) {
	s := newLineService(t)
	multi := s.acceptLines(t, "multi", "vol-a", "vol-b", "vol-c")
	within(t, time.Minute, func() error {
		if !s.kind.started(multi) {
			return errors.New("not started")
		}
		return nil
	})
	for _, line := range []string{"vol-b", "vol-c"} {
		if _, err := s.jobs.GetMsg(context.Background(), 1, jetstream.WithGetMsgSubject(lineSubject(line, multi))); err != nil {
			t.Fatalf("hold on %s while the operation runs: %v", line, err)
		}
	}
	close(s.kind.gate("multi"))
	op := commands.Operation{ID: multi, VolumeID: "vol-a"}
	within(t, time.Minute, func() error {
		if queued, err := s.jobQueued(context.Background(), op); err != nil || queued {
			return fmt.Errorf("job still queued (%v)", err)
		}
		return nil
	})
	for _, line := range []string{"vol-b", "vol-c"} {
		if msg, err := s.jobs.GetMsg(context.Background(), 1, jetstream.WithGetMsgSubject(lineSubject(line, multi))); !errors.Is(err, jetstream.ErrMsgNotFound) {
			t.Errorf("hold on %s left after the job was acked: %v %v", line, msg, err)
		}
	}
}

// TestLinesNoDeadlock: operations on [A, B] and [B, A] and single ones on
// A and on B, accepted concurrently, round after round, all end, and on
// each volume they ran one at a time in the order the queue took them.
func TestLinesNoDeadlock(t *testing.T) {
	s := newLineService(t)
	const rounds = 8
	var mu sync.Mutex
	var onA, onB, all []string
	for range rounds {
		var wg sync.WaitGroup
		for _, volumes := range [][]string{{"vol-a", "vol-b"}, {"vol-b", "vol-a"}, {"vol-a"}, {"vol-b"}} {
			wg.Go(func() {
				id := s.acceptLines(t, "", volumes...)
				mu.Lock()
				defer mu.Unlock()
				all = append(all, id)
				if slices.Contains(volumes, "vol-a") {
					onA = append(onA, id)
				}
				if slices.Contains(volumes, "vol-b") {
					onB = append(onB, id)
				}
			})
		}
		wg.Wait()
	}
	if t.Failed() {
		return
	}
	s.waitEnded(t, all...)
	s.kind.checkLine(t, "A", s.seqs.inOrder(t, onA))
	s.kind.checkLine(t, "B", s.seqs.inOrder(t, onB))
	s.checkQueueEmpty(t)
}

// checkQueueEmpty polls until the work queue holds no message: every job
// acked, every hold removed.
func (s *lineService) checkQueueEmpty(t *testing.T) {
	t.Helper()
	within(t, 10*time.Second, func() error {
		info, err := s.jobs.Info(context.Background())
		if err != nil {
			return err
		}
		if info.State.Msgs != 0 {
			return fmt.Errorf("%d messages left in the queue", info.State.Msgs)
		}
		return nil
	})
}

// TestLinesAtomicPublishOff: when the job stream does not take atomic
// batches (an older volumed rewrote its configuration), an operation on
// several volumes is refused 503, naming why, and nothing is recorded; one
// on a single volume is still accepted.
func TestLinesAtomicPublishOff(t *testing.T) {
	s := newLineService(t)
	ctx := context.Background()
	info, err := s.jobs.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cfg := info.Config
	cfg.AllowAtomicPublish = false
	if _, err := s.bus.JetStream().UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	before := len(s.listAll(t))
	actx, cancel := context.WithTimeout(ctx, commands.AcceptTimeout)
	defer cancel()
	_, err = s.accept(actx, "", opLines, engine.Command{VolumeID: "vol-a", VolumeIDs: []string{"vol-a", "vol-b"}, Request: lineRequest{}})
	ce := commands.AsError(err)
	if ce.Status != http.StatusServiceUnavailable || !strings.Contains(ce.Message, "atomic publish") {
		t.Fatalf("accept on two volumes: %v, want 503 naming atomic publish", err)
	}
	if after := len(s.listAll(t)); after != before {
		t.Errorf("%d operations recorded after the refusal, want %d", after, before)
	}
	single := s.acceptLines(t, "", "vol-a")
	s.waitEnded(t, single)
}

func (s *lineService) listAll(t *testing.T) []commands.Operation {
	t.Helper()
	ops, _, err := s.cfg.Store.ListOperations(context.Background(), state.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	return ops
}

// TestSweepRequeuesLostLines: the sweep queues an operation on several
// volumes again whole (its job and its holds, one batch) when its job is
// lost, whether its holds are left (removed then: the new batch holds the
// lines) or lost too; it leaves a workflow's step (ParentID) alone.
func TestSweepRequeuesLostLines(t *testing.T) {
	s := newQueueService(t)
	ctx := context.Background()
	now := time.Now().UTC()
	op, err := s.cfg.Store.CreateOperation(ctx, commands.Operation{ID: "op-multi", Type: opLines, Status: commands.StatusExecuting,
		VolumeID: "vol-a", VolumeIDs: []string{"vol-a", "vol-b", "vol-c"}, Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	child, err := s.cfg.Store.CreateOperation(ctx, commands.Operation{ID: "op-child", Type: commands.OpDetach, Status: commands.StatusPending,
		VolumeID: "vol-b", ParentID: op.ID, Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.enqueue(ctx, op); err != nil {
		t.Fatal(err)
	}
	holds := func() []uint64 {
		t.Helper()
		var seqs []uint64
		for _, line := range []string{"vol-b", "vol-c"} {
			msg, err := s.jobs.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(lineSubject(line, op.ID)))
			if err != nil {
				t.Fatalf("hold on %s: %v", line, err)
			}
			var j job
			if err := json.Unmarshal(msg.Data, &j); err != nil || !j.Hold || j.OperationID != op.ID {
				t.Fatalf("hold on %s: %s %v", line, msg.Data, err)
			}
			if next, err := s.jobs.GetMsg(ctx, msg.Sequence+1, jetstream.WithGetMsgSubject(lineSubject(line, op.ID))); !errors.Is(err, jetstream.ErrMsgNotFound) {
				t.Fatalf("two holds on %s: %v %v", line, next, err)
			}
			seqs = append(seqs, msg.Sequence)
		}
		return seqs
	}
	runSeq := func() uint64 {
		t.Helper()
		msg, err := s.jobs.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(jobSubject(op)))
		if err != nil {
			t.Fatalf("job: %v", err)
		}
		return msg.Sequence
	}
	if run, h := runSeq(), holds(); h[0] != run+1 || h[1] != run+2 {
		t.Fatalf("job %d and holds %v: want one batch of consecutive sequences", run, h)
	}
	if changes, err := s.sweep(ctx); err != nil || len(changes) != 0 {
		t.Fatalf("sweep with the jobs queued: %v %v, want nothing (the step is its parent's)", changes, err)
	}
	if queued, err := s.jobQueued(ctx, child); err != nil || queued {
		t.Fatalf("a step's job queued: %v %v", queued, err)
	}
	for _, lost := range []string{"the job", "the job and its holds"} {
		if err := s.jobs.DeleteMsg(ctx, runSeq()); err != nil {
			t.Fatal(err)
		}
		if lost != "the job" {
			for _, seq := range holds() {
				if err := s.jobs.DeleteMsg(ctx, seq); err != nil {
					t.Fatal(err)
				}
			}
		}
		op, err = s.cfg.Store.GetOperation(ctx, op.ID)
		if err != nil {
			t.Fatal(err)
		}
		changes, err := s.sweep(ctx)
		if err != nil || len(changes) != 1 || !strings.Contains(changes[0], op.ID) {
			t.Fatalf("sweep after %s was lost: %v %v, want the operation requeued", lost, changes, err)
		}
		if run, h := runSeq(), holds(); h[0] != run+1 || h[1] != run+2 {
			t.Fatalf("after %s was lost: job %d and holds %v, want one new batch", lost, run, h)
		}
		// A new revision, as the operation's next save makes, lets the
		// next sweep queue it again.
		op.UpdatedAt = time.Now().UTC()
		if _, err := s.cfg.Store.UpdateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLinesOf: linesOf lists the job's line first, then each other
// volume once.
func TestLinesOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		op   commands.Operation
		want []string
	}{
		{"one volume", commands.Operation{ID: "op-1", Type: commands.OpDetach, VolumeID: "v-1"}, []string{"v-1"}},
		{"a create", commands.Operation{ID: "op-1", Type: commands.OpCreate}, []string{"op-1"}},
		{"several, root first", commands.Operation{ID: "op-1", Type: commands.OpFailover, VolumeID: "v-1", VolumeIDs: []string{"v-1", "v-2", "v-3"}}, []string{"v-1", "v-2", "v-3"}},
		{"a repeated volume once", commands.Operation{ID: "op-1", Type: commands.OpFailover, VolumeID: "v-2", VolumeIDs: []string{"v-1", "v-2", "v-1"}}, []string{"v-2", "v-1"}},
		{"no VolumeID: the first named", commands.Operation{ID: "op-1", Type: commands.OpRollback, VolumeIDs: []string{"v-3", "v-4"}}, []string{"v-3", "v-4"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := linesOf(tc.op); !slices.Equal(got, tc.want) {
				t.Fatalf("linesOf = %v, want %v", got, tc.want)
			}
		})
	}
}

// agentDevices is the device agent side of TestVMGuard: every VM has an
// agent, and those in noIdentity show no disk identity.
type agentDevices struct {
	DeviceCorrelator
	noIdentity map[string]bool
}

func (d agentDevices) HasAgent(context.Context, string) bool { return true }
func (d agentDevices) NoIdentity(vm string) bool             { return d.noIdentity[vm] }

// TestVMGuard: an attach to a VM whose disks carry no identity runs under
// the VM's lease, and not while another holds it (state.ErrLeaseHeld,
// nothing run); any other operation runs at once, under no lease.
func TestVMGuard(t *testing.T) {
	s := newTestService(t)
	g := vmGuard{devices: agentDevices{noIdentity: map[string]bool{"vm-bare": true}}, leases: s.leases}
	vm := func(id string) *string { return &id }
	for _, tc := range []struct {
		name  string
		op    commands.Operation
		lease bool
	}{
		{"attach to a VM without identities", commands.Operation{ID: "op-1", Type: commands.OpAttach, VMID: vm("vm-bare")}, true},
		{"attach to a VM with identities", commands.Operation{ID: "op-2", Type: commands.OpAttach, VMID: vm("vm-ids")}, false},
		{"detach from a VM without identities", commands.Operation{ID: "op-3", Type: commands.OpDetach, VMID: vm("vm-bare")}, false},
		{"attach without a VM", commands.Operation{ID: "op-4", Type: commands.OpAttach}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			ran, inner := false, error(nil)
			err := g.Exclusive(ctx, tc.op, func(ctx context.Context) {
				ran = true
				// A second operation of the same kind meanwhile.
				inner = g.Exclusive(ctx, tc.op, func(context.Context) {})
			})
			if err != nil || !ran {
				t.Fatalf("Exclusive: ran %v, %v", ran, err)
			}
			if held := errors.Is(inner, state.ErrLeaseHeld); held != tc.lease {
				t.Fatalf("a second one while the first runs: %v, want lease held %v", inner, tc.lease)
			}
			if err := g.Exclusive(ctx, tc.op, func(context.Context) {}); err != nil {
				t.Fatalf("after the first ended: %v", err)
			}
		})
	}
	if (vmGuard{leases: s.leases}).lease(context.Background(), commands.Operation{Type: commands.OpAttach, VMID: vm("vm-bare")}) != "" {
		t.Error("a lease without a device agent")
	}
}

// within polls cond until it returns nil, failing t with its last error
// after timeout.
func within(t *testing.T, timeout time.Duration, cond func() error) {
	t.Helper()
	last := errors.New("not polled")
	testenv.Eventually(t, timeout, func() bool {
		last = cond()
		return last == nil
	}, "%v", lastError{&last})
}

// lastError shows the error it points to when it is formatted.
type lastError struct{ err *error }

func (l lastError) String() string { return fmt.Sprint(*l.err) }

// TestTurnOnSeveralLines: with the jobs of X on [A, B], Y on [B, A] and Z
// on B queued in that order, only X's turn has come; once X's messages
// are gone, Y's comes and Z still waits for Y. Y queued again (its job
// lost) goes behind Z, and the hold of its earlier batch does not hold it
// back.
func TestTurnOnSeveralLines(t *testing.T) {
	s := newQueueService(t)
	ctx := context.Background()
	x := commands.Operation{ID: "op-x", Type: opLines, VolumeID: "vol-a", VolumeIDs: []string{"vol-a", "vol-b"}}
	y := commands.Operation{ID: "op-y", Type: opLines, VolumeID: "vol-b", VolumeIDs: []string{"vol-b", "vol-a"}}
	z := commands.Operation{ID: "op-z", Type: opLines, VolumeID: "vol-b"}
	seq := map[string]uint64{}
	var err error
	for _, op := range []commands.Operation{x, y, z} {
		if seq[op.ID], _, err = s.publishJob(ctx, op, op.ID); err != nil {
			t.Fatal(err)
		}
	}
	check := func(when string, want map[string]bool) {
		t.Helper()
		for _, op := range []commands.Operation{x, y, z} {
			if _, asked := want[op.ID]; !asked {
				continue
			}
			wait, why := s.turn(ctx, seq[op.ID], op)
			if wait != want[op.ID] {
				t.Errorf("%s: %s waits %v (%s), want %v", when, op.ID, wait, why, want[op.ID])
			}
		}
	}
	check("all queued", map[string]bool{"op-x": false, "op-y": true, "op-z": true})
	s.removeHolds(ctx, x, math.MaxUint64)
	if err := s.jobs.DeleteMsg(ctx, seq[x.ID]); err != nil {
		t.Fatal(err)
	}
	check("X ended", map[string]bool{"op-y": false, "op-z": true})
	// Y queued again (its job lost): its earlier hold on A is passed over.
	if err := s.jobs.DeleteMsg(ctx, seq[y.ID]); err != nil {
		t.Fatal(err)
	}
	if seq[y.ID], _, err = s.publishJob(ctx, y, "op-y@2"); err != nil {
		t.Fatal(err)
	}
	check("Y queued again, behind Z", map[string]bool{"op-y": true, "op-z": false})
	if err := s.jobs.DeleteMsg(ctx, seq[z.ID]); err != nil {
		t.Fatal(err)
	}
	check("Z ended", map[string]bool{"op-y": false})
}

// BenchmarkEnqueue measures queueing a job on the embedded bus: one
// publish for an operation on one volume, one atomic batch (its job and a
// hold per other volume) for an operation on several.
func BenchmarkEnqueue(b *testing.B) {
	for _, n := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("volumes=%d", n), func(b *testing.B) {
			s := newQueueService(b)
			ctx := context.Background()
			var volumes []string
			for i := range n {
				volumes = append(volumes, fmt.Sprintf("vol-%d", i))
			}
			i := 0
			for b.Loop() {
				i++
				op := commands.Operation{ID: fmt.Sprintf("op-%d", i), Type: opLines, VolumeID: volumes[0]}
				if n > 1 {
					op.VolumeIDs = volumes
				}
				if err := s.enqueue(ctx, op); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestNoGuardWhileWaitingForASlot: a job that waits for a running slot
// holds no guard (the VM lease of an attach to a VM whose disks carry no
// identity), so a workflow's step that waits for that guard in its slot
// never waits on a job that waits for the slot.
func TestNoGuardWhileWaitingForASlot(t *testing.T) {
	ctx := context.Background()
	b := testenv.StartBus(t)
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	store, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close(context.Background()) })
	sim := simtest.Start(t, cloudsim.Config{LocalDevices: cloudsim.LocalDevicesOff})
	s := New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Store: store, Logger: log, SyncInterval: -1, MaxConcurrent: 1,
		Devices:    agentDevices{noIdentity: map[string]bool{"vm-bare": true}},
		CloudStack: csapi.New(csapi.Config{URL: sim.URL(), APIKey: sim.APIKey(), SecretKey: sim.SecretKey()})})
	s.engine = engine.New(engine.Config{Operations: store, Publisher: s, Guard: s.guard, Logger: s.log}, &lineKind{})
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	s.sem <- struct{}{} // the one slot, taken (a workflow running)
	vm, now := "vm-bare", time.Now().UTC()
	op, err := store.CreateOperation(ctx, commands.Operation{ID: "op-attach-bare", Type: commands.OpAttach, Status: commands.StatusPending,
		VolumeID: "v-bare", VMID: &vm, Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.enqueue(ctx, op); err != nil {
		t.Fatal(err)
	}
	within(t, time.Minute, func() error {
		info, err := b.JetStream().Consumer(ctx, bus.StreamJobs, ConsumerName)
		if err != nil {
			return err
		}
		if ci := info.CachedInfo(); ci.NumAckPending < 1 {
			return fmt.Errorf("the attach's job is not handed out yet")
		}
		return nil
	})
	// While it waits for the slot, the VM's lease stays free for whoever
	// holds the slot.
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if err := s.guard.Exclusive(ctx, op, func(context.Context) {}); err != nil {
			t.Fatalf("the VM lease while the attach waits for a slot: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	<-s.sem
	within(t, time.Minute, func() error {
		got, err := store.GetOperation(ctx, op.ID)
		if err != nil || !got.Status.Terminal() {
			return fmt.Errorf("attach not ended once the slot is free: %v %v", got.Status, err)
		}
		return nil
	})
}
