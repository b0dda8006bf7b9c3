package kinds

import (
	"context"
	"errors"
	"fmt"
	"maps"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// rollback puts back the volumes of a completed test failover: the VM
// stopped (forced after the grace period), each volume detached from it,
// reverted to its failover snapshot, attached back where it was (as root
// when it was device 0) and exported again under its export name, then
// the snapshots deleted. It is the undo itself: a step that fails for
// good ends it failed, not compensated, saying what is left where; a
// rollback asked again plans from where each volume is then.
type rollback struct{ Deps }

var _ engine.Accepter = rollback{}

func (rollback) Type() commands.OpType { return commands.OpRollback }

func (rollback) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "rollback", Subject: commands.SubjectRollback}}
}

// Decode reads a rollback: its failover must be recorded (404) and be a
// failover (409); its operation takes the failover's volumes and VM. The pre-checks: the
// failover is a completed test failover, and no rollback of it is
// pending, executing or completed (409).
func (k rollback) Decode(ctx context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeRollback(data)
	if err != nil {
		return engine.Command{}, err
	}
	fo, freq, err := k.failoverOf(ctx, req.FailoverID)
	switch {
	case err != nil:
		return engine.Command{}, err
	case fo.Type != commands.OpFailover:
		return engine.Command{}, commands.Conflict("operation %s is not a failover: its type is %s", fo.ID, fo.Type).WithDetail("failover_id", fo.ID)
	}
	vm := freq.VMID
	return engine.Command{VolumeID: freq.RootVolumeID, VMID: &vm, VolumeIDs: freq.Volumes(), Request: req,
		Check: func(ctx, _ context.Context) error {
			switch {
			case fo.Status != commands.StatusCompleted:
				return commands.Conflict("failover %s is %s; only a completed test failover is rolled back", fo.ID, fo.Status).
					WithDetail("failover_id", fo.ID).WithDetail("status", fo.Status)
			case !freq.Test || fo.Workflow == nil:
				return commands.Conflict("failover %s is a live failover (test false): it took no snapshots to roll back to", fo.ID).
					WithDetail("failover_id", fo.ID)
			}
			other, err := k.rollbackOf(ctx, fo)
			if err != nil {
				return state.APIError(err)
			}
			if other != nil {
				return commands.Conflict("failover %s has a rollback already: %s, %s", fo.ID, other.ID, other.Status).
					WithDetail("failover_id", fo.ID).WithDetail("rollback_id", other.ID)
			}
			return nil
		}}, nil
}

// failoverOf reads a failover and its request: 404 when not recorded.
func (d Deps) failoverOf(ctx context.Context, id string) (commands.Operation, commands.FailoverRequest, error) {
	var req commands.FailoverRequest
	fo, err := d.Operations.GetOperation(ctx, id)
	switch {
	case errors.Is(err, state.ErrNotFound):
		return fo, req, commands.NotFound("failover %s not found", id).WithDetail("failover_id", id)
	case err != nil:
		return fo, req, state.APIError(err)
	case fo.Type != commands.OpFailover:
		return fo, req, nil
	}
	return fo, req, engine.DecodeRequest(&fo, &req)
}

// rollbackOf returns a rollback of fo that is pending, executing or
// completed, nil when there is none.
func (d Deps) rollbackOf(ctx context.Context, fo commands.Operation) (*commands.Operation, error) {
	rbs, err := state.RollbacksOf(ctx, d.Operations, fo.ID, fo.VolumeID)
	if err != nil {
		return nil, err
	}
	for _, op := range rbs {
		if op.Status != commands.StatusFailed && op.Status != commands.StatusCancelled {
			return &op, nil
		}
	}
	return nil, nil
}

// reverted returns the volumes an earlier rollback of fo reverted.
func (d Deps) reverted(ctx context.Context, fo commands.Operation) (map[string]bool, error) {
	rbs, err := state.RollbacksOf(ctx, d.Operations, fo.ID, fo.VolumeID)
	if err != nil {
		return nil, fmt.Errorf("%w: rollbacks of failover %s: %w", engine.ErrStopped, fo.ID, err)
	}
	out := map[string]bool{}
	for _, rb := range rbs {
		if rb.Workflow == nil {
			continue
		}
		for _, s := range rb.Workflow.Steps {
			if s.Name == WfRevert && s.Status == commands.StepDone {
				out[s.VolumeID] = true
			}
		}
	}
	return out, nil
}

func (k rollback) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.RollbackRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	fo, freq, err := k.failoverOf(ctx, req.FailoverID)
	var ce *commands.Error
	switch {
	case errors.As(err, &ce) && ce.Code == commands.CodeNotFound:
		return nil, err
	case err != nil:
		return nil, fmt.Errorf("%w: read failover %s: %w", engine.ErrStopped, req.FailoverID, err)
	case fo.Workflow == nil:
		return nil, commands.Conflict("failover %s recorded no workflow to roll back", fo.ID)
	}
	if j.Op.Workflow == nil {
		reverted, err := k.reverted(ctx, fo)
		if err != nil {
			return nil, err
		}
		wf, err := k.plan(ctx, j, freq, fo.Workflow, reverted)
		if err != nil {
			return nil, err
		}
		j.Op.Workflow = wf // recorded with its first step
	}
	w := workflow{Deps: k.Deps, root: freq.RootVolumeID, graceful: true}
	if err := j.RunWorkflow(ctx, engine.Plan{Child: w.child, Left: w.left}); err != nil {
		return nil, err
	}
	wf := j.Op.Workflow
	return &commands.OpResponse{VolumeID: freq.RootVolumeID, VMID: freq.VMID, Before: wf.Before, Steps: wf.Steps,
		Message: fmt.Sprintf("Rolled back failover %s: %d volume(s) back where they were", fo.ID, len(freq.Volumes()))}, nil
}

