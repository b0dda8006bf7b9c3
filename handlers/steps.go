package handlers

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers/csapi"
	"github.com/volumed/volumed/state"
)

func (s *Service) create(ctx context.Context, op *commands.Operation) (*commands.OpResponse, error) {
	var req commands.CreateRequest
	if err := decodeRequest(op, &req); err != nil {
		return nil, err
	}
	for op.VolumeID == "" {
		if op.Step == stepCreateRequested {
			// A createVolume whose answer was lost, or that a crash cut
			// off: adopt the volume it made rather than make a second one.
			found, err := s.settle(ctx, op, "createVolume", func(ctx context.Context) (bool, error) {
				return s.adoptCreated(ctx, op, req)
			})
			if err != nil {
				return nil, err
			}
			if found {
				break
			}
			// CloudStack has no such volume: it did not make one.
		}
		op.Step = stepCreateRequested
		if err := s.save(ctx, op); err != nil {
			return nil, err
		}
		var volID, jobID string
		err := s.step(ctx, op, "createVolume", func(ctx context.Context) error {
			var err error
			volID, jobID, err = s.cfg.CloudStack.CreateVolume(ctx, csapi.CreateParams{
				Name: req.Name, SizeGiB: req.SizeGiB(), DiskOfferingID: req.DiskOfferingID, ZoneID: req.ZoneID})
			return err
		})
		switch {
		case csapi.IsMaybeDone(err):
			continue
		case err != nil:
			return nil, failure(err)
		}
		op.VolumeID, op.JobID = volID, jobID
	}
	// From here the volume's id is recorded: later operations on it wait
	// until this create ends (see turn).
	if op.Step != stepCreateJob {
		op.Step = stepCreateJob
		if err := s.save(ctx, op); err != nil {
			return nil, err
		}
	}
	vol, err := s.createdVolume(ctx, op)
	if err != nil {
		return nil, err
	}
	return &commands.OpResponse{VolumeID: vol.ID, Message: "Volume created successfully"}, nil
}

// createdVolume waits for the create job, or, without one, asks
// CloudStack for the volume.
func (s *Service) createdVolume(ctx context.Context, op *commands.Operation) (csapi.Volume, error) {
	if op.JobID != "" {
		job, err := s.waitJob(ctx, op, "createVolume job")
		if err == nil && job.Volume != nil {
			return *job.Volume, nil
		}
		if err != nil && !errors.Is(err, csapi.ErrNotFound) {
			return csapi.Volume{}, failure(err)
		}
	}
	vol, err := s.volume(ctx, op, op.VolumeID)
	if errors.Is(err, csapi.ErrNotFound) {
		return vol, commands.NotFound("volume %s, created by this operation, no longer exists", op.VolumeID)
	}
	return vol, failure(err)
}

// adoptCreated looks for the volume an interrupted createVolume made: same
// name and zone, created since the operation, claimed by no operation. It
// reports whether it adopted one.
func (s *Service) adoptCreated(ctx context.Context, op *commands.Operation, req commands.CreateRequest) (bool, error) {
	var vols []csapi.Volume
	err := s.step(ctx, op, "listVolumes", func(ctx context.Context) error {
		var err error
		vols, err = s.cfg.CloudStack.ListVolumes(ctx, csapi.ListFilter{Name: req.Name, ZoneID: req.ZoneID})
		return err
	})
	if err != nil {
		return false, failure(err)
	}
	for _, v := range vols {
		if created, err := time.Parse(csapi.TimeLayout, v.Created); err == nil && created.Before(op.CreatedAt.Add(-time.Minute)) {
			continue
		}
		claimed, _, err := s.cfg.Store.ListOperations(ctx, state.Filter{VolumeID: v.ID, Limit: 1})
		if err != nil {
			return false, errStopped
		}
		if len(claimed) == 0 {
			s.log.Info("adopting volume of an interrupted create", "operation_id", op.ID, "volume_id", v.ID)
			op.VolumeID, op.Step, op.Error = v.ID, stepCreateJob, ""
			return true, s.save(ctx, op)
		}
	}
	return false, nil
}

// attachedAsWanted reports whether vol is already attached as req asks.
func attachedAsWanted(vol csapi.Volume, req commands.AttachRequest) bool {
	if vol.VMID != req.VMID {
		return false
	}
	return !req.Root() || (vol.DeviceID != nil && *vol.DeviceID == commands.RootDeviceID)
}

