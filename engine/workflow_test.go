package engine_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
)

// Types of the test workflow and of its steps.
const (
	typeFlow commands.OpType = "flow"
	typeStep commands.OpType = "step"
)

// stepReq is a test step's request: what it does, and whether it fails.
type stepReq struct {
	Do   string `json:"do"`
	Fail bool   `json:"fail"`
	// MayRun fails it on TIMEOUT, its CloudStack job maybe still running.
	MayRun bool `json:"may_run"`
}

// flowWorld runs a workflow of named steps whose children record what
// they did; fail names the steps (forward or undo) that fail for good.
type flowWorld struct {
	store  *memstore.Store
	events *events
	engine *engine.Engine
	mu     sync.Mutex
	did    []string
	fail   map[string]bool
	guard  *onceHeld
	// during, when set, runs inside each step's child before its fenced
	// write.
	during func(do string)
}

// onceHeld is a Guard held elsewhere the first held times it is asked.
type onceHeld struct {
	mu    sync.Mutex
	held  int
	asked int
}

func (g *onceHeld) Exclusive(ctx context.Context, _ commands.Operation, fn func(context.Context)) error {
	g.mu.Lock()
	g.asked++
	held := g.asked <= g.held
	g.mu.Unlock()
	if held {
		return fmt.Errorf("vm:x: %w", state.ErrLeaseHeld)
	}
	fn(ctx)
	return nil
}

func newFlowWorld(t *testing.T, fail ...string) *flowWorld {
	t.Helper()
	w := &flowWorld{store: memstore.New(), events: &events{}, fail: map[string]bool{}, guard: &onceHeld{}}
	for _, f := range fail {
		w.fail[f] = true
	}
	step := kindFunc{typeStep, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
		var req stepReq
		if err := j.Decode(&req); err != nil {
			return nil, err
		}
		switch {
		case req.MayRun:
			return nil, commands.Timeout("%s did not finish", req.Do).WithDetail(commands.DetailJobMayRun, true).
				WithDetail("cloudstack_error_code", 530)
		case req.Fail:
			return nil, commands.CloudStack("%s refused", req.Do).WithDetail("cloudstack_error_code", 533).WithDetail("step", "refuse")
		}
		if w.during != nil {
			w.during(req.Do)
		}
		if err := j.Check(ctx); err != nil { // as a fenced writer does
			return nil, err
		}
		w.mu.Lock()
		w.did = append(w.did, req.Do)
		w.mu.Unlock()
		return &commands.OpResponse{Message: req.Do}, nil
	}}
	plan := engine.Plan{
		Child: func(wf *commands.Workflow, i int) (engine.Child, error) {
			s := wf.Steps[i]
			return engine.Child{Type: typeStep, VolumeID: s.VolumeID,
				Request: stepReq{Do: s.Name, Fail: w.fail[s.Name], MayRun: w.fail[s.Name+" may run"]}}, nil
		},
		Undo: func(wf *commands.Workflow, i int) []commands.WorkflowStep {
			return []commands.WorkflowStep{{Name: "undo-" + wf.Steps[i].Name, VolumeID: wf.Steps[i].VolumeID}}
		},
		Left: func(wf *commands.Workflow) []string {
			var left []string
			for _, s := range wf.Steps {
				if s.Undoes == nil && s.Status == commands.StepDone {
					left = append(left, s.Name+" stays")
				}
			}
			return left
		},
	}
	flow := kindFunc{typeFlow, func(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
		if j.Op.Workflow == nil {
			j.Op.Workflow = &commands.Workflow{}
			for _, s := range []string{"a", "b", "c"} {
				j.Op.Workflow.Steps = append(j.Op.Workflow.Steps, commands.WorkflowStep{Name: s, VolumeID: "vol-" + s, Status: commands.StepPending})
			}
		}
		if err := j.RunWorkflow(ctx, plan); err != nil {
			return nil, err
		}
		return &commands.OpResponse{Steps: j.Op.Workflow.Steps, Message: "flowed"}, nil
	}}
	w.engine = engine.New(engine.Config{Operations: w.store, Publisher: w.events, Timing: timing, Logger: slog.Default(), Guard: w.guard},
		flow, step)
	return w
}

