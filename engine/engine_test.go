package engine_test

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
)

// events records the operation events the engine publishes.
type events struct {
	mu  sync.Mutex
	ops []commands.Operation
	// hook, when set, sees each event as it is published.
	hook func(commands.Operation)
}

func (e *events) PublishOperation(_ context.Context, op commands.Operation) {
	e.mu.Lock()
	e.ops = append(e.ops, op)
	e.mu.Unlock()
	if e.hook != nil {
		e.hook(op)
	}
}

var timing = engine.Timing{StepTimeout: 30 * time.Second, SettleTimeout: time.Second,
	Retry: backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}}

// pending records a new pending operation of type typ on volume "v".
func pending(t *testing.T, ops state.Operations, id string, typ commands.OpType) commands.Operation {
	t.Helper()
	now := time.Now().UTC()
	op, err := ops.CreateOperation(context.Background(), commands.Operation{ID: id, Type: typ,
		Status: commands.StatusPending, VolumeID: "v", Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	return op
}

// claimed records a new attach operation and claims it as attempt 1.
func claimed(t *testing.T, ops state.Operations, id string) *engine.Journal {
	t.Helper()
	ctx := context.Background()
	op := pending(t, ops, id, commands.OpAttach)
	op.Status, op.Attempts = commands.StatusExecuting, 1
	j := engine.NewJournal(&op, ops, &events{}, timing, slog.Default())
	if err := j.Save(ctx); err != nil {
		t.Fatal(err)
	}
	return j
}

// TestStepRetryPolicy: 530 is retried a limited number of times, a
// Retry-After is honoured, and a lost answer (MaybeDone) is never retried.
func TestStepRetryPolicy(t *testing.T) {
	j := claimed(t, memstore.New(), "op-step")
	ctx := context.Background()
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
			err := j.Step(ctx, "attachVolume", func(context.Context) error {
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

// TestStepRetryFencedAfterWait: another executor claims the operation
// while a step waits to retry a refused call (here as the "retrying"
// record is published); the first executor learns it lost the operation
// and does not send the call again.
func TestStepRetryFencedAfterWait(t *testing.T) {
	store := memstore.New()
	ctx := context.Background()
	ev := &events{}
	first := claimed(t, store, "op-retry-fence")
	first = engine.NewJournal(first.Op, store, ev, timing, slog.Default())
	ev.hook = func(op commands.Operation) {
		if !strings.HasSuffix(op.Error, "(retrying)") {
			return
		}
		ev.hook = nil
		cur, err := store.GetOperation(ctx, op.ID)
		if err != nil {
			t.Error(err)
			return
		}
		cur.Attempts++
		if err := engine.NewJournal(&cur, store, &events{}, timing, slog.Default()).Save(ctx); err != nil {
			t.Errorf("claim by the second executor: %v", err)
		}
	}
	calls := 0
	err := first.Step(ctx, "attachVolume", func(context.Context) error {
		calls++
		return &csapi.Error{Command: "attachVolume", Code: 503, Retryable: true, RetryAfter: time.Millisecond}
	})
	if calls != 1 || !errors.Is(err, engine.ErrLost) {
		t.Fatalf("%d calls, err %v; want 1 call and ErrLost", calls, err)
	}
}

// TestSaveFencesALateExecutor: once another executor claimed the
// operation (attempt + 1), the first one's next write is refused and it
// learns it lost the operation; so is a write after the operation ended;
// and the fence check says so before any other write.
func TestSaveFencesALateExecutor(t *testing.T) {
	store := memstore.New()
	ctx := context.Background()
	first := claimed(t, store, "op-fence")
	if err := first.Check(ctx); err != nil {
		t.Fatalf("fence of the holder: %v", err)
	}
	cur, err := store.GetOperation(ctx, first.Op.ID)
	if err != nil {
		t.Fatal(err)
	}
	cur.Attempts++
	second := engine.NewJournal(&cur, store, &events{}, timing, slog.Default())
	if err := second.Save(ctx); err != nil {
		t.Fatalf("claim by the second executor: %v", err)
	}
	if err := first.Check(ctx); !errors.Is(err, engine.ErrLost) {
		t.Fatalf("fence of the late executor: %v, want ErrLost", err)
	}
	first.Op.Step = "attach:requested"
	if err := first.Save(ctx); !errors.Is(err, engine.ErrLost) {
		t.Fatalf("late write of the first executor: %v, want ErrLost", err)
	}
	now := time.Now().UTC()
	second.Op.Status, second.Op.CompletedAt = commands.StatusCompleted, &now
	if err := second.Save(ctx); err != nil {
		t.Fatal(err)
	}
	second.Op.Step = "attach:job"
	if err := second.Save(ctx); !errors.Is(err, engine.ErrLost) {
		t.Fatalf("write after the end: %v, want ErrLost", err)
	}
	got, _ := store.GetOperation(ctx, first.Op.ID)
	if got.Status != commands.StatusCompleted || got.Attempts != 2 || got.Step != "" {
		t.Fatalf("record after the late writes: %+v", got)
	}
}

// kindFunc is a Kind of one type running fn.
type kindFunc struct {
	typ commands.OpType
	fn  func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error)
}

func (k kindFunc) Type() commands.OpType { return k.typ }

func (k kindFunc) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	return k.fn(ctx, j)
}

// TestRunByRegisteredKind: Run hands an operation to the kind registered
// for its type and records its end; a type no kind runs fails with
// INTERNAL_ERROR; an operation another executor claimed meanwhile is
// left to it, untouched.
func TestRunByRegisteredKind(t *testing.T) {
	ctx := context.Background()
	store := memstore.New()
	ran := 0
	e := engine.New(engine.Config{Operations: store, Publisher: &events{}, Timing: timing, Logger: slog.Default()},
		kindFunc{commands.OpDetach, func(_ context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			ran++
			return &commands.OpResponse{VolumeID: j.Op.VolumeID, Message: "done"}, nil
		}},
		kindFunc{commands.OpDelete, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			cur, _ := store.GetOperation(ctx, j.Op.ID) // another executor claims it now
			cur.Attempts, cur.Status = cur.Attempts+1, commands.StatusExecuting
			if _, err := store.UpdateOperation(ctx, cur); err != nil {
				t.Fatal(err)
			}
			return nil, j.Check(ctx)
		}})
	record := func(id string, typ commands.OpType) {
		now := time.Now().UTC()
		if _, err := store.CreateOperation(ctx, commands.Operation{ID: id, Type: typ, Status: commands.StatusPending,
			VolumeID: "v", Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now}); err != nil {
			t.Fatal(err)
		}
	}
	record("op-detach", commands.OpDetach)
	record("op-attach", commands.OpAttach)
	record("op-delete", commands.OpDelete)
	for _, tc := range []struct {
		id     string
		result engine.Result
		status commands.OpStatus
		code   any
	}{
		{"op-detach", engine.Done, commands.StatusCompleted, nil},
		{"op-attach", engine.Done, commands.StatusFailed, commands.CodeInternalError},
		{"op-delete", engine.Lost, commands.StatusExecuting, nil},
	} {
		if res := e.Run(ctx, tc.id, slog.Default()); res != tc.result {
			t.Fatalf("%s: result %v, want %v", tc.id, res, tc.result)
		}
		op, _ := store.GetOperation(ctx, tc.id)
		if op.Status != tc.status || op.Details["code"] != tc.code {
			t.Fatalf("%s: %s %v, want %s with code %v", tc.id, op.Status, op.Details, tc.status, tc.code)
		}
	}
	if ran != 1 {
		t.Fatalf("the detach kind ran %d times, want 1", ran)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("two kinds of one type were registered")
		}
	}()
	engine.New(engine.Config{}, kindFunc{typ: commands.OpDetach}, kindFunc{typ: commands.OpDetach})
}

// TestRunRead: RunRead claims the operation as its caller read it; a
// record that moved since without a claim is claimed as it is now (as Run
// would have), and one claimed since by another executor, or ended, is
// not run past its first save.
func TestRunRead(t *testing.T) {
	ctx := context.Background()
	store := memstore.New()
	ran := map[string]int{}
	e := engine.New(engine.Config{Operations: store, Publisher: &events{}, Timing: timing, Logger: slog.Default()},
		kindFunc{commands.OpDetach, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			j.Op.Step = "detach:requested" // as a kind does before it changes anything
			if err := j.Save(ctx); err != nil {
				return nil, err
			}
			ran[j.Op.ID]++
			return &commands.OpResponse{VolumeID: j.Op.VolumeID}, nil
		}})
	for _, tc := range []struct {
		name string
		// since changes the record after the caller read it.
		since    func(op commands.Operation) commands.Operation
		result   engine.Result
		ran      int
		status   commands.OpStatus
		attempts int
	}{
		{"as read", nil, engine.Done, 1, commands.StatusCompleted, 1},
		{"moved, not claimed", func(op commands.Operation) commands.Operation {
			op.Status, op.Step = commands.StatusExecuting, "detach:requested" // an earlier attempt's last step
			return op
		}, engine.Done, 1, commands.StatusCompleted, 1},
		{"claimed since", func(op commands.Operation) commands.Operation {
			op.Status, op.Attempts = commands.StatusExecuting, op.Attempts+1
			return op
		}, engine.Lost, 0, commands.StatusExecuting, 1},
		{"ended since", func(op commands.Operation) commands.Operation {
			now := time.Now().UTC()
			op.Status, op.CompletedAt = commands.StatusFailed, &now
			return op
		}, engine.Done, 0, commands.StatusFailed, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			read := pending(t, store, "op-"+tc.name, commands.OpDetach)
			if tc.since != nil {
				if _, err := store.UpdateOperation(ctx, tc.since(read)); err != nil {
					t.Fatal(err)
				}
			}
			if res := e.RunRead(ctx, read, slog.Default()); res != tc.result {
				t.Fatalf("result %v, want %v", res, tc.result)
			}
			got, _ := store.GetOperation(ctx, read.ID)
			if ran[read.ID] != tc.ran || got.Status != tc.status || got.Attempts != tc.attempts {
				t.Fatalf("ran %d times, recorded %s attempt %d; want %d, %s attempt %d", ran[read.ID], got.Status, got.Attempts,
					tc.ran, tc.status, tc.attempts)
			}
		})
	}
}