// attach attaches the volume in CloudStack (unless it is already) and
// records its mapping. An attach to a VM whose disks carry no identity
// runs under the VM's lease, taken before it started (exclusiveLease).
func (s *Service) attach(ctx context.Context, op *commands.Operation) (*commands.OpResponse, error) {
	var req commands.AttachRequest
	if err := decodeRequest(op, &req); err != nil {
		return nil, err
	}
	since := time.Now()
	if op.Step != "" {
		// Resumed (after a restart): its device may have come before now.
		// Devices of earlier attaches are held by their mappings.
		since = op.CreatedAt
	}
	vol, err := s.volume(ctx, op, req.VolumeID)
	if err != nil {
		return nil, notFoundOr(err, req.VolumeID)
	}
	for !attachedAsWanted(vol, req) {
		if vol.VMID != "" && op.Step != stepAttachJob {
			return nil, commands.Conflict("volume %s is already attached to VM %s as device %s", vol.ID, vol.VMID, deviceString(vol.DeviceID)).
				WithDetail("attached_vm_id", vol.VMID)
		}
		if op.Step == stepAttachJob && op.JobID != "" {
			job, jobErr := s.waitJob(ctx, op, "attachVolume job")
			if jobErr == nil && job.Volume != nil {
				vol = *job.Volume
				break
			}
			// Done anyway? A repeated attach after a crash fails while the
			// first one succeeded.
			again, err := s.volume(ctx, op, req.VolumeID)
			if err != nil || !attachedAsWanted(again, req) {
				if jobErr == nil {
					jobErr = err
				}
				return nil, failure(jobErr)
			}
			vol = again
			break
		}
		if op.Step == stepAttachRequested {
			// An attachVolume whose answer was lost, or that a crash cut
			// off: wait for CloudStack to show whether it happened.
			done, err := s.settle(ctx, op, "attachVolume", func(ctx context.Context) (bool, error) {
				var err error
				vol, err = s.volume(ctx, op, req.VolumeID)
				return err == nil && attachedAsWanted(vol, req), notFoundOr(err, req.VolumeID)
			})
			if err != nil {
				return nil, err
			}
			if done || vol.VMID != "" {
				continue
			}
		}
		op.Step, op.JobID = stepAttachRequested, ""
		if err := s.save(ctx, op); err != nil {
			return nil, err
		}
		var jobID string
		err := s.step(ctx, op, "attachVolume", func(ctx context.Context) error {
			var err error
			jobID, err = s.cfg.CloudStack.AttachVolume(ctx, req.VolumeID, req.VMID, req.DeviceID)
			return err
		})
		switch {
		case csapi.IsMaybeDone(err):
			continue
		case err != nil:
			return nil, failure(err)
		}
		op.JobID, op.Step, op.Error = jobID, stepAttachJob, ""
		if err := s.save(ctx, op); err != nil {
			return nil, err
		}
	}
	m, err := s.recordAttached(ctx, op, vol, req.VMID, since)
	if err != nil {
		return nil, err
	}
	return &commands.OpResponse{VolumeID: vol.ID, VMID: req.VMID, DevicePath: m.DevicePath, DeviceID: vol.DeviceID,
		Message: "Volume attached successfully"}, nil
}

// attachedMapping is the new mapping of vol, attached to vmID as CloudStack
// says, before its device is looked for (linux_state not_applicable).
func attachedMapping(vol csapi.Volume, vmID string) commands.Mapping {
	now := time.Now().UTC()
	return commands.Mapping{
		ID: "mapping-" + uuid.NewString(), VolumeID: vol.ID, VMID: vmID, CloudStackState: commands.CloudStackAttached,
		LinuxState: commands.LinuxNotApplicable, Size: vol.Size, DeviceID: vol.DeviceID,
		LastSync: now, CreatedAt: now, UpdatedAt: now,
	}
}

