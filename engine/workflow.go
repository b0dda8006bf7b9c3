package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/state"
)

// A workflow (a failover, a rollback) is one operation whose kind runs a
// plan of steps, each a child operation of an ordinary type run inline
// through the engine: it is claimed, journaled and fenced like any other,
// and every write it makes is fenced by the workflow's claim too.

// childSpace is the UUID namespace of child operation ids.
var childSpace = uuid.MustParse("4f1c2a7e-9b3d-5c1e-8a6f-0d2b7e4c9a10")

// ChildID is the id of the child operation that runs step index of the
// workflow parentID: "op-" and the UUID v5 of parentID + "/" + index. A
// resumed workflow finds its children by it.
func ChildID(parentID string, index int) string {
	return "op-" + uuid.NewSHA1(childSpace, []byte(parentID+"/"+strconv.Itoa(index))).String()
}

// Child is the operation that runs one step of a workflow.
type Child struct {
	// Type is its operation type.
	Type commands.OpType
	// VolumeID and VMID are recorded on it.
	VolumeID string
	VMID     *string
	// Request is its request, recorded as JSON.
	Request any
}

// guardWait paces the retries of a child whose guard is held elsewhere,
// and of one another executor took over while the workflow's claim holds.
var guardWait = backoff.Policy{Min: 50 * time.Millisecond, Max: 2 * time.Second}

// RunChild runs step index of the journal's workflow as the child c and
// returns the child as it ended. The child is found by its id
// (ChildID), created if missing with the workflow's RequestedBy and
// ParentID, and run inline (Run) under the engine's Guard; a guard held
// elsewhere is waited for. A child that stops unfinished stops the
// workflow (ErrStopped); one that another executor took over while the
// workflow's claim still holds is run again, and ErrLost otherwise.
func (j *Journal) RunChild(ctx context.Context, index int, c Child) (commands.Operation, error) {
	if j.eng == nil {
		return commands.Operation{}, commands.Internal("operation %s: a workflow needs a journal of the engine", j.Op.ID)
	}
	id := ChildID(j.Op.ID, index)
	child, err := j.ops.GetOperation(ctx, id)
	switch {
	case errors.Is(err, state.ErrNotFound):
		if child, err = j.createChild(ctx, id, c); err != nil {
			return child, err
		}
	case err != nil:
		return child, fmt.Errorf("%w: read step %d (%s): %w", ErrStopped, index, id, err)
	}
	log := j.log.With("child_id", id, "child_type", child.Type, "step_index", index)
	wait := guardWait.Start()
	for !child.Status.Terminal() {
		if err := j.Check(ctx); err != nil {
			return child, err
		}
		res := Stopped
		run := func(ctx context.Context) { res = j.eng.run(ctx, id, log, j) }
		if g := j.eng.cfg.Guard; g != nil {
			err = g.Exclusive(ctx, child, run)
		} else {
			run(ctx)
		}
		switch {
		case res == Done: // ended, whatever the guard's release said
		case errors.Is(err, state.ErrLeaseHeld):
			log.Info("step waits: what it must hold is held elsewhere", "err", err)
		case err != nil:
			return child, fmt.Errorf("%w: step %d: %w", ErrStopped, index, err)
		case res == Stopped:
			return child, fmt.Errorf("%w: step %d (%s) stopped unfinished", ErrStopped, index, id)
		case res == Lost:
			if err := j.Check(ctx); err != nil {
				return child, err
			}
			log.Warn("step taken over by a late executor while this one holds the workflow; running it again")
		}
		if res != Done {
			if !wait.Wait(ctx, 0) {
				return child, fmt.Errorf("%w: step %d: %w", ErrStopped, index, context.Cause(ctx))
			}
		}
		if child, err = j.ops.GetOperation(ctx, id); err != nil {
			return child, fmt.Errorf("%w: read step %d (%s): %w", ErrStopped, index, id, err)
		}
	}
	return child, nil
}

// createChild records the child id of c, pending; an id already recorded
// (another executor created it) is read instead.
func (j *Journal) createChild(ctx context.Context, id string, c Child) (commands.Operation, error) {
	raw, err := json.Marshal(c.Request)
	if err != nil {
		return commands.Operation{}, commands.Internal("request of step %s: %v", id, err)
	}
	if err := j.Check(ctx); err != nil {
		return commands.Operation{}, err // a late executor creates nothing
	}
	now := time.Now().UTC()
	child, err := j.ops.CreateOperation(ctx, commands.Operation{ID: id, Type: c.Type, Status: commands.StatusPending,
		VolumeID: c.VolumeID, VMID: c.VMID, Request: raw, RequestedBy: j.Op.RequestedBy, ParentID: j.Op.ID,
		CreatedAt: now, UpdatedAt: now})
	switch {
	case errors.Is(err, state.ErrExists):
		child, err = j.ops.GetOperation(ctx, id)
	case err == nil:
		j.pub.PublishOperation(ctx, child)
	}
	if err != nil {
		return child, fmt.Errorf("%w: record step %s: %w", ErrStopped, id, err)
	}
	return child, nil
}

