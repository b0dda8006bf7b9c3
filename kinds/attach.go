package kinds

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// attach attaches a volume in CloudStack (unless it is already) and
// records its mapping; attach-root is an attach with the root device id.
// An attach to a VM whose disks carry no identity runs under the VM's
// lease, taken by the queue before it started.
type attach struct{ Deps }

func (attach) Type() commands.OpType { return commands.OpAttach }

// AttachedAsWanted reports whether vol is already attached as req asks.
func AttachedAsWanted(vol csapi.Volume, req commands.AttachRequest) bool {
	if vol.VMID != req.VMID {
		return false
	}
	return !req.Root() || (vol.DeviceID != nil && *vol.DeviceID == commands.RootDeviceID)
}

func (k attach) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	op := j.Op
	var req commands.AttachRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	since := time.Now()
	if op.Step != "" {
		// Resumed (after a restart): its device may have come before now.
		// Devices of earlier attaches are held by their mappings.
		since = op.CreatedAt
	}
	vol, err := k.volume(ctx, j, req.VolumeID)
	if err != nil {
		return nil, notFoundOr(err, req.VolumeID)
	}
	// asked is the device this run asked for as req's wish; nil when
	// CloudStack picks, or when the job was asked for before a restart.
	var asked *int64
	for !AttachedAsWanted(vol, req) {
		if vol.VMID != "" && op.Step != StepAttachJob {
			return nil, commands.Conflict("volume %s is already attached to VM %s as device %s", vol.ID, vol.VMID, DeviceString(vol.DeviceID)).
				WithDetail("attached_vm_id", vol.VMID)
		}
		if op.Step == StepAttachJob && op.JobID != "" {
			job, jobErr := k.waitJob(ctx, j, "attachVolume job")
			if jobErr == nil && job.Volume != nil {
				vol = *job.Volume
				break
			}
			// Done anyway? A repeated attach after a crash fails while the
			// first one succeeded.
			again, err := k.volume(ctx, j, req.VolumeID)
			if err == nil && job.Status == csapi.JobFailure && asked != nil && again.VMID == "" {
				// The device was free when asked for, but another
				// volume may have taken it before the job ran: then
				// CloudStack picks one (deviceFree finds it taken).
				dev, err := k.deviceFree(ctx, j, req)
				if err != nil {
					return nil, err
				}
				if dev == nil {
					vol, asked, op.Step, op.JobID = again, nil, "", ""
					continue
				}
			}
			if err != nil || !AttachedAsWanted(again, req) {
				if jobErr == nil {
					jobErr = err
				}
				return nil, engine.Failure(jobErr)
			}
			vol = again
			break
		}
		if op.Step == StepAttachRequested {
			// An attachVolume whose answer was lost, or that a crash cut
			// off: wait for CloudStack to show whether it happened.
			done, err := j.Settle(ctx, "attachVolume", func(ctx context.Context) (bool, error) {
				var err error
				vol, err = k.volume(ctx, j, req.VolumeID)
				return err == nil && AttachedAsWanted(vol, req), notFoundOr(err, req.VolumeID)
			})
			if err != nil {
				return nil, err
			}
			if done || vol.VMID != "" {
				continue
			}
		}
		dev, err := k.deviceFree(ctx, j, req)
		if err != nil {
			return nil, err
		}
		// Saved after the listing, right before the call: the save is
		// the fence of the attach.
		op.Step, op.JobID = StepAttachRequested, ""
		if err := j.Save(ctx); err != nil {
			return nil, err
		}
		var jobID string
		err = j.Step(ctx, "attachVolume", func(ctx context.Context) error {
			var err error
			jobID, err = k.CloudStack.AttachVolume(ctx, req.VolumeID, req.VMID, dev)
			return err
		})
		if !req.Root() {
			asked = dev
		}
		switch {
		case csapi.IsMaybeDone(err):
			continue
		case err != nil:
			return nil, engine.Failure(err)
		}
		op.JobID, op.Step, op.Error = jobID, StepAttachJob, ""
		if err := j.Save(ctx); err != nil {
			return nil, err
		}
	}
	m, err := k.recordAttached(ctx, j, vol, req.VMID, since)
	if err != nil {
		return nil, err
	}
	return &commands.OpResponse{VolumeID: vol.ID, VMID: req.VMID, DevicePath: m.DevicePath, DeviceID: vol.DeviceID,
		Message: "Volume attached successfully"}, nil
}

