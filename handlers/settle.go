package handlers

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/state"
)

// cloudView is CloudStack's volumes and VMs as one reconcile read them:
// each listed once, in pages, and only when asked.
type cloudView struct {
	cs      csapi.API
	volumes map[string]csapi.Volume // nil until listed
	vms     map[string]csapi.VM     // nil until listed
}

// volumeID is a volume's id, for byID.
func volumeID(v csapi.Volume) string { return v.ID }

// volume returns the volume id as listed; false when CloudStack has none.
// One the listing lacks is asked for by id: a listing in pages misses
// volumes when others are deleted meanwhile.
func (c *cloudView) volume(ctx context.Context, id string) (csapi.Volume, bool, error) {
	if c.volumes == nil {
		vols, err := c.cs.ListVolumes(ctx, csapi.ListFilter{})
		if err != nil {
			return csapi.Volume{}, false, engine.CloudStackError(err)
		}
		c.volumes = byID(vols, volumeID)
	}
	if v, ok := c.volumes[id]; ok {
		return v, true, nil
	}
	v, err := c.cs.GetVolume(ctx, id)
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		return csapi.Volume{}, false, nil
	case err != nil:
		return csapi.Volume{}, false, engine.CloudStackError(err)
	}
	c.volumes[id] = v
	return v, true, nil
}

// vm returns the VM id as listed; false when CloudStack has none.
func (c *cloudView) vm(ctx context.Context, id string) (csapi.VM, bool, error) {
	if c.vms == nil {
		vms, err := c.cs.ListVMs(ctx)
		if err != nil {
			return csapi.VM{}, false, engine.CloudStackError(err)
		}
		c.vms = byID(vms, func(vm csapi.VM) string { return vm.ID })
	}
	v, ok := c.vms[id]
	return v, ok, nil
}

// workflowOf is the workflow whose placements, snapshots and steps the
// failed workflow op left: its own, or, for a rollback that failed before
// its first step, its failover's; nil when neither is recorded.
func (r *reconciler) workflowOf(ctx context.Context, op commands.Operation) (*commands.Workflow, error) {
	if op.Workflow != nil || op.Type != commands.OpRollback {
		return op.Workflow, nil
	}
	var req commands.RollbackRequest
	if err := engine.DecodeRequest(&op, &req); err != nil {
		return nil, nil
	}
	fo, err := r.cfg.Store.GetOperation(ctx, req.FailoverID)
	switch {
	case errors.Is(err, state.ErrNotFound):
		return nil, nil
	case err != nil:
		return nil, state.APIError(err)
	}
	return fo.Workflow, nil
}

// settleIfBack settles the failed workflow op when nothing it left
// remains: true then, with the change in words ("" when another instance
// recorded it first); false with the first thing that remains otherwise.
func (r *reconciler) settleIfBack(ctx context.Context, op commands.Operation, view *cloudView) (bool, string, error) {
	wf, err := r.workflowOf(ctx, op)
	if err != nil {
		return false, "", err
	}
	what, gone, err := r.remains(ctx, op, wf, view)
	if err != nil || what != "" {
		return false, what, err
	}
	change, err := r.settle(ctx, op, gone)
	return err == nil, change, err
}

// remains names one thing the failed workflow op (not compensated) left
// that CloudStack or volumed's export records still show; "" when
// nothing remains: no failed step's job may still run (its child
// operation job_may_run); each volume of wf.Before attached where it
// was (same VM, same device when recorded) or detached when it was,
// exported as it was; each snapshot of wf.Snapshots gone, and none taken by a snapshot
// step whose end is unknown; a VM the workflow started (or whose start
// failed), or did not stop, stopped. A volume of wf.Before that CloudStack
// no longer has (deleted since) holds nothing the workflow left: it is
// returned among gone, and not checked. It reads CloudStack only through
// view, and GetSnapshot and ListSnapshots for the snapshots.
func (r *reconciler) remains(ctx context.Context, op commands.Operation, wf *commands.Workflow, view *cloudView) (what string, gone []string, err error) {
	if wf == nil || len(wf.Before) == 0 {
		return "its workflow is not recorded", nil, nil
	}
	what, err = r.remainsOn(ctx, op, wf, view, &gone)
	return what, gone, err
}

