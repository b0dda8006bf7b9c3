package kinds

import (
	"context"
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
)

// asyncCall is one asynchronous CloudStack call of a kind, made exactly
// once: a recorded job is followed; a call whose answer was lost, or that
// a crash cut off, is sent again only after CloudStack shows it did not
// take effect.
type asyncCall struct {
	// name is the CloudStack command, e.g. "resizeVolume".
	name string
	// requested and job are the steps journaled before the call and once
	// its job is known.
	requested, job string
	// done reports whether CloudStack shows the call took effect; nil for
	// a call that may be repeated (revertSnapshot).
	done func(ctx context.Context) (bool, error)
	// idle, for a repeatable call, reports whether nothing of an earlier
	// call can still be running, so that it may be sent again.
	idle func(ctx context.Context) (bool, error)
	// send makes the call and returns its job's id.
	send func(ctx context.Context) (string, error)
	// result, when set, receives the job of a call that succeeded.
	result func(csapi.Job)
}

// run makes the call, or finishes one a previous delivery made, and
// returns once CloudStack shows it took effect.
func (c asyncCall) run(ctx context.Context, k Deps, j *engine.Journal) error {
	op := j.Op
	for {
		switch {
		case op.Step == c.job && op.JobID != "":
			job, jobErr := k.waitJob(ctx, j, c.name+" job")
			if jobErr == nil {
				if c.result != nil {
					c.result(job)
				}
				return nil
			}
			if c.done == nil && errors.Is(jobErr, csapi.ErrNotFound) {
				op.Step = c.requested // a repeatable call whose job is gone: again, once idle
				continue
			}
			if c.done != nil {
				// Done anyway (a job CloudStack no longer knows, say)?
				done, err := c.done(ctx)
				switch {
				case errors.Is(err, engine.ErrLost), errors.Is(err, engine.ErrStopped):
					return err
				case err != nil:
					return engine.Failure(jobErr)
				case done:
					return nil
				case errors.Is(jobErr, csapi.ErrNotFound):
					op.Step = c.requested // the job is gone and nothing done: ask again below
					continue
				}
			}
			return engine.Failure(jobErr)
		case op.Step == c.requested && c.done != nil:
			done, err := j.Settle(ctx, c.name, c.done)
			if err != nil || done {
				return err
			}
		case op.Step == c.requested:
			// A repeatable call: send it again once an earlier one is over.
			if _, err := j.Settle(ctx, c.name, c.idle); err != nil {
				return err
			}
		}
		op.Step, op.JobID = c.requested, ""
		if err := j.Save(ctx); err != nil {
			return err
		}
		var jobID string
		err := j.Step(ctx, c.name, func(ctx context.Context) error {
			var err error
			jobID, err = c.send(ctx)
			return err
		})
		switch {
		case csapi.IsMaybeDone(err):
			continue
		case err != nil:
			return engine.Failure(err)
		}
		op.JobID, op.Step, op.Error = jobID, c.job, ""
		if err := j.Save(ctx); err != nil {
			return err
		}
	}
}

// snapshotOf asks CloudStack for a snapshot inside a step.
func (d Deps) snapshotOf(ctx context.Context, j *engine.Journal, id string) (csapi.Snapshot, error) {
	var s csapi.Snapshot
	err := j.Read(ctx, "listSnapshots", func(ctx context.Context) error {
		var err error
		s, err = d.CloudStack.GetSnapshot(ctx, id)
		return err
	})
	return s, err
}

// SnapshotNotFound is the 404 for a snapshot CloudStack does not know.
func SnapshotNotFound(snapshotID string) *commands.Error {
	return commands.NotFound("snapshot %s not found in CloudStack", snapshotID).WithDetail("snapshot_id", snapshotID)
}

// followSize records a volume's new size on its mapping, if it has one,
// fenced by the operation's claim.
func (d Deps) followSize(ctx context.Context, j *engine.Journal, m commands.Mapping, size int64) error {
	if m.Size == size {
		return nil
	}
	m.Size = size
	_, err := d.Mappings.Put(ctx, j, m)
	switch {
	case errors.Is(err, engine.ErrLost), errors.Is(err, engine.ErrStopped):
		return err
	case err != nil:
		return engine.ErrStopped // a stale revision: the redelivery reads again
	}
	return nil
}
