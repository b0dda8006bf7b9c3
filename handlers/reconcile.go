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

// Reconcile records what became of the CloudStack jobs that failed
// operations timed out on (resolveJobs), compares the mappings with
// CloudStack (and, through the device agents, with the devices present),
// repairs what drifted, and queues again any unfinished operation whose
// job is missing from the work queue. It is
// POST /admin/force-sync; it waits for the reconcile lease, so one runs at
// a time across the instances (the periodic sync skips its turn instead).
// A volume or VM that cannot be checked is skipped and named in the
// result's errors; the rest is still repaired.
func (s *Service) Reconcile(ctx context.Context) (commands.SyncResult, error) {
	var res commands.SyncResult
	err := s.leases.Leased(ctx, engine.LeaseReconcile, true, func(ctx context.Context) error {
		var err error
		res, err = s.reconcile(ctx)
		return err
	})
	if err != nil && res.Message == "" {
		return res, commands.Unavailable("reconcile: %v", err)
	}
	return res, err
}

// reconcile is Reconcile under the reconcile lease.
func (s *Service) reconcile(ctx context.Context) (commands.SyncResult, error) {
	res := commands.SyncResult{Message: "Force sync completed successfully", Changes: []string{}}
	// First what timed-out jobs did: the mapping an attach made after all
	// is then reconciled (its device found) and that of a detach removed,
	// in this same sync.
	resolved, errs := s.rec.resolveJobs(ctx)
	res.Changes, res.Errors = append(res.Changes, resolved...), errs
	vms := map[string]bool{}
	if s.cfg.VMID != "" {
		vms[s.cfg.VMID] = true
	}
	repaired, errs := s.rec.repairCorrupt(ctx, vms)
	res.Changes, res.Errors = append(res.Changes, repaired...), append(res.Errors, errs...)
	mappings, err := s.cfg.Store.ListMappings(ctx, "")
	if err != nil {
		return res, state.APIError(err)
	}
	// Listed after the mappings were read: as fresh as asking for each.
	var listed map[string]csapi.Volume
	if len(mappings) >= listAllAt {
		vols, err := s.cfg.CloudStack.ListVolumes(ctx, csapi.ListFilter{})
		if err != nil {
			return res, engine.CloudStackError(err)
		}
		listed = byID(vols, volumeID)
	}
	for _, m := range mappings {
		vms[m.VMID] = true
		change, err := s.rec.reconcileMapping(ctx, m, listed)
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("volume %s: %v", m.VolumeID, err))
		} else if change != "" {
			res.Changes = append(res.Changes, change)
		}
	}
	settledOps, scattered := s.rec.scattered(ctx, &cloudView{cs: s.cfg.CloudStack, volumes: listed})
	res.Changes, res.Errors = append(res.Changes, settledOps...), append(res.Errors, scattered...)
	if s.cfg.Devices != nil {
		for _, vm := range s.cfg.Devices.AgentVMs() {
			vms[vm] = true
		}
		for _, vm := range slices.Sorted(maps.Keys(vms)) {
			if !s.cfg.Devices.HasAgent(ctx, vm) {
				continue
			}
			changes, err := s.rec.reconcileDevices(ctx, vm)
			if err != nil {
				res.Errors = append(res.Errors, fmt.Sprintf("devices of VM %s: %v", vm, err))
			}
			res.Changes = append(res.Changes, changes...)
		}
	}
	exports, err := s.host.Reconcile(ctx, true)
	if err != nil {
		res.Errors = append(res.Errors, fmt.Sprintf("exports: %v", err))
	}
	res.Changes = append(res.Changes, exports...)
	requeued, err := s.sweep(ctx)
	if err != nil {
		return res, err
	}
	res.Changes = append(res.Changes, requeued...)
	res.Timestamp = time.Now().UTC()
	if len(res.Errors) > 0 {
		res.Message = "Force sync completed with errors"
		s.log.Warn("reconcile could not check everything", "errors", res.Errors)
	}
	if len(res.Changes) > 0 {
		s.log.Info("reconcile repaired drift", "changes", res.Changes)
	}
	return res, nil
}

