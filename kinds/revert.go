package kinds

import (
	"context"
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// revert reverts a volume to one of its snapshots. CloudStack refuses it
// unless the volume is detached or its VM Stopped; the operation then
// fails with CloudStack's code and text. revertSnapshot is the one call
// that is sent again after a lost answer: nothing can write to the volume
// in between (it is detached or its VM stopped, and volumed holds the
// volume's line), so a second revert to the same snapshot leaves the
// volume as the first did.
type revert struct{ Deps }

func (revert) Type() commands.OpType { return commands.OpRevert }

func (k revert) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.RevertRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	snap, err := k.snapshotOf(ctx, j, req.SnapshotID)
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		return nil, SnapshotNotFound(req.SnapshotID)
	case err != nil:
		return nil, engine.Failure(err)
	case snap.VolumeID != req.VolumeID:
		return nil, SnapshotOfAnother(snap, req.VolumeID)
	}
	err = asyncCall{
		name: "revertSnapshot", requested: StepRevertRequested, job: StepRevertJob,
		idle: func(ctx context.Context) (bool, error) {
			// An earlier revert is over once the volume is Ready again.
			vol, err := k.volume(ctx, j, req.VolumeID)
			return err == nil && vol.State == "Ready", notFoundOr(err, req.VolumeID)
		},
		send: func(ctx context.Context) (string, error) { return k.CloudStack.RevertSnapshot(ctx, req.SnapshotID) },
	}.run(ctx, k.Deps, j)
	if err != nil {
		return nil, err
	}
	vol, err := k.volume(ctx, j, req.VolumeID)
	if err != nil {
		return nil, notFoundOr(err, req.VolumeID)
	}
	// The volume takes the snapshot's size: its mapping follows.
	if m, err := k.Mappings.Get(ctx, vol.ID); err == nil && m.VMID == vol.VMID {
		if err := k.followSize(ctx, j, m, vol.Size); err != nil {
			return nil, err
		}
	} else if err != nil && !errors.Is(err, state.ErrNotFound) {
		return nil, engine.ErrStopped
	}
	return &commands.OpResponse{VolumeID: vol.ID, VMID: vol.VMID, SnapshotID: snap.ID, Size: vol.Size,
		Message: "Volume reverted to snapshot " + snap.Name}, nil
}

// SnapshotOfAnother refuses a snapshot of another volume than the one
// named.
func SnapshotOfAnother(snap csapi.Snapshot, volumeID string) *commands.Error {
	return commands.Invalid("snapshot_id", "snapshot %s is of volume %s, not of volume %s", snap.ID, snap.VolumeID, volumeID).
		WithDetail("provided_value", snap.ID).WithDetail("snapshot_volume_id", snap.VolumeID)
}