// remainsOn is remains, adding the volumes CloudStack no longer has to
// gone.
func (r *reconciler) remainsOn(ctx context.Context, op commands.Operation, wf *commands.Workflow, view *cloudView, gone *[]string) (string, error) {
	for i, s := range wf.Steps {
		if s.Status != commands.StepFailed || s.OperationID == "" {
			continue
		}
		child, err := r.cfg.Store.GetOperation(ctx, s.OperationID)
		switch {
		case errors.Is(err, state.ErrNotFound):
		case err != nil:
			return "", state.APIError(err)
		case child.Details[commands.DetailJobMayRun] == true:
			return fmt.Sprintf("the CloudStack job of step %d (%s, operation %s) may still run", i, s.Name, s.OperationID), nil
		}
	}
	for _, v := range slices.Sorted(maps.Keys(wf.Before)) {
		before := wf.Before[v]
		vol, ok, err := view.volume(ctx, v)
		switch {
		case err != nil:
			return "", err
		case !ok:
			*gone = append(*gone, v)
			continue
		case vol.VMID != before.VMID && vol.VMID == "":
			return fmt.Sprintf("volume %s is detached", v), nil
		case vol.VMID != before.VMID:
			return fmt.Sprintf("volume %s is attached to VM %s", v, vol.VMID), nil
		case before.DeviceID != nil && (vol.DeviceID == nil || *vol.DeviceID != *before.DeviceID):
			return fmt.Sprintf("volume %s is not at device %d of VM %s", v, *before.DeviceID, before.VMID), nil
		}
		if before.ExportName == "" {
			continue
		}
		e, err := r.cfg.Store.GetExport(ctx, v)
		switch {
		case errors.Is(err, state.ErrNotFound):
			return fmt.Sprintf("volume %s is not exported as %s", v, before.ExportName), nil
		case err != nil:
			return "", state.APIError(err)
		case e.ExportName != before.ExportName || e.ReadOnly != before.ExportReadOnly ||
			(before.ExportVMID != "" && e.VMID != before.ExportVMID):
			return fmt.Sprintf("volume %s is not exported as it was (%s)", v, before.ExportName), nil
		}
	}
	for _, v := range slices.Sorted(maps.Keys(wf.Snapshots)) {
		snap := wf.Snapshots[v]
		if snap == "" {
			continue
		}
		_, err := r.cfg.CloudStack.GetSnapshot(ctx, snap)
		switch {
		case errors.Is(err, csapi.ErrNotFound):
		case err != nil:
			return "", engine.CloudStackError(err)
		default:
			return fmt.Sprintf("snapshot %s of volume %s remains", snap, v), nil
		}
	}
	up := map[string]bool{} // VMs the workflow may have left running
	for _, s := range wf.Steps {
		switch {
		case s.Name == kinds.WfSnapshot && s.Status == commands.StepFailed && wf.Snapshots[s.VolumeID] == "":
			snap, err := r.takenSince(ctx, s.VolumeID, op.CreatedAt)
			if err != nil {
				return "", err
			}
			if snap != "" {
				return fmt.Sprintf("snapshot %s of volume %s may be the workflow's", snap, s.VolumeID), nil
			}
		case s.Name == kinds.WfStartVM && (s.Status == commands.StepDone || s.Status == commands.StepFailed):
			// A start that failed may have been done: its job's end
			// can be unknown.
			up[s.VMID] = true
		case s.Name == kinds.WfStopVM:
			up[s.VMID] = s.Status != commands.StepDone
		}
	}
	for _, id := range slices.Sorted(maps.Keys(up)) {
		if !up[id] {
			continue
		}
		vm, ok, err := view.vm(ctx, id)
		switch {
		case err != nil:
			return "", err
		case ok && vm.State != kinds.VMStopped:
			return fmt.Sprintf("VM %s is %s", id, vm.State), nil
		}
	}
	return "", nil
}

// takenSince returns a snapshot of volume taken at or after since (one
// whose time CloudStack does not tell counts), "" when there is none.
func (r *reconciler) takenSince(ctx context.Context, volume string, since time.Time) (string, error) {
	snaps, err := r.cfg.CloudStack.ListSnapshots(ctx, csapi.SnapshotFilter{VolumeID: volume})
	if err != nil {
		return "", engine.CloudStackError(err)
	}
	for _, s := range snaps {
		at, err := time.Parse(csapi.TimeLayout, s.Created)
		if err != nil || !at.Before(since.Truncate(time.Second)) {
			return s.ID, nil
		}
	}
	return "", nil
}

// settle records on the failed workflow op that nothing it left remains
// (details settled_at, and volumes_gone: gone, the volumes CloudStack no
// longer has), by compare-and-swap on its revision; on a conflict it
// reads the operation again and records it there unless it is settled
// already. It returns the change in words, "" when another instance
// recorded it first.
func (r *reconciler) settle(ctx context.Context, op commands.Operation, gone []string) (string, error) {
	for range 3 {
		now := time.Now().UTC()
		note := op
		note.Details = maps.Clone(op.Details)
		note.Details[commands.DetailSettledAt] = now.Format(time.RFC3339)
		if len(gone) > 0 {
			note.Details[commands.DetailVolumesGone] = gone
		}
		note.UpdatedAt = now
		saved, err := r.cfg.Store.UpdateOperation(ctx, note)
		if err == nil {
			r.pub.PublishOperation(ctx, saved)
			r.log.Info("workflow settled", "operation_id", op.ID, "type", op.Type, "volumes_gone", gone)
			if len(gone) > 0 {
				return fmt.Sprintf("%s %s: what it left was put back, but for volumes %s, deleted since; no longer reported",
					op.Type, op.ID, strings.Join(gone, ", ")), nil
			}
			return fmt.Sprintf("%s %s: what it left was put back; no longer reported", op.Type, op.ID), nil
		}
		if !errors.Is(err, state.ErrStale) {
			return "", state.APIError(err)
		}
		op, err = r.cfg.Store.GetOperation(ctx, op.ID)
		switch {
		case errors.Is(err, state.ErrNotFound):
			return "", nil // pruned meanwhile
		case err != nil:
			return "", state.APIError(err)
		case settled(op):
			return "", nil
		}
	}
	return "", fmt.Errorf("operation %s kept changing: %w", op.ID, state.ErrStale)
}

// settled reports whether the reconcile recorded that nothing the failed
// workflow op left remains.
func settled(op commands.Operation) bool {
	_, ok := op.Details[commands.DetailSettledAt]
	return ok
}
