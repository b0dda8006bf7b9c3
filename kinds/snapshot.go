package kinds

import (
	"context"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
)

// snapshot takes a snapshot of a volume. Its name is the request's, or
// one derived from the operation's id: a createSnapshot whose answer was
// lost is found again by listing the volume's snapshots for that name,
// so a second one is never taken.
type snapshot struct{ Deps }

func (snapshot) Type() commands.OpType { return commands.OpSnapshot }

func (k snapshot) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.SnapshotRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	name := commands.SnapshotName(j.Op.ID, req.Name)
	var snap csapi.Snapshot
	found := func(ctx context.Context) (bool, error) {
		s, ok, err := k.taken(ctx, j, req.VolumeID, name)
		if ok {
			snap = s
		}
		return ok, err
	}
	err := asyncCall{
		name: "createSnapshot", requested: StepSnapshotRequested, job: StepSnapshotJob,
		done: found,
		send: func(ctx context.Context) (string, error) {
			_, jobID, err := k.CloudStack.CreateSnapshot(ctx, csapi.SnapshotParams{VolumeID: req.VolumeID, Name: name, Quiesce: req.Quiesce})
			return jobID, err
		},
		result: func(job csapi.Job) {
			if job.Snapshot != nil {
				snap = *job.Snapshot
			}
		},
	}.run(ctx, k.Deps, j)
	if err != nil {
		return nil, notFoundOr(err, req.VolumeID)
	}
	if snap.ID == "" {
		if _, err := found(ctx); err != nil {
			return nil, err
		}
	}
	if snap.State != csapi.SnapshotBackedUp {
		// Found by its name while CloudStack still takes it.
		if snap, err = k.backedUp(ctx, j, snap); err != nil {
			return nil, err
		}
	}
	return &commands.OpResponse{VolumeID: req.VolumeID, SnapshotID: snap.ID, Size: snap.Size,
		Message: "Snapshot " + snap.Name + " taken"}, nil
}

// taken looks for the snapshot this operation takes: of the volume, of
// that name, taken since the operation was accepted (a name given by the
// request may have been used before).
func (k snapshot) taken(ctx context.Context, j *engine.Journal, volumeID, name string) (csapi.Snapshot, bool, error) {
	var snaps []csapi.Snapshot
	err := j.Read(ctx, "listSnapshots", func(ctx context.Context) error {
		var err error
		snaps, err = k.CloudStack.ListSnapshots(ctx, csapi.SnapshotFilter{VolumeID: volumeID, Name: name})
		return err
	})
	if err != nil {
		return csapi.Snapshot{}, false, notFoundOr(err, volumeID)
	}
	for _, s := range snaps { // newest first
		if at, err := time.Parse(csapi.TimeLayout, s.Created); err == nil && at.Before(j.Op.CreatedAt.Add(-time.Minute)) {
			continue
		}
		if s.State == csapi.SnapshotError {
			return s, true, commands.CloudStack("CloudStack createSnapshot failed: snapshot %s (%s) is in state Error", s.Name, s.ID).
				WithDetail("snapshot_id", s.ID)
		}
		return s, true, nil
	}
	return csapi.Snapshot{}, false, nil
}

// backedUp waits until a snapshot found by its name is backed up.
func (k snapshot) backedUp(ctx context.Context, j *engine.Journal, s csapi.Snapshot) (csapi.Snapshot, error) {
	done, err := j.Settle(ctx, "createSnapshot", func(ctx context.Context) (bool, error) {
		cur, err := k.snapshotOf(ctx, j, s.ID)
		if err != nil {
			return false, engine.Failure(err)
		}
		s = cur
		switch s.State {
		case csapi.SnapshotBackedUp:
			return true, nil
		case csapi.SnapshotError:
			return false, commands.CloudStack("CloudStack createSnapshot failed: snapshot %s (%s) is in state Error", s.Name, s.ID).
				WithDetail("snapshot_id", s.ID)
		}
		return false, nil
	})
	if err == nil && !done {
		e := commands.Timeout("snapshot %s (%s) is still %s", s.Name, s.ID, s.State).WithDetail("snapshot_id", s.ID)
		if j.Op.JobID != "" { // its job may still take it
			e = e.WithDetail(commands.DetailJobMayRun, true).WithDetail(commands.DetailJobID, j.Op.JobID)
		}
		err = e
	}
	return s, err
}