// recordAttached finds the volume's device (where the VM has a device
// agent) and records the mapping.
func (s *Service) recordAttached(ctx context.Context, op *commands.Operation, vol csapi.Volume, vmID string, since time.Time) (commands.Mapping, error) {
	m := attachedMapping(vol, vmID)
	if old, err := s.cfg.Store.GetMapping(ctx, vol.ID); err == nil {
		m.ID, m.CreatedAt, m.Revision = old.ID, old.CreatedAt, old.Revision
	} else if !errors.Is(err, state.ErrNotFound) {
		return m, errStopped
	}
	var corrErr error
	if s.cfg.Devices != nil && s.cfg.Devices.HasAgent(ctx, vmID) {
		op.Step = stepCorrelate
		if err := s.save(ctx, op); err != nil {
			return m, err
		}
		found, err := s.cfg.Devices.Attached(ctx, m, since)
		if ctx.Err() != nil {
			return m, errStopped
		}
		found.ID, found.CreatedAt, found.DeviceID, found.Revision = m.ID, m.CreatedAt, vol.DeviceID, m.Revision
		m, corrErr = found, err
	}
	// A stale revision (the mapping changed or went since it was read)
	// stops the run; the redelivery decides again from CloudStack.
	m, err := s.cfg.Store.PutMapping(ctx, m)
	if err != nil {
		if errors.Is(err, state.ErrConflict) {
			return m, commands.Conflict("device %s is already mapped to another volume", m.DevicePath)
		}
		return m, errStopped
	}
	if corrErr == nil {
		s.autoExport(ctx, m)
	}
	return m, corrErr
}

func (s *Service) detach(ctx context.Context, op *commands.Operation) (*commands.OpResponse, error) {
	var req commands.VolumeRequest
	if err := decodeRequest(op, &req); err != nil {
		return nil, err
	}
	vol, err := s.volume(ctx, op, req.VolumeID)
	if err != nil && !errors.Is(err, csapi.ErrNotFound) {
		return nil, failure(err)
	}
	vmID := vol.VMID
	if vmID != "" && op.VMID == nil {
		op.VMID = &vmID
		if err := s.save(ctx, op); err != nil {
			return nil, err
		}
	}
	if vmID != "" {
		// The export ends before CloudStack takes the device away.
		if err := s.unexportFirst(ctx, op, req.VolumeID); err != nil {
			return nil, err
		}
		if err := s.detachInCloudStack(ctx, op, req.VolumeID); err != nil {
			return nil, err
		}
	}
	if err := s.release(ctx, op, req.VolumeID); err != nil {
		return nil, err
	}
	resp := &commands.OpResponse{VolumeID: req.VolumeID, VMID: vmID, Message: "Volume detached successfully"}
	if vmID == "" {
		resp.Message = "Volume was not attached"
	}
	return resp, nil
}

// detachInCloudStack detaches an attached volume in CloudStack: it follows
// a recorded job, or, after a lost answer or a crash between the call and
// its answer, waits for CloudStack to show whether the detach happened
// before sending it again. Only CloudStack saying the volume is detached
// counts as success.
func (s *Service) detachInCloudStack(ctx context.Context, op *commands.Operation, volumeID string) error {
	detached := func(ctx context.Context) (bool, error) {
		vol, err := s.volume(ctx, op, volumeID)
		if errors.Is(err, csapi.ErrNotFound) {
			return true, nil
		}
		return err == nil && vol.VMID == "", failure(err)
	}
	for {
		switch {
		case op.Step == stepDetachJob && op.JobID != "":
			_, jobErr := s.waitJob(ctx, op, "detachVolume job")
			if jobErr == nil {
				return nil
			}
			// Detached anyway?
			if done, err := detached(ctx); err != nil || !done {
				return failure(jobErr)
			}
			return nil
		case op.Step == stepDetachRequested:
			done, err := s.settle(ctx, op, "detachVolume", detached)
			if err != nil || done {
				return err
			}
		}
		op.Step, op.JobID = stepDetachRequested, ""
		if err := s.save(ctx, op); err != nil {
			return err
		}
		var jobID string
		err := s.step(ctx, op, "detachVolume", func(ctx context.Context) error {
			var err error
			jobID, err = s.cfg.CloudStack.DetachVolume(ctx, volumeID)
			return err
		})
		switch {
		case csapi.IsMaybeDone(err):
			continue
		case err != nil:
			return failure(err)
		}
		op.JobID, op.Step, op.Error = jobID, stepDetachJob, ""
		if err := s.save(ctx, op); err != nil {
			return err
		}
	}
}

// unexportFirst ends the volume's export, if it has one, recording the
// step on the operation.
func (s *Service) unexportFirst(ctx context.Context, op *commands.Operation, volumeID string) error {
	if _, err := s.cfg.Store.GetExport(ctx, volumeID); err != nil {
		if errors.Is(err, state.ErrNotFound) {
			return nil
		}
		return errStopped
	}
	op.Step = stepUnexport
	if err := s.save(ctx, op); err != nil {
		return err
	}
	_, err := s.dropExport(ctx, volumeID)
	return err
}