// repairCorrupt rewrites each corrupt mapping or export record the store
// lists (state.CorruptLister) from what CloudStack says, by
// compare-and-swap on the corrupt record's revision: a mapping of a
// volume CloudStack has attached is written anew (its device is then
// found by the device reconcile of its VM, which it adds to vms), any
// other mapping and every export record is deleted (an export is asked
// for again). A record that cannot be repaired is named in errs.
func (r *reconciler) repairCorrupt(ctx context.Context, vms map[string]bool) (changes, errs []string) {
	lister, ok := r.cfg.Store.(state.CorruptLister)
	if !ok {
		return nil, nil
	}
	bad, err := lister.CorruptRecords(ctx)
	if err != nil {
		return nil, []string{fmt.Sprintf("corrupt records: %v", state.APIError(err))}
	}
	for _, c := range bad {
		change, err := r.repairRecord(ctx, c, vms)
		switch {
		case errors.Is(err, state.ErrStale):
			// Rewritten since it was listed: nothing of ours to repair.
		case err != nil:
			r.log.Error("corrupt record not repaired", "key", c.Key, "revision", c.Revision, "err", err)
			errs = append(errs, fmt.Sprintf("corrupt record %s: %v", c.Key, err))
		case change != "":
			r.log.Warn("corrupt record repaired", "key", c.Key, "revision", c.Revision, "was", c.Err, "now", change)
			changes = append(changes, change)
		}
	}
	return changes, errs
}

// repairRecord repairs one corrupt record c, saying how.
func (r *reconciler) repairRecord(ctx context.Context, c state.Corrupt, vms map[string]bool) (string, error) {
	switch c.Kind {
	case "export":
		if err := r.cfg.Store.DeleteExport(ctx, c.ID, c.Revision); err != nil {
			return "", err
		}
		return fmt.Sprintf("deleted the corrupt export record %s of volume %s (export it again)", c.Key, c.ID), nil
	case "mapping":
	default:
		return "", nil // an operation: read by id, it answers the error
	}
	vol, err := r.cfg.CloudStack.GetVolume(ctx, c.ID)
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		vol = csapi.Volume{}
	case err != nil:
		return "", engine.CloudStackError(err)
	}
	if vol.VMID == "" {
		if err := r.cfg.Store.DeleteMapping(ctx, c.ID, c.Revision); err != nil {
			return "", err
		}
		return fmt.Sprintf("deleted the corrupt mapping record %s: CloudStack has volume %s attached nowhere", c.Key, c.ID), nil
	}
	vol.ID = c.ID
	m := kinds.AttachedMapping(vol, vol.VMID)
	m.Revision = c.Revision
	if _, err := r.mappings.Put(ctx, nil, m); err != nil {
		return "", err
	}
	vms[vol.VMID] = true
	return fmt.Sprintf("rewrote the corrupt mapping record %s: volume %s is attached to VM %s", c.Key, c.ID, vol.VMID), nil
}

// scattered reports each failover or rollback that ended failed and not
// compensated (details compensated false), with what it left where, for
// a person to act on: volumed does not move the volumes back by itself.
// A failed rollback asked again since (pending, executing or completed)
// is not reported, nor one settled: once CloudStack (read through view)
// and the export records show that nothing it left remains (remains),
// the operation records it (settle), a change, and is not checked again.
func (r *reconciler) scattered(ctx context.Context, view *cloudView) (changes, out []string) {
	for _, typ := range []commands.OpType{commands.OpFailover, commands.OpRollback} {
		f := state.Filter{Type: typ, Status: commands.StatusFailed}
		for {
			ops, next, err := r.cfg.Store.ListOperations(ctx, f)
			if err != nil {
				return changes, append(out, fmt.Sprintf("failed %s operations: %v", typ, state.APIError(err)))
			}
			for _, op := range ops {
				if op.Details[commands.DetailCompensated] != false || settled(op) {
					continue
				}
				if typ == commands.OpRollback {
					again, err := r.askedAgain(ctx, op)
					if err != nil {
						out = append(out, fmt.Sprintf("rollbacks of volume %s: %v", op.VolumeID, state.APIError(err)))
						continue
					}
					if again {
						continue
					}
				}
				done, still, err := r.settleIfBack(ctx, op, view)
				switch {
				case err != nil:
					still = fmt.Sprintf("could not check what remains: %v", err)
				case done && still != "":
					changes = append(changes, still)
					continue
				case done:
					continue // another instance recorded it
				}
				out = append(out, fmt.Sprintf("%s %s failed and was not compensated; a person must act: %s (now: %s)", typ, op.ID, leftOf(op), still))
			}
			if next == "" {
				break
			}
			f.Cursor = next
		}
	}
	return changes, out
}

