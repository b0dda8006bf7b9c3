package handlers

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers/csapi"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

func TestJobLines(t *testing.T) {
	for _, tc := range []struct {
		name string
		op   commands.Operation
		line string
	}{
		{"create, volume unknown", commands.Operation{ID: "op-1", Type: commands.OpCreate}, "op-1"},
		{"create that knows its volume keeps its own line", commands.Operation{ID: "op-1", Type: commands.OpCreate, VolumeID: "v-1"}, "op-1"},
		{"attach waits on its volume", commands.Operation{ID: "op-2", Type: commands.OpAttach, VolumeID: "v-1"}, "v-1"},
		{"export waits on its volume", commands.Operation{ID: "op-3", Type: commands.OpExport, VolumeID: "v-1"}, "v-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			subject := jobSubject(tc.op)
			if lineOf(tc.op) != tc.line || lineOfSubject(subject) != tc.line || subject != bus.JobsSubjectPrefix+tc.line+"."+tc.op.ID {
				t.Fatalf("line %q, subject %q (line %q), want line %q", lineOf(tc.op), subject, lineOfSubject(subject), tc.line)
			}
		})
	}
	if got := lineOfSubject(bus.JobsSubjectPrefix + "op-9"); got != "op-9" {
		t.Fatalf("a job queued by an older volumed is its own line: got %q", got)
	}
}

func TestTurnDelay(t *testing.T) {
	for delivered, want := range map[uint64]time.Duration{1: turnDelayMin, 2: 2 * turnDelayMin, 3: 4 * turnDelayMin, 50: turnDelayMax} {
		if got := turnDelay(delivered); got != want {
			t.Errorf("turnDelay(%d) = %v, want %v", delivered, got, want)
		}
	}
}

// newTestService is a Service on a real embedded bus and KV store, for
// the parts that need no CloudStack.
func newTestService(t *testing.T) *Service {
	t.Helper()
	b := testenv.StartBus(t)
	store, err := state.NewKV(context.Background(), b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close(context.Background()) })
	return New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Store: store, RetryMin: time.Millisecond,
		RetryMax: time.Millisecond, StepTimeout: 30 * time.Second})
}

