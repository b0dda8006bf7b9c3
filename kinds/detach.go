package kinds

import (
	"context"
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
)

// detach ends a volume's export, detaches it in CloudStack and releases
// its device and mapping. Unless asked with force, a volume whose device
// or export is in use is refused first (CONFLICT naming who), before
// anything is done. On a VM with an agent it completes only once the
// kernel there removed the device (the release step waits for it).
type detach struct{ Deps }

func (detach) Type() commands.OpType { return commands.OpDetach }

func (k detach) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	op := j.Op
	var req commands.VolumeRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	vol, err := k.volume(ctx, j, req.VolumeID)
	if err != nil && !errors.Is(err, csapi.ErrNotFound) {
		return nil, engine.Failure(err)
	}
	vmID := vol.VMID
	if vmID != "" && op.VMID == nil {
		// Recorded by the next save, which comes before anything is done
		// (the unexport's step, or detach:requested): a detach that ends
		// before a save has done nothing on the VM.
		op.VMID = &vmID
	}
	if op.Step == "" && !req.Force {
		// Nothing done yet: refuse a device or export in use.
		if err := k.Release.CheckFree(ctx, req.VolumeID); err != nil {
			return nil, err
		}
	}
	if vmID != "" {
		// The export ends before CloudStack takes the device away.
		if _, err := k.Release.Unexport(ctx, j, req.VolumeID, mark(j)); err != nil {
			return nil, err
		}
		if err := k.detachInCloudStack(ctx, j, req.VolumeID); err != nil {
			return nil, err
		}
	}
	if _, err := k.Release.Release(ctx, j, req.VolumeID, nil, mark(j)); err != nil {
		return nil, err
	}
	if vmID == "" && op.VMID != nil {
		vmID = *op.VMID // detached by this operation before a restart
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
func (k detach) detachInCloudStack(ctx context.Context, j *engine.Journal, volumeID string) error {
	op := j.Op
	detached := func(ctx context.Context) (bool, error) {
		vol, err := k.volume(ctx, j, volumeID)
		if errors.Is(err, csapi.ErrNotFound) {
			return true, nil
		}
		return err == nil && vol.VMID == "", engine.Failure(err)
	}
	for {
		switch {
		case op.Step == StepDetachJob && op.JobID != "":
			_, jobErr := k.waitJob(ctx, j, "detachVolume job")
			if jobErr == nil {
				return nil
			}
			// Detached anyway?
			if done, err := detached(ctx); err != nil || !done {
				return engine.Failure(jobErr)
			}
			return nil
		case op.Step == StepDetachRequested:
			done, err := j.Settle(ctx, "detachVolume", detached)
			if err != nil || done {
				return err
			}
		}
		op.Step, op.JobID = StepDetachRequested, ""
		if err := j.Save(ctx); err != nil {
			return err
		}
		var jobID string
		err := j.Step(ctx, "detachVolume", func(ctx context.Context) error {
			var err error
			jobID, err = k.CloudStack.DetachVolume(ctx, volumeID)
			return err
		})
		switch {
		case csapi.IsMaybeDone(err):
			continue
		case err != nil:
			return engine.Failure(err)
		}
		op.JobID, op.Step, op.Error = jobID, StepDetachJob, ""
		if err := j.Save(ctx); err != nil {
			return err
		}
	}
}
