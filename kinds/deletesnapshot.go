package kinds

import (
	"context"
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
)

// deleteSnapshot deletes a snapshot, in the line of the snapshot's
// volume. A snapshot CloudStack no longer lists is deleted: a lost answer
// is resolved by asking for it.
type deleteSnapshot struct{ Deps }

func (deleteSnapshot) Type() commands.OpType { return commands.OpDeleteSnapshot }

func (k deleteSnapshot) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.SnapshotIDRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	gone := func(ctx context.Context) (bool, error) {
		_, err := k.snapshotOf(ctx, j, req.SnapshotID)
		if errors.Is(err, csapi.ErrNotFound) {
			return true, nil
		}
		return false, engine.Failure(err)
	}
	resp := &commands.OpResponse{VolumeID: j.Op.VolumeID, SnapshotID: req.SnapshotID, Message: "Snapshot deleted"}
	if j.Op.Step == "" {
		if done, err := gone(ctx); err != nil || done {
			resp.Message = "Snapshot already deleted"
			return resp, err
		}
	}
	err := asyncCall{
		name: "deleteSnapshot", requested: StepDeleteSnapshotRequested, job: StepDeleteSnapshotJob,
		done: gone,
		send: func(ctx context.Context) (string, error) { return k.CloudStack.DeleteSnapshot(ctx, req.SnapshotID) },
	}.run(ctx, k.Deps, j)
	return resp, err
}