// release ends the volume's mapping: its export ends, the device agent
// lets go of the device, then the record goes.
func (s *Service) release(ctx context.Context, op *commands.Operation, volumeID string) error {
	if err := s.unexportFirst(ctx, op, volumeID); err != nil {
		return err
	}
	m, err := s.cfg.Store.GetMapping(ctx, volumeID)
	if errors.Is(err, state.ErrNotFound) {
		return nil
	}
	if err != nil {
		return errStopped
	}
	if s.cfg.Devices != nil && s.cfg.Devices.HasAgent(ctx, m.VMID) {
		op.Step = stepRelease
		if err := s.save(ctx, op); err != nil {
			return err
		}
		if err := s.cfg.Devices.Detached(ctx, m); err != nil {
			if ctx.Err() != nil {
				return errStopped
			}
			s.log.Warn("device release incomplete", "volume_id", volumeID, "err", err)
		}
	}
	if _, err := s.deleteReleased(ctx, m); err != nil {
		return errStopped
	}
	return nil
}

// deleteReleased deletes the mapping m of a released attachment. The
// device side may have changed the record since m was read (its device
// went away, so it is now missing): on a stale revision it reads the
// record again and deletes it if it is still this attachment (same
// mapping on the same VM, not detected on another device). It reports
// whether a record was deleted.
func (s *Service) deleteReleased(ctx context.Context, m commands.Mapping) (bool, error) {
	for {
		err := s.cfg.Store.DeleteMapping(ctx, m.VolumeID, m.Revision)
		if !errors.Is(err, state.ErrStale) {
			return err == nil, err
		}
		cur, err := s.cfg.Store.GetMapping(ctx, m.VolumeID)
		if errors.Is(err, state.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if cur.ID != m.ID || cur.VMID != m.VMID || (cur.LinuxState == commands.LinuxDetected && cur.DevicePath != m.DevicePath) {
			return false, nil // another attachment now: not ours to delete
		}
		m = cur
	}
}

func (s *Service) delete(ctx context.Context, op *commands.Operation) (*commands.OpResponse, error) {
	var req commands.VolumeRequest
	if err := decodeRequest(op, &req); err != nil {
		return nil, err
	}
	vol, err := s.volume(ctx, op, req.VolumeID)
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		if err := s.release(ctx, op, req.VolumeID); err != nil {
			return nil, err
		}
		return &commands.OpResponse{VolumeID: req.VolumeID, Message: "Volume already deleted"}, nil
	case err != nil:
		return nil, failure(err)
	case vol.VMID != "":
		return nil, commands.Conflict("volume %s is attached to VM %s: detach it first", vol.ID, vol.VMID).
			WithDetail("attached_vm_id", vol.VMID)
	}
	op.Step = stepDelete
	if err := s.save(ctx, op); err != nil {
		return nil, err
	}
	err = s.step(ctx, op, "deleteVolume", func(ctx context.Context) error {
		err := s.cfg.CloudStack.DeleteVolume(ctx, req.VolumeID)
		if err == nil || !(csapi.IsRetryable(err) || csapi.IsMaybeDone(err)) {
			return err
		}
		// Gone already? A lost answer to a delete that worked.
		_, gerr := s.cfg.CloudStack.GetVolume(ctx, req.VolumeID)
		switch {
		case errors.Is(gerr, csapi.ErrNotFound):
			return nil
		case gerr != nil:
			return gerr // retryable or final, as CloudStack answers
		}
		// Still there: deleting again is safe (a volume is deleted once).
		return lostAnswer(err)
	})
	if err != nil {
		return nil, failure(err)
	}
	if err := s.release(ctx, op, req.VolumeID); err != nil {
		return nil, err
	}
	return &commands.OpResponse{VolumeID: req.VolumeID, Message: "Volume deleted successfully"}, nil
}

// lostAnswer makes a lost answer retryable, for a call that CloudStack
// shows was not done and that may be sent again.
func lostAnswer(err error) error {
	var cs *csapi.Error
	if !errors.As(err, &cs) || !cs.MaybeDone {
		return err
	}
	again := *cs
	again.MaybeDone, again.Retryable = false, true
	return &again
}

// notFoundOr maps a missing volume to NOT_FOUND and anything else through
// failure.
func notFoundOr(err error, volumeID string) error {
	if errors.Is(err, csapi.ErrNotFound) {
		return commands.NotFound("volume %s not found in CloudStack", volumeID)
	}
	return failure(err)
}

func deviceString(id *int64) string {
	if id == nil {
		return "unknown"
	}
	return strconv.FormatInt(*id, 10)
}