// Plan is a workflow kind's part of the run: the steps themselves are on
// the operation (Op.Workflow.Steps), written by the kind before RunWorkflow.
type Plan struct {
	// Child returns the child operation that runs wf.Steps[i].
	Child func(wf *commands.Workflow, i int) (Child, error)
	// Done records on wf what the completed child of wf.Steps[i] returned
	// (a snapshot's id, say), or what a failed one's job did after all
	// (in its details); nil records nothing.
	Done func(wf *commands.Workflow, i int, child commands.Operation)
	// Undo returns the steps that undo the done forward step wf.Steps[i],
	// in the order they run; none when it needs no undoing. A nil Undo
	// makes a workflow that is not compensated (a rollback, itself the
	// undo): a step that fails for good ends it.
	Undo func(wf *commands.Workflow, i int) []commands.WorkflowStep
	// Left says what is left where when the workflow ends failed and not
	// compensated.
	Left func(wf *commands.Workflow) []string
}

// RunWorkflow runs the plan of the journal's workflow from where its
// record shows it: each step's child is recorded on the step (pending)
// before it runs, and the step done or failed after, every save an event
// whose details carry steps_done, steps_total and step. A step whose
// child failed while its CloudStack job may still run is settled by the
// job first (settleJob). When a step fails
// for good, the undo steps of the done forward steps run, in reverse
// order, as children too (Compensating); the workflow then fails with
// the failed step's error and details compensated (true when everything
// done was undone), steps, and left (what is left where) when not. It
// returns nil once every forward step is done.
func (j *Journal) RunWorkflow(ctx context.Context, p Plan) error {
	wf := j.Op.Workflow
	if wf == nil {
		return commands.Internal("operation %s has no workflow", j.Op.ID)
	}
	for i := 0; !wf.Compensating && i < len(wf.Steps); i++ {
		if wf.Steps[i].Status == commands.StepDone {
			continue
		}
		child, err := j.runStep(ctx, p, i)
		switch {
		case err != nil:
			return err
		case child.Status == commands.StatusCompleted:
			continue
		}
		// What the step did is CloudStack's to say when its job may still
		// run: the job decides it before anything is undone.
		if child, err = j.settleJob(ctx, child); err != nil {
			return err
		}
		ran := jobRan(child)
		if ran == commands.JobSucceeded && p.Done != nil {
			p.Done(wf, i, child)
		}
		if p.Undo == nil {
			if ran != commands.JobSucceeded {
				return j.failed(p, i, child)
			}
			wf.Steps[i].Status = commands.StepDone // its job did it after all
			if err := j.saveProgress(ctx, i); err != nil {
				return err
			}
			continue
		}
		// The failure and the undo plan are recorded in one save.
		j.compensate(p, i, ran == commands.JobSucceeded)
		if err := j.saveProgress(ctx, i); err != nil {
			return err
		}
	}
	if !wf.Compensating {
		return nil
	}
	for i := range wf.Steps {
		s := &wf.Steps[i]
		switch {
		case s.Undoes == nil || s.Status != commands.StepPending:
			continue
		case s.OperationID == "" && j.skipped(i):
			s.Status = commands.StepSkipped
			continue
		}
		child, err := j.runStep(ctx, p, i)
		if err != nil {
			return err
		}
		if child.Status != commands.StatusCompleted {
			if child, err = j.settleJob(ctx, child); err != nil {
				return err
			}
			if jobRan(child) == commands.JobSucceeded {
				s.Status = commands.StepDone // its job did it after all
			}
			if err := j.saveProgress(ctx, i); err != nil {
				return err
			}
		}
	}
	failed := slices.IndexFunc(wf.Steps, func(s commands.WorkflowStep) bool {
		return s.Undoes == nil && s.Status == commands.StepFailed
	})
	if failed < 0 {
		return commands.Internal("workflow %s compensates, but no step of it failed", j.Op.ID)
	}
	child, err := j.ops.GetOperation(ctx, wf.Steps[failed].OperationID)
	switch {
	case errors.Is(err, state.ErrNotFound): // pruned by the retention
		child = commands.Operation{ID: wf.Steps[failed].OperationID, Error: "its operation's record is gone"}
	case err != nil:
		return fmt.Errorf("%w: read failed step %d: %w", ErrStopped, failed, err)
	}
	return j.failed(p, failed, child)
}