// TestLeasedExcludes: two holders of one lease in one process never work
// at once; a caller that does not wait is told the lease is held.
func TestLeasedExcludes(t *testing.T) {
	s := newTestService(t)
	ctx := context.Background()
	var inside, overlaps, runs atomic.Int32
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			err := s.leased(ctx, "test", true, func(ctx context.Context) error {
				if inside.Add(1) > 1 {
					overlaps.Add(1)
				}
				time.Sleep(20 * time.Millisecond)
				inside.Add(-1)
				runs.Add(1)
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if overlaps.Load() != 0 || runs.Load() != 4 {
		t.Fatalf("%d overlaps in %d runs, want 0 in 4", overlaps.Load(), runs.Load())
	}
	held := make(chan struct{})
	release := make(chan struct{})
	go s.leased(ctx, "test", false, func(ctx context.Context) error { close(held); <-release; return nil })
	<-held
	err := s.leased(ctx, "test", false, func(ctx context.Context) error { return errors.New("ran while held") })
	close(release)
	if !errors.Is(err, state.ErrLeaseHeld) {
		t.Fatalf("leased without waiting while held: %v, want ErrLeaseHeld", err)
	}
}

// TestStepRetryPolicy: 530 is retried a limited number of times, a
// Retry-After is honoured, and a lost answer (MaybeDone) is never retried.
func TestStepRetryPolicy(t *testing.T) {
	s := newTestService(t)
	ctx := context.Background()
	op, err := s.cfg.Store.CreateOperation(ctx, commands.Operation{ID: "op-step", Type: commands.OpAttach,
		Status: commands.StatusPending, VolumeID: "v", Request: []byte(`{}`), CreatedAt: time.Now().UTC(), UpdatedAt: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	op.Status, op.Attempts = commands.StatusExecuting, 1
	if err := s.save(ctx, &op); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		err      *csapi.Error
		calls    int
		minSpent time.Duration
	}{
		{"530 a few times", &csapi.Error{Command: "attachVolume", Code: 530, Retryable: true, RetryLimit: csapi.Retries530}, csapi.Retries530 + 1, 0},
		{"503 after Retry-After", &csapi.Error{Command: "attachVolume", Code: 503, Retryable: true, RetryAfter: 300 * time.Millisecond}, 2, 300 * time.Millisecond},
		{"lost answer not retried", &csapi.Error{Command: "attachVolume", MaybeDone: true}, 1, 0},
		{"final not retried", &csapi.Error{Command: "attachVolume", Code: 533}, 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			start := time.Now()
			err := s.step(ctx, &op, "attachVolume", func(context.Context) error {
				calls++
				if tc.err.RetryLimit == 0 && tc.err.Retryable && calls > 1 {
					return nil // the retry after Retry-After succeeds
				}
				return tc.err
			})
			if calls != tc.calls || time.Since(start) < tc.minSpent {
				t.Fatalf("%d calls in %v (err %v), want %d in at least %v", calls, time.Since(start), err, tc.calls, tc.minSpent)
			}
			if err != nil && csapi.IsRetryable(err) {
				t.Fatalf("step gave up with a retryable error %v: the operation would not fail as CloudStack said", err)
			}
		})
	}
}

// TestSaveFencesALateExecutor: once another executor claimed the
// operation (attempt + 1), the first one's next write is refused and it
// learns it lost the operation; so is a write after the operation ended.
func TestSaveFencesALateExecutor(t *testing.T) {
	s := newTestService(t)
	ctx := context.Background()
	now := time.Now().UTC()
	first, err := s.cfg.Store.CreateOperation(ctx, commands.Operation{ID: "op-fence", Type: commands.OpAttach,
		Status: commands.StatusPending, VolumeID: "v", Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	first.Status, first.Attempts = commands.StatusExecuting, 1
	if err := s.save(ctx, &first); err != nil {
		t.Fatal(err)
	}
	second, err := s.cfg.Store.GetOperation(ctx, first.ID)
	if err != nil {
		t.Fatal(err)
	}
	second.Attempts++
	if err := s.save(ctx, &second); err != nil {
		t.Fatalf("claim by the second executor: %v", err)
	}
	first.Step = stepAttachRequested
	if err := s.save(ctx, &first); !errors.Is(err, errLost) {
		t.Fatalf("late write of the first executor: %v, want errLost", err)
	}
	if err := s.finish(ctx, &second, commands.StatusCompleted); err != nil {
		t.Fatal(err)
	}
	second.Step = stepAttachJob
	if err := s.save(ctx, &second); !errors.Is(err, errLost) {
		t.Fatalf("write after the end: %v, want errLost", err)
	}
	cur, _ := s.cfg.Store.GetOperation(ctx, first.ID)
	if cur.Status != commands.StatusCompleted || cur.Attempts != 2 || cur.Step != "" {
		t.Fatalf("record after the late writes: %+v", cur)
	}
}

// TestSweepRequeuesALostJob: a job lost from the stream within the dedup
// window (its operation id already seen) is queued again by the sweep,
// once; a queued job is left alone.
func TestSweepRequeuesALostJob(t *testing.T) {
	s := newTestService(t)
	ctx := context.Background()
	var err error
	if s.jobs, err = s.cfg.JetStream.Stream(ctx, bus.StreamJobs); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	op, err := s.cfg.Store.CreateOperation(ctx, commands.Operation{ID: "op-lost", Type: commands.OpDetach,
		Status: commands.StatusPending, VolumeID: "v-1", Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.enqueue(ctx, op); err != nil {
		t.Fatal(err)
	}
	if changes, err := s.sweep(ctx); err != nil || len(changes) != 0 {
		t.Fatalf("sweep with the job queued: %v %v, want nothing", changes, err)
	}
	msg, err := s.jobs.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(jobSubject(op)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.jobs.DeleteMsg(ctx, msg.Sequence); err != nil {
		t.Fatal(err)
	}
	changes, err := s.sweep(ctx)
	if err != nil || len(changes) != 1 {
		t.Fatalf("sweep after the job was lost: %v %v, want it requeued", changes, err)
	}
	if queued, err := s.jobQueued(ctx, op); err != nil || !queued {
		t.Fatalf("job queued after the sweep: %v %v", queued, err)
	}
	if changes, err := s.sweep(ctx); err != nil || len(changes) != 0 {
		t.Fatalf("second sweep: %v %v, want nothing", changes, err)
	}
}

// TestExportChangeApply: the export write a requester made is applied over
// a host's reading of the records that may not show it yet.
func TestExportChangeApply(t *testing.T) {
	here, there := "vm-here", "vm-there"
	old := []commands.Export{{VolumeID: "a", VMID: here, ExportName: "vola"}, {VolumeID: "b", VMID: here, ExportName: "volb"}}
	for _, tc := range []struct {
		name   string
		change *exportChange
		want   []string
	}{
		{"none", nil, []string{"a", "b"}},
		{"removed, still read", &exportChange{Removed: "a"}, []string{"b"}},
		{"put, not read yet", &exportChange{Put: &commands.Export{VolumeID: "c", VMID: here}}, []string{"a", "b", "c"}},
		{"put over an old reading", &exportChange{Put: &commands.Export{VolumeID: "b", VMID: here, ReadOnly: true}}, []string{"a", "b"}},
		{"put for another VM", &exportChange{Put: &commands.Export{VolumeID: "b", VMID: there}}, []string{"a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.change.apply(slices.Clone(old), here)
			var ids []string
			for _, e := range got {
				ids = append(ids, e.VolumeID)
			}
			if !slices.Equal(ids, tc.want) {
				t.Fatalf("records %v, want %v", ids, tc.want)
			}
			if tc.name == "put over an old reading" && !got[1].ReadOnly {
				t.Fatalf("the old reading of b won over the write: %+v", got[1])
			}
		})
	}
}
