package kinds

import (
	"context"
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
)

// remove deletes a detached volume in CloudStack (deleteVolume is
// synchronous: no job) and releases what it had left. Unless asked with
// force, a volume whose device (still on a VM) or export is in use is
// refused first (CONFLICT naming who).
type remove struct{ Deps }

func (remove) Type() commands.OpType { return commands.OpDelete }

func (k remove) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.VolumeRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	vol, err := k.volume(ctx, j, req.VolumeID)
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		if _, err := k.Release.Release(ctx, j, req.VolumeID, nil, mark(j)); err != nil {
			return nil, err
		}
		return &commands.OpResponse{VolumeID: req.VolumeID, Message: "Volume already deleted"}, nil
	case err != nil:
		return nil, engine.Failure(err)
	case vol.VMID != "":
		return nil, commands.Conflict("volume %s is attached to VM %s: detach it first", vol.ID, vol.VMID).
			WithDetail("attached_vm_id", vol.VMID)
	}
	if j.Op.Step == "" && !req.Force {
		if err := k.Release.CheckFree(ctx, req.VolumeID); err != nil {
			return nil, err
		}
	}
	j.Op.Step = StepDelete
	if err := j.Save(ctx); err != nil {
		return nil, err
	}
	// sent: a deleteVolume went out whose answer was lost. CloudStack is
	// then asked whether the volume is gone before anything is sent again,
	// however often the asking itself must be retried.
	sent := false
	err = j.Step(ctx, "deleteVolume", func(ctx context.Context) error {
		if sent {
			_, gerr := k.CloudStack.GetVolume(ctx, req.VolumeID)
			switch {
			case errors.Is(gerr, csapi.ErrNotFound):
				return nil // the lost delete worked
			case gerr != nil:
				return gerr // retryable or final, as CloudStack answers
			}
			sent = false // still there: deleting again is safe (a volume is deleted once)
		}
		err := k.CloudStack.DeleteVolume(ctx, req.VolumeID)
		switch {
		case errors.Is(err, csapi.ErrNotFound):
			return nil // gone already
		case csapi.IsMaybeDone(err):
			sent = true
			return lostAnswer(err)
		}
		return err
	})
	if err != nil {
		return nil, engine.Failure(err)
	}
	if _, err := k.Release.Release(ctx, j, req.VolumeID, nil, mark(j)); err != nil {
		return nil, err
	}
	return &commands.OpResponse{VolumeID: req.VolumeID, Message: "Volume deleted successfully"}, nil
}