// plan decides the rollback's steps from where each volume is now: on
// the test VM (detach, revert, attach back, export), detached (revert,
// attach back, export), or back where it was (its export again if it
// lacks it; a volume detached before the failover is back once an
// earlier rollback reverted it, in reverted); then the snapshots'
// deletion. The VM is stopped first. A volume on any other VM fails the
// rollback before any step.
func (k rollback) plan(ctx context.Context, j *engine.Journal, freq commands.FailoverRequest, fwf *commands.Workflow,
	reverted map[string]bool) (*commands.Workflow, error) {
	wf := &commands.Workflow{Before: maps.Clone(fwf.Before), Snapshots: maps.Clone(fwf.Snapshots)}
	stop := []commands.WorkflowStep{{Name: WfStopVM, VMID: freq.VMID}}
	var detaches, reverts, attaches, exports, deletes []commands.WorkflowStep
	for _, v := range freq.Volumes() {
		vol, err := k.volume(ctx, j, v)
		if err != nil {
			return nil, notFoundOr(err, v)
		}
		before := wf.Before[v]
		back := vol.VMID == before.VMID && (before.VMID != "" || reverted[v])
		switch {
		case vol.VMID == freq.VMID:
			detaches = append(detaches, commands.WorkflowStep{Name: WfDetach, VolumeID: v, VMID: freq.VMID})
		case back, vol.VMID == "":
		default:
			left, err := k.asIs(ctx, j, freq, wf)
			if err != nil {
				return nil, err
			}
			return nil, commands.Conflict("volume %s is on VM %s, neither the failover's VM %s nor where it was", v, vol.VMID, freq.VMID).
				WithDetail("volume_id", v).WithDetail("vm_id", vol.VMID).
				WithDetail(commands.DetailCompensated, false).WithDetail(commands.DetailSteps, []commands.WorkflowStep{}).
				WithDetail(commands.DetailLeft, left)
		}
		if !back {
			if err := k.snapshotThere(ctx, j, freq, wf, v); err != nil {
				return nil, err
			}
			reverts = append(reverts, commands.WorkflowStep{Name: WfRevert, VolumeID: v})
			if before.VMID != "" {
				attaches = append(attaches, commands.WorkflowStep{Name: WfAttach, VolumeID: v, VMID: before.VMID})
			}
		}
		if before.ExportName != "" {
			has, err := k.Exports.HasExport(ctx, v)
			if err != nil {
				return nil, fmt.Errorf("%w: export record of %s: %w", engine.ErrStopped, v, err)
			}
			if !back || !has {
				exports = append(exports, commands.WorkflowStep{Name: WfExport, VolumeID: v, VMID: before.ExportVMID})
			}
		}
		if wf.Snapshots[v] != "" {
			deletes = append(deletes, commands.WorkflowStep{Name: WfDeleteSnapshot, VolumeID: v})
		}
	}
	for _, steps := range [][]commands.WorkflowStep{stop, detaches, reverts, attaches, exports, deletes} {
		for _, s := range steps {
			s.Status = commands.StepPending
			wf.Steps = append(wf.Steps, s)
		}
	}
	return wf, nil
}

// snapshotThere checks that CloudStack has the failover snapshot the
// rollback reverts v to. Without it no rollback can complete: it fails
// NOT_FOUND before any step, so the test VM keeps the volumes rather than
// the rollback leaving them detached and half reverted.
func (k rollback) snapshotThere(ctx context.Context, j *engine.Journal, freq commands.FailoverRequest, wf *commands.Workflow, v string) error {
	snap := wf.Snapshots[v]
	_, err := k.snapshotOf(ctx, j, snap)
	switch {
	case err == nil:
		return nil
	case !errors.Is(err, csapi.ErrNotFound):
		return engine.Failure(err)
	}
	kept := *wf
	kept.Snapshots = maps.Clone(wf.Snapshots)
	delete(kept.Snapshots, v)
	left, err := k.asIs(ctx, j, freq, &kept)
	if err != nil {
		return err
	}
	return SnapshotNotFound(snap).WithDetail("volume_id", v).
		WithDetail(commands.DetailCompensated, false).WithDetail(commands.DetailSteps, []commands.WorkflowStep{}).
		WithDetail(commands.DetailLeft, left)
}

// asIs is what a rollback that did nothing leaves where: each of the
// failover's volumes not where it was before the failover (or without
// its export), and the failover's snapshots, kept.
func (k rollback) asIs(ctx context.Context, j *engine.Journal, freq commands.FailoverRequest, wf *commands.Workflow) ([]string, error) {
	var left, kept []string
	for _, v := range freq.Volumes() {
		vol, err := k.volume(ctx, j, v)
		if err != nil {
			return nil, notFoundOr(err, v)
		}
		before := wf.Before[v]
		switch {
		case vol.VMID == before.VMID && before.ExportName != "":
			has, err := k.Exports.HasExport(ctx, v)
			if err != nil {
				return nil, fmt.Errorf("%w: export record of %s: %w", engine.ErrStopped, v, err)
			}
			if !has {
				left = append(left, fmt.Sprintf("volume %s is on VM %s but not exported; it was exported as %s", v, vol.VMID, before.ExportName))
			}
		case vol.VMID == before.VMID:
		case vol.VMID == "":
			left = append(left, fmt.Sprintf("volume %s is detached; it was %s", v, wasAt(before)))
		default:
			left = append(left, fmt.Sprintf("volume %s is attached to VM %s; it was %s", v, vol.VMID, wasAt(before)))
		}
		if snap := wf.Snapshots[v]; snap != "" {
			kept = append(kept, fmt.Sprintf("snapshot %s of volume %s is kept", snap, v))
		}
	}
	return append(left, kept...), nil
}