func (w *flowWorld) record(t *testing.T, id string) {
	t.Helper()
	now := time.Now().UTC()
	if _, err := w.store.CreateOperation(context.Background(), commands.Operation{ID: id, Type: typeFlow, Status: commands.StatusPending,
		VolumeID: "vol-a", Request: json.RawMessage(`{}`), RequestedBy: "api-token:ops@127.0.0.1", CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
}

// TestWorkflowRunner: the runner runs each step as a child operation with
// a deterministic id, the workflow's requester and its parent id, under
// the guard (waiting while it is held elsewhere), and publishes its
// progress; a step that fails for good undoes the done steps in reverse
// order, and an undo that fails ends it not compensated, saying what is
// left; a resumed workflow runs no done step again.
func TestWorkflowRunner(t *testing.T) {
	for _, tc := range []struct {
		name        string
		fail        []string
		held        int
		status      commands.OpStatus
		did         []string
		compensated any
		code        string // of the failure; CLOUDSTACK_ERROR when ""
		statuses    []string
		left        []any
	}{
		{name: "all done", status: commands.StatusCompleted, did: []string{"a", "b", "c"},
			statuses: []string{"done", "done", "done"}},
		{name: "guard held twice: waits", held: 2, status: commands.StatusCompleted, did: []string{"a", "b", "c"},
			statuses: []string{"done", "done", "done"}},
		{name: "c fails: b then a undone", fail: []string{"c"}, status: commands.StatusFailed,
			did: []string{"a", "b", "undo-b", "undo-a"}, compensated: true,
			statuses: []string{"undone", "undone", "failed", "done", "done"}},
		{name: "c times out, its job maybe running, no CloudStack to ask: unknown", fail: []string{"c may run"}, status: commands.StatusFailed,
			code: commands.CodeTimeout, did: []string{"a", "b", "undo-b", "undo-a"}, compensated: false,
			statuses: []string{"undone", "undone", "failed", "done", "done"},
			left: []any{"step 2 (c volume vol-c) may have been done: what its CloudStack job did is unknown (it still ran when the workflow gave up waiting; the reconcile records its end on operation " +
				engine.ChildID("op-flow", 2) + ")"}},
		{name: "a fails: nothing to undo", fail: []string{"a"}, status: commands.StatusFailed,
			compensated: true, statuses: []string{"failed", "pending", "pending"}},
		{name: "undo of b fails", fail: []string{"c", "undo-b"}, status: commands.StatusFailed,
			did: []string{"a", "b", "undo-a"}, compensated: false,
			statuses: []string{"undone", "done", "failed", "failed", "done"}, left: []any{"b stays"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFlowWorld(t, tc.fail...)
			w.guard.held = tc.held
			w.record(t, "op-flow")
			ctx := context.Background()
			if res := w.engine.Run(ctx, "op-flow", slog.Default()); res != engine.Done {
				t.Fatalf("result %v", res)
			}
			op, err := w.store.GetOperation(ctx, "op-flow")
			if err != nil {
				t.Fatal(err)
			}
			if op.Status != tc.status || !slices.Equal(w.did, tc.did) {
				t.Fatalf("%s (%s %v), did %v; want %s, did %v", op.Status, op.Error, op.Details, w.did, tc.status, tc.did)
			}
			var statuses []string
			for i, s := range op.Workflow.Steps {
				statuses = append(statuses, s.Status)
				if s.OperationID == "" {
					continue
				}
				if s.OperationID != engine.ChildID("op-flow", i) {
					t.Fatalf("step %d ran as %s, want %s", i, s.OperationID, engine.ChildID("op-flow", i))
				}
				child, err := w.store.GetOperation(ctx, s.OperationID)
				if err != nil || child.ParentID != "op-flow" || child.RequestedBy != "api-token:ops@127.0.0.1" || !child.Status.Terminal() {
					t.Fatalf("child of step %d: %+v (%v)", i, child, err)
				}
			}
			if !slices.Equal(statuses, tc.statuses) {
				t.Fatalf("step statuses %v, want %v", statuses, tc.statuses)
			}
			if tc.status == commands.StatusFailed {
				code := tc.code
				if code == "" {
					code = commands.CodeCloudStackError
				}
				failedStep, _ := op.Details[commands.DetailFailedStep].(map[string]any)
				if op.Details[commands.DetailCompensated] != tc.compensated || op.Details["code"] != code ||
					failedStep["cloudstack_error_code"] == nil || failedStep["code"] != code ||
					op.Details["cloudstack_error_code"] != nil || op.Details[commands.DetailJobMayRun] != nil {
					t.Fatalf("details %v, want compensated %v and the step's CloudStack error under failed_step", op.Details, tc.compensated)
				}
				// The workflow's own keys are its own: step is the step
				// that failed, not the child's.
				failed := slices.IndexFunc(op.Workflow.Steps, func(s commands.WorkflowStep) bool {
					return s.Undoes == nil && s.Status == commands.StepFailed
				})
				if want := fmt.Sprintf("%d:%s:%s", failed, op.Workflow.Steps[failed].Name, op.Workflow.Steps[failed].VolumeID); op.Details[commands.DetailStep] != want ||
					op.Details[commands.DetailStepsTotal] == nil || op.Step != want {
					t.Fatalf("details step %v (op step %q), want %s with steps_total", op.Details[commands.DetailStep], op.Step, want)
				}
				left, _ := op.Details[commands.DetailLeft].([]any)
				if !slices.Equal(left, tc.left) {
					t.Fatalf("left %v, want %v", left, tc.left)
				}
				if steps, _ := op.Details[commands.DetailSteps].([]any); len(steps) != len(tc.statuses) {
					t.Fatalf("details steps %v, want %d", op.Details[commands.DetailSteps], len(tc.statuses))
				}
			}
			if tc.held > 0 && w.guard.asked != 3+tc.held {
				t.Fatalf("guard asked %d times, want %d", w.guard.asked, 3+tc.held)
			}
			// The events show the progress: a step pending, then done.
			var progress []string
			for _, e := range w.events.ops {
				if e.ID == "op-flow" && e.Status == commands.StatusExecuting && e.Details[commands.DetailStep] != nil {
					progress = append(progress, fmt.Sprintf("%v/%v %v", e.Details[commands.DetailStepsDone], e.Details[commands.DetailStepsTotal], e.Details[commands.DetailStep]))
				}
			}
			if tc.status == commands.StatusCompleted && !slices.Equal(progress, []string{"0/3 0:a:vol-a", "1/3 0:a:vol-a", "1/3 1:b:vol-b",
				"2/3 1:b:vol-b", "2/3 2:c:vol-c", "3/3 2:c:vol-c"}) {
				t.Fatalf("progress events %v", progress)
			}
		})
	}
}

// TestWorkflowResumes: a workflow whose executor stopped after step 0's
// child completed, before it recorded the step done, resumes on a new
// claim without running the child again, and creates a missing child.
func TestWorkflowResumes(t *testing.T) {
	w := newFlowWorld(t)
	w.record(t, "op-flow")
	ctx := context.Background()
	// The first executor: step 0 recorded pending, its child completed.
	op, _ := w.store.GetOperation(ctx, "op-flow")
	op.Status, op.Attempts = commands.StatusExecuting, 1
	op.Workflow = &commands.Workflow{Steps: []commands.WorkflowStep{
		{Name: "a", VolumeID: "vol-a", Status: commands.StepPending, OperationID: engine.ChildID("op-flow", 0)},
		{Name: "b", VolumeID: "vol-b", Status: commands.StepPending}, {Name: "c", VolumeID: "vol-c", Status: commands.StepPending}}}
	if _, err := w.store.UpdateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	if _, err := w.store.CreateOperation(ctx, commands.Operation{ID: engine.ChildID("op-flow", 0), Type: typeStep, Status: commands.StatusCompleted,
		ParentID: "op-flow", Request: json.RawMessage(`{"do":"a"}`), Response: &commands.OpResponse{Message: "a"},
		CreatedAt: now, UpdatedAt: now, CompletedAt: &now}); err != nil {
		t.Fatal(err)
	}
	if res := w.engine.Run(ctx, "op-flow", slog.Default()); res != engine.Done {
		t.Fatalf("result %v", res)
	}
	op, _ = w.store.GetOperation(ctx, "op-flow")
	if op.Status != commands.StatusCompleted || op.Attempts != 2 || !slices.Equal(w.did, []string{"b", "c"}) {
		t.Fatalf("%s attempt %d, did %v; want completed on attempt 2, did [b c]", op.Status, op.Attempts, w.did)
	}
}

// TestWorkflowChildFencedByParent: once another executor claimed the
// workflow, the late one writes nothing more: neither a child it has not
// created yet, nor a fenced write of a child it runs (whose own claim
// still holds), and it stops Lost.
func TestWorkflowChildFencedByParent(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		// at takes the workflow over: at the event of the workflow's
		// step 1 pending, or inside step 1's child.
		inside bool
		// child1 is whether step 1's child is recorded after.
		child1 bool
	}{
		{name: "before the step's child is created"},
		{name: "inside the step's child", inside: true, child1: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFlowWorld(t)
			w.record(t, "op-flow")
			takeOver := func() {
				cur, _ := w.store.GetOperation(ctx, "op-flow")
				cur.Attempts++
				if _, err := w.store.UpdateOperation(ctx, cur); err != nil {
					t.Error(err)
				}
			}
			if tc.inside {
				w.during = func(do string) {
					if do == "b" {
						takeOver()
					}
				}
			} else {
				w.events.hook = func(op commands.Operation) {
					if op.ID == "op-flow" && op.Details[commands.DetailStep] == "1:b:vol-b" && op.Workflow.Steps[1].Status == commands.StepPending {
						takeOver()
					}
				}
			}
			if res := w.engine.Run(ctx, "op-flow", slog.Default()); res != engine.Lost {
				t.Fatalf("late executor's result %v, want Lost", res)
			}
			if !slices.Equal(w.did, []string{"a"}) {
				t.Fatalf("did %v, want only [a]", w.did)
			}
			child, err := w.store.GetOperation(ctx, engine.ChildID("op-flow", 1))
			if (err == nil) != tc.child1 || err == nil && child.Status.Terminal() {
				t.Fatalf("step 1's child: %+v (%v)", child, err)
			}
		})
	}
}