// deviceFree is the device id to ask CloudStack for: req's, unless it is
// a data disk's device that another volume of the VM holds now; then nil,
// and CloudStack picks one.
func (k attach) deviceFree(ctx context.Context, j *engine.Journal, req commands.AttachRequest) (*int64, error) {
	if req.DeviceID == nil || req.Root() {
		return req.DeviceID, nil
	}
	var vols []csapi.Volume
	err := j.Read(ctx, "listVolumes", func(ctx context.Context) error {
		var err error
		vols, err = k.CloudStack.ListVolumes(ctx, csapi.ListFilter{VMID: req.VMID})
		return err
	})
	if err != nil {
		return nil, engine.Failure(err)
	}
	for _, v := range vols {
		if v.ID != req.VolumeID && v.DeviceID != nil && *v.DeviceID == *req.DeviceID {
			return nil, nil
		}
	}
	return req.DeviceID, nil
}

// AttachedMapping is the new mapping of vol, attached to vmID as
// CloudStack says, before its device is looked for (linux_state
// not_applicable).
func AttachedMapping(vol csapi.Volume, vmID string) commands.Mapping {
	now := time.Now().UTC()
	return commands.Mapping{
		ID: "mapping-" + uuid.NewString(), VolumeID: vol.ID, VMID: vmID, CloudStackState: commands.CloudStackAttached,
		LinuxState: commands.LinuxNotApplicable, Size: vol.Size, DeviceID: vol.DeviceID,
		LastSync: now, CreatedAt: now, UpdatedAt: now,
	}
}

// recordAttached finds the volume's device (where the VM has a device
// agent) and records the mapping, fenced by the operation's claim.
func (k attach) recordAttached(ctx context.Context, j *engine.Journal, vol csapi.Volume, vmID string, since time.Time) (commands.Mapping, error) {
	m := AttachedMapping(vol, vmID)
	if old, err := k.Mappings.Get(ctx, vol.ID); err == nil {
		m.ID, m.CreatedAt, m.Revision = old.ID, old.CreatedAt, old.Revision
	} else if !errors.Is(err, state.ErrNotFound) {
		return m, fmt.Errorf("%w: read mapping of %s: %w", engine.ErrStopped, vol.ID, err)
	}
	var corrErr error
	if k.Devices != nil && k.Devices.HasAgent(ctx, vmID) {
		// Journaled by compare-and-swap: a late executor stops here,
		// before the device side makes a persistent name.
		j.Op.Step = StepCorrelate
		if err := j.Save(ctx); err != nil {
			return m, err
		}
		found, err := k.Devices.Attached(ctx, m, since)
		if ctx.Err() != nil {
			return m, fmt.Errorf("%w: %w", engine.ErrStopped, context.Cause(ctx))
		}
		found.ID, found.CreatedAt, found.DeviceID, found.Revision = m.ID, m.CreatedAt, vol.DeviceID, m.Revision
		m, corrErr = found, err
	}
	// A stale revision (the mapping changed or went since it was read)
	// stops the run; the redelivery decides again from CloudStack.
	m, err := k.Mappings.Put(ctx, j, m)
	switch {
	case errors.Is(err, engine.ErrLost) || errors.Is(err, engine.ErrStopped):
		return m, err
	case errors.Is(err, state.ErrConflict):
		return m, commands.Conflict("device %s is already mapped to another volume", m.DevicePath)
	case err != nil:
		return m, fmt.Errorf("%w: record mapping of %s: %w", engine.ErrStopped, vol.ID, err)
	}
	if corrErr == nil {
		k.Exports.AutoExport(ctx, j, m)
	}
	return m, corrErr
}
