package kinds

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// create makes a volume; a createVolume whose answer was lost adopts the
// volume it made instead of making a second one.
type create struct{ Deps }

func (create) Type() commands.OpType { return commands.OpCreate }

func (k create) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	op := j.Op
	var req commands.CreateRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	for op.VolumeID == "" {
		if op.Step == StepCreateRequested {
			// A createVolume whose answer was lost, or that a crash cut
			// off: adopt the volume it made rather than make a second one.
			found, err := j.Settle(ctx, "createVolume", func(ctx context.Context) (bool, error) {
				return k.adoptCreated(ctx, j, req)
			})
			if err != nil {
				return nil, err
			}
			if found {
				break
			}
			// CloudStack has no such volume: it did not make one.
		}
		op.Step = StepCreateRequested
		if err := j.Save(ctx); err != nil {
			return nil, err
		}
		var volID, jobID string
		err := j.Step(ctx, "createVolume", func(ctx context.Context) error {
			var err error
			volID, jobID, err = k.CloudStack.CreateVolume(ctx, csapi.CreateParams{
				Name: req.Name, SizeGiB: req.SizeGiB(), DiskOfferingID: req.DiskOfferingID, ZoneID: req.ZoneID,
				SnapshotID: req.SnapshotID})
			return err
		})
		switch {
		case csapi.IsMaybeDone(err):
			continue
		case err != nil:
			return nil, engine.Failure(err)
		}
		op.VolumeID, op.JobID = volID, jobID
	}
	// From here the volume's id is recorded: later operations on it wait
	// until this create ends (the queue's turn).
	tagged := strings.HasPrefix(op.Step, "tags:") // past the job: writing the metadata's tags
	if op.Step != StepCreateJob && !tagged {
		op.Step = StepCreateJob
		if err := j.Save(ctx); err != nil {
			return nil, err
		}
	}
	if !tagged {
		if _, err := k.createdVolume(ctx, j); err != nil {
			return nil, err
		}
	}
	// The metadata becomes the volume's tags: one more step, which lists
	// the tags before it writes them.
	if tags := commands.MetadataTags(req.Metadata); len(tags) > 0 {
		if err := k.setTags(ctx, j, op.VolumeID, tags, false); err != nil {
			return nil, err
		}
	}
	return &commands.OpResponse{VolumeID: op.VolumeID, Message: "Volume created successfully"}, nil
}

// createdVolume waits for the create job, or, without one, asks
// CloudStack for the volume.
func (k create) createdVolume(ctx context.Context, j *engine.Journal) (csapi.Volume, error) {
	op := j.Op
	if op.JobID != "" {
		job, err := k.waitJob(ctx, j, "createVolume job")
		if err == nil && job.Volume != nil {
			return *job.Volume, nil
		}
		if err != nil && !errors.Is(err, csapi.ErrNotFound) {
			return csapi.Volume{}, engine.Failure(err)
		}
	}
	vol, err := k.volume(ctx, j, op.VolumeID)
	if errors.Is(err, csapi.ErrNotFound) {
		return vol, commands.NotFound("volume %s, created by this operation, no longer exists", op.VolumeID)
	}
	return vol, engine.Failure(err)
}

// adoptCreated looks for the volume an interrupted createVolume made: same
// name and zone, created since the operation, claimed by no operation. It
// reports whether it adopted one.
func (k create) adoptCreated(ctx context.Context, j *engine.Journal, req commands.CreateRequest) (bool, error) {
	op := j.Op
	var vols []csapi.Volume
	err := j.Read(ctx, "listVolumes", func(ctx context.Context) error {
		var err error
		vols, err = k.CloudStack.ListVolumes(ctx, csapi.ListFilter{Name: req.Name, ZoneID: req.ZoneID})
		return err
	})
	if err != nil {
		return false, engine.Failure(err)
	}
	for _, v := range vols {
		if v.SnapshotID != req.SnapshotID {
			continue
		}
		if created, err := time.Parse(csapi.TimeLayout, v.Created); err == nil && created.Before(op.CreatedAt.Add(-time.Minute)) {
			continue
		}
		_, claimed, err := state.FirstOperation(ctx, k.Operations, state.Filter{VolumeID: v.ID})
		if err != nil {
			return false, fmt.Errorf("%w: operations on volume %s: %w", engine.ErrStopped, v.ID, err)
		}
		if !claimed {
			k.Log.Info("adopting volume of an interrupted create", "operation_id", op.ID, "volume_id", v.ID)
			op.VolumeID, op.Step, op.Error = v.ID, StepCreateJob, ""
			return true, j.Save(ctx)
		}
	}
	return false, nil
}