// askedAgain reports whether the failed rollback rb was asked again since:
// a later rollback of the same failover that did not fail.
func (r *reconciler) askedAgain(ctx context.Context, rb commands.Operation) (bool, error) {
	var req commands.RollbackRequest
	if err := engine.DecodeRequest(&rb, &req); err != nil {
		return false, nil
	}
	rbs, err := state.RollbacksOf(ctx, r.cfg.Store, req.FailoverID, rb.VolumeID)
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(rbs, func(op commands.Operation) bool {
		return op.ID != rb.ID && op.CreatedAt.After(rb.CreatedAt) && op.Status != commands.StatusFailed && op.Status != commands.StatusCancelled
	}), nil
}

// leftOf is what a failed workflow left where, in words.
func leftOf(op commands.Operation) string {
	left, _ := op.Details[commands.DetailLeft].([]any)
	var parts []string
	for _, l := range left {
		parts = append(parts, fmt.Sprint(l))
	}
	if len(parts) == 0 {
		return "see its steps (" + op.Error + ")"
	}
	return strings.Join(parts, "; ")
}

// reconcileDevices has the device agent side repair the mappings of a VM
// with an agent against the volumes CloudStack has attached to it.
func (r *reconciler) reconcileDevices(ctx context.Context, vm string) ([]string, error) {
	vols, err := r.cfg.CloudStack.ListVolumes(ctx, csapi.ListFilter{VMID: vm})
	if err != nil {
		return nil, engine.CloudStackError(err)
	}
	attached := make([]commands.Mapping, 0, len(vols))
	for _, v := range vols {
		attached = append(attached, commands.Mapping{VolumeID: v.ID, VMID: v.VMID, Size: v.Size,
			DeviceID: v.DeviceID, CloudStackState: commands.CloudStackAttached})
	}
	return r.cfg.Devices.Reconcile(ctx, vm, attached)
}

// listAllAt is the number of mappings from which a reconcile lists every
// volume once, in pages, instead of asking CloudStack for each mapped
// volume: its calls then grow with the pages, not with the mappings.
const listAllAt = 16

// reconcileMapping removes a mapping CloudStack no longer explains and
// refreshes the sync time of one it does. listed, when not nil, is every
// volume CloudStack listed after m was read; m's volume is asked for by
// id when listed lacks it: a listing in pages misses volumes when others
// are deleted meanwhile (as cloudView.volume asks).
func (r *reconciler) reconcileMapping(ctx context.Context, m commands.Mapping, listed map[string]csapi.Volume) (string, error) {
	vol, ok := listed[m.VolumeID]
	var err error
	if !ok {
		vol, err = r.cfg.CloudStack.GetVolume(ctx, m.VolumeID)
	}
	var why string
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		why = "CloudStack no longer has the volume"
	case err != nil:
		return "", engine.CloudStackError(err)
	case vol.VMID == "":
		why = "CloudStack says the volume is detached"
	case vol.VMID != m.VMID:
		why = fmt.Sprintf("CloudStack says the volume is attached to VM %s", vol.VMID)
	}
	if why == "" {
		// Refresh the sync time on the record as it is now, not on the
		// copy read before the CloudStack call: the device side may have
		// changed it meanwhile.
		cur, err := r.cfg.Store.GetMapping(ctx, m.VolumeID)
		if errors.Is(err, state.ErrNotFound) {
			return "", nil
		}
		if err != nil {
			return "", state.APIError(err)
		}
		if listed != nil && cur.Revision != m.Revision {
			return "", nil // changed since the list began: the next sync looks again
		}
		cur.LastSync = time.Now().UTC()
		cur.CloudStackState = commands.CloudStackAttached
		if vol.DeviceID != nil {
			cur.DeviceID = vol.DeviceID
		}
		if _, err := r.mappings.Put(ctx, nil, cur); err != nil && !errors.Is(err, state.ErrStale) {
			return "", state.APIError(err)
		}
		return "", nil // stale: changed since read, and the next sync looks again
	}
	rel, err := r.release.Release(ctx, nil, m.VolumeID, &m, nil)
	if err != nil {
		return "", err
	}
	deleted, export := rel.Deleted, rel.Export
	switch {
	case deleted && export != "":
		return fmt.Sprintf("removed mapping of volume %s on VM %s (%s): %s; ended its NBD export %s", m.VolumeID, m.VMID, m.Device(), why, export), nil
	case deleted:
		return fmt.Sprintf("removed mapping of volume %s on VM %s (%s): %s", m.VolumeID, m.VMID, m.Device(), why), nil
	case export != "":
		return fmt.Sprintf("ended the NBD export %s of volume %s: %s", export, m.VolumeID, why), nil
	}
	return "", nil // gone already, or another attachment now
}