// runStep runs wf.Steps[i]: recorded pending with its child's id, the
// child run, and the step recorded done; a failed step is marked failed
// for the caller to record with what follows from it.
func (j *Journal) runStep(ctx context.Context, p Plan, i int) (commands.Operation, error) {
	wf := j.Op.Workflow
	c, err := p.Child(wf, i)
	if err != nil {
		return commands.Operation{}, err
	}
	if s := &wf.Steps[i]; s.OperationID == "" || s.Status != commands.StepPending {
		s.OperationID, s.Status = ChildID(j.Op.ID, i), commands.StepPending
		if err := j.saveProgress(ctx, i); err != nil {
			return commands.Operation{}, err
		}
	}
	child, err := j.RunChild(ctx, i, c)
	if err != nil {
		return child, err
	}
	s := &wf.Steps[i]
	if child.Status != commands.StatusCompleted {
		s.Status = commands.StepFailed
		j.log.Warn("workflow step failed", "step_index", i, "step", s.Name, "step_volume_id", s.VolumeID, "child_id", child.ID, "err", child.Error)
		return child, nil
	}
	s.Status = commands.StepDone
	if p.Done != nil {
		p.Done(wf, i, child)
	}
	return child, j.saveProgress(ctx, i)
}

// compensate turns the workflow to its undo: the undo steps of every done
// forward step, last first, and of the failed step i when its child's
// CloudStack job did it after all (jobDid).
func (j *Journal) compensate(p Plan, i int, jobDid bool) {
	wf := j.Op.Workflow
	wf.Compensating = true
	forward := len(wf.Steps)
	for k := forward - 1; k >= 0; k-- {
		if wf.Steps[k].Status != commands.StepDone && (k != i || !jobDid) {
			continue
		}
		for _, u := range p.Undo(wf, k) {
			u.Undoes, u.Status, u.OperationID = &k, commands.StepPending, ""
			wf.Steps = append(wf.Steps, u)
		}
	}
	j.log.Warn("workflow step failed for good; undoing what was done", "step_index", i, "undo_steps", len(wf.Steps)-forward)
}

// settleJob resolves the CloudStack job that the failed child of a step
// timed out on (details job_may_run true), before the workflow decides
// what the step did: it waits for the job's end, at most the step
// timeout, has the child's kind say what that means (ResolveJob, as the
// reconcile does) and records it on the child by compare-and-swap. A job
// still running then, or one CloudStack cannot be asked about, is left to
// the reconcile: what the step did is unknown (jobRan).
func (j *Journal) settleJob(ctx context.Context, child commands.Operation) (commands.Operation, error) {
	jobs := j.eng.cfg.Jobs
	if child.Details[commands.DetailJobMayRun] != true || jobs == nil {
		return child, nil
	}
	k, _ := j.eng.kinds[child.Type].(Resolver)
	wait, cancel := context.WithTimeout(ctx, j.timing.StepTimeout)
	defer cancel()
	res, err := ResolveJob(wait, k, child, VolumeLook(jobs, j.ops, child), func(ctx context.Context, id string) (csapi.Job, error) {
		job, err := jobs.WaitJob(ctx, id)
		switch {
		case job.Status == csapi.JobFailure:
			return job, nil // its error is the job's, not the call's
		case err != nil && ctx.Err() != nil:
			return csapi.Job{ID: id, Status: csapi.JobPending}, nil
		}
		return job, err
	})
	switch {
	case ctx.Err() != nil:
		return child, fmt.Errorf("%w: resolve the job of %s: %w", ErrStopped, child.ID, context.Cause(ctx))
	case err != nil || res.Pending:
		j.log.Warn("what a failed step's CloudStack job did is unknown; the reconcile follows it", "child_id", child.ID,
			"cloudstack_job_id", res.JobID, "pending", res.Pending, "err", err)
		return child, nil
	}
	if err := j.Check(ctx); err != nil {
		return child, err
	}
	saved, err := j.ops.UpdateOperation(ctx, res.Record(child, time.Now().UTC()))
	switch {
	case errors.Is(err, state.ErrStale): // resolved meanwhile (the reconcile): as recorded
		saved, err = j.ops.GetOperation(ctx, child.ID)
	case err == nil:
		j.pub.PublishOperation(ctx, saved)
	}
	if err != nil {
		return child, fmt.Errorf("%w: record the job of %s: %w", ErrStopped, child.ID, err)
	}
	j.log.Info("failed step's CloudStack job resolved", "child_id", child.ID, "cloudstack_job_id", res.JobID,
		"job_status", res.Status)
	return saved, nil
}