// TestClaimWithFirstSave: the claim of a pending operation is written
// with its first save (a step, a fence check, or its end), and the record
// still moves through executing; an operation that ran before is claimed
// at once; and an executor whose first save finds another's claim has
// written nothing and stops.
func TestClaimWithFirstSave(t *testing.T) {
	ctx := context.Background()
	type saved struct {
		status   commands.OpStatus
		step     string
		attempts int
	}
	for _, tc := range []struct {
		name    string
		status  commands.OpStatus // as recorded before the run
		kind    func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error)
		result  engine.Result
		events  []saved
		claimed int // attempts recorded at the end
	}{
		{"step saved", commands.StatusPending, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			j.Op.Step = "detach:requested"
			return &commands.OpResponse{}, j.Save(ctx)
		}, engine.Done, []saved{{commands.StatusExecuting, "detach:requested", 1}, {commands.StatusCompleted, "detach:requested", 1}}, 1},
		{"read, then step saved", commands.StatusPending, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			if err := j.Read(ctx, "listVolumes", func(context.Context) error { return nil }); err != nil {
				return nil, err
			}
			j.Op.Step = "detach:requested"
			return &commands.OpResponse{}, j.Save(ctx)
		}, engine.Done, []saved{{commands.StatusExecuting, "detach:requested", 1}, {commands.StatusCompleted, "detach:requested", 1}}, 1},
		{"step called before any save", commands.StatusPending, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			return &commands.OpResponse{}, j.Step(ctx, "detachVolume", func(context.Context) error { return nil })
		}, engine.Done, []saved{{commands.StatusExecuting, "", 1}, {commands.StatusCompleted, "", 1}}, 1},
		{"fence checked", commands.StatusPending, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			return &commands.OpResponse{}, j.Check(ctx)
		}, engine.Done, []saved{{commands.StatusExecuting, "", 1}, {commands.StatusCompleted, "", 1}}, 1},
		{"nothing saved", commands.StatusPending, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			return &commands.OpResponse{}, nil
		}, engine.Done, []saved{{commands.StatusExecuting, "", 1}, {commands.StatusCompleted, "", 1}}, 1},
		{"failed, nothing saved", commands.StatusPending, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			return nil, commands.Conflict("attached")
		}, engine.Done, []saved{{commands.StatusExecuting, "", 1}, {commands.StatusFailed, "", 1}}, 1},
		{"ran before", commands.StatusExecuting, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
			j.Op.Step = "detach:requested"
			return &commands.OpResponse{}, j.Save(ctx)
		}, engine.Done, []saved{{commands.StatusExecuting, "", 2}, {commands.StatusExecuting, "detach:requested", 2},
			{commands.StatusCompleted, "detach:requested", 2}}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := memstore.New()
			pub := &events{}
			e := engine.New(engine.Config{Operations: store, Publisher: pub, Timing: timing, Logger: slog.Default()},
				kindFunc{commands.OpDetach, tc.kind})
			op := pending(t, store, "op-claim", commands.OpDetach)
			if tc.status == commands.StatusExecuting {
				op.Status, op.Attempts = commands.StatusExecuting, 1 // an earlier executor's claim
				var err error
				if op, err = store.UpdateOperation(ctx, op); err != nil {
					t.Fatal(err)
				}
			}
			if res := e.RunRead(ctx, op, slog.Default()); res != tc.result {
				t.Fatalf("result %v, want %v", res, tc.result)
			}
			var got []saved
			for _, ev := range pub.ops {
				got = append(got, saved{ev.Status, ev.Step, ev.Attempts})
			}
			if !slices.Equal(got, tc.events) {
				t.Fatalf("events %v, want %v", got, tc.events)
			}
		})
	}
	// A kind that calls CloudStack (a Step) before it saved anything: the
	// engine writes the claim first, so an executor that read the record
	// before another claimed it never makes the call.
	t.Run("step after another's claim", func(t *testing.T) {
		store := memstore.New()
		pub := &events{}
		called := 0
		e := engine.New(engine.Config{Operations: store, Publisher: pub, Timing: timing, Logger: slog.Default()},
			kindFunc{commands.OpDetach, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
				if err := j.Read(ctx, "listVolumes", func(context.Context) error { return nil }); err != nil {
					return nil, err
				}
				cur, _ := store.GetOperation(ctx, j.Op.ID) // another executor claims it now
				cur.Status, cur.Attempts = commands.StatusExecuting, cur.Attempts+1
				if _, err := store.UpdateOperation(ctx, cur); err != nil {
					t.Fatal(err)
				}
				err := j.Step(ctx, "detachVolume", func(context.Context) error { called++; return nil })
				if !errors.Is(err, engine.ErrLost) {
					t.Errorf("step after another's claim: %v, want ErrLost", err)
				}
				return nil, err
			}})
		op := pending(t, store, "op-claim", commands.OpDetach)
		if res := e.RunRead(ctx, op, slog.Default()); res != engine.Lost || called != 0 || len(pub.ops) != 0 {
			t.Fatalf("result %v, CloudStack called %d times, %d events; want Lost, no call, no event", res, called, len(pub.ops))
		}
	})
	t.Run("another claim first", func(t *testing.T) {
		store := memstore.New()
		pub := &events{}
		var other commands.Operation
		e := engine.New(engine.Config{Operations: store, Publisher: pub, Timing: timing, Logger: slog.Default()},
			kindFunc{commands.OpDetach, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
				// Another executor, given the job after this one read the
				// record, claims it and saves its first step.
				cur, _ := store.GetOperation(ctx, j.Op.ID)
				cur.Status, cur.Attempts, cur.Step = commands.StatusExecuting, cur.Attempts+1, "detach:requested"
				var err error
				if other, err = store.UpdateOperation(ctx, cur); err != nil {
					t.Fatal(err)
				}
				j.Op.Step = "detach:requested"
				err = j.Save(ctx)
				if !errors.Is(err, engine.ErrLost) {
					t.Errorf("first save after another's claim: %v, want ErrLost", err)
				}
				return nil, err
			}})
		op := pending(t, store, "op-claim", commands.OpDetach)
		if res := e.RunRead(ctx, op, slog.Default()); res != engine.Lost {
			t.Fatalf("result %v, want Lost", res)
		}
		got, _ := store.GetOperation(ctx, op.ID)
		if len(pub.ops) != 0 || got.Revision != other.Revision || got.Status != commands.StatusExecuting {
			t.Fatalf("this executor wrote: events %d, record %+v", len(pub.ops), got)
		}
	})
}