// jobRan says what the CloudStack job of a failed child did, as resolved:
// commands.JobSucceeded, JobFailed or JobUnknown (also while it may still
// run); "" for a child that failed without a job left running.
func jobRan(child commands.Operation) string {
	if child.Details[commands.DetailJobMayRun] == true {
		return commands.JobUnknown
	}
	s, _ := child.Details[commands.DetailJobStatus].(string)
	return s
}

// skipped reports whether undo step i must not run: an earlier undo step
// of its volume failed, so what it undoes is not where it expects.
func (j *Journal) skipped(i int) bool {
	s := j.Op.Workflow.Steps[i]
	if s.VolumeID == "" {
		return false
	}
	for _, o := range j.Op.Workflow.Steps[:i] {
		if o.Undoes != nil && o.VolumeID == s.VolumeID && (o.Status == commands.StepFailed || o.Status == commands.StepSkipped) {
			return true
		}
	}
	return false
}

// failed ends the workflow after step i failed for good (its child): the
// code and error of the child, with the workflow's own details (step,
// steps_done, steps_total, compensated, steps and left) and the child's
// under failed_step.
func (j *Journal) failed(p Plan, i int, child commands.Operation) error {
	wf := j.Op.Workflow
	compensated := wf.Compensating
	if compensated {
		undone := map[int]bool{}
		for _, s := range wf.Steps {
			if s.Undoes != nil {
				ok, seen := undone[*s.Undoes]
				undone[*s.Undoes] = (ok || !seen) && s.Status == commands.StepDone
			}
		}
		for k, ok := range undone {
			switch {
			case !ok:
				compensated = false
			case wf.Steps[k].Status == commands.StepDone:
				wf.Steps[k].Status = commands.StepUndone
			}
		}
	}
	s := wf.Steps[i]
	var unknown string
	if jobRan(child) == commands.JobUnknown {
		// Nobody knows whether the failed step's job did it: not
		// compensated, whatever else was undone.
		compensated = false
		jobID, _ := child.Details[commands.DetailJobID].(string)
		why, _ := child.Details[commands.DetailResolution].(string)
		if why == "" {
			why = "it still ran when the workflow gave up waiting; the reconcile records its end on operation " + child.ID
		}
		job := "its CloudStack job"
		if jobID != "" {
			job += " " + jobID
		}
		unknown = fmt.Sprintf("step %d (%s %s) may have been done: what %s did is unknown (%s)", i, s.Name, stepTarget(s), job, why)
	}
	code := commands.CodeInternalError
	if c, ok := child.Details["code"].(string); ok {
		code = c
	}
	what := "not compensated"
	if compensated {
		what = "everything done was undone"
	}
	j.progress(i)
	e := &commands.Error{Code: code, Message: fmt.Sprintf("step %d (%s %s) failed: %s; %s",
		i, s.Name, stepTarget(s), child.Error, what), Details: maps.Clone(j.Op.Details)}
	// The child's details are its own (its step, its job, which the
	// reconcile follows on the child), under a key of their own.
	if child.Details != nil {
		e.Details[commands.DetailFailedStep] = maps.Clone(child.Details)
	}
	e.Details[commands.DetailCompensated] = compensated
	e.Details[commands.DetailSteps] = slices.Clone(wf.Steps)
	if !compensated {
		var left []string
		if p.Left != nil {
			left = p.Left(wf)
		}
		if unknown != "" {
			left = append(left, unknown)
		}
		if p.Left != nil || unknown != "" {
			e.Details[commands.DetailLeft] = left
		}
	}
	return e
}

// stepTarget names what a step works on, for people.
func stepTarget(s commands.WorkflowStep) string {
	switch {
	case s.VolumeID != "" && s.VMID != "":
		return "volume " + s.VolumeID + ", VM " + s.VMID
	case s.VolumeID != "":
		return "volume " + s.VolumeID
	}
	return "VM " + s.VMID
}

// stepLabel is a workflow's Op.Step while step i runs:
// "<index>:<name>:<volume>".
func stepLabel(i int, s commands.WorkflowStep) string {
	return strconv.Itoa(i) + ":" + s.Name + ":" + s.VolumeID
}

// saveProgress records the workflow at step i, with its progress in
// Details.
func (j *Journal) saveProgress(ctx context.Context, i int) error {
	j.progress(i)
	return j.Save(ctx)
}

// progress sets the workflow's Step to step i and its Details to its
// progress: steps_done, steps_total and step.
func (j *Journal) progress(i int) {
	wf := j.Op.Workflow
	done := 0
	for _, s := range wf.Steps {
		if s.Status == commands.StepDone || s.Status == commands.StepUndone {
			done++
		}
	}
	j.Op.Step = stepLabel(i, wf.Steps[i])
	j.Op.Details = map[string]any{commands.DetailStepsDone: done, commands.DetailStepsTotal: len(wf.Steps),
		commands.DetailStep: j.Op.Step}
}
