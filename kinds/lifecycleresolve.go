package kinds

import (
	"context"
	"errors"
	"fmt"
	"maps"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
)

// The lifecycle kinds resolve what their job did after they timed out;
// none has anything to adopt (their effect is CloudStack's alone, or, for
// a resize, the mapping's size, which the next resize or reconcile
// records).
var (
	_ engine.Resolver = snapshot{}
	_ engine.Resolver = deleteSnapshot{}
	_ engine.Resolver = revert{}
	_ engine.Resolver = resize{}
	_ engine.Resolver = tags{}
)

// succeededJob is the outcome of a job that succeeded after its operation
// timed out: CloudStack did what (in words).
func succeededJob(command, jobID, what string) engine.Outcome {
	return engine.Outcome{Status: commands.JobSucceeded, Details: map[string]any{},
		Resolution: succeededAfter(command, jobID) + ": " + what}
}

func (snapshot) JobCommand() string { return "createSnapshot" }

// Succeeded names the snapshot the job took (details snapshot_id) when
// its result carries it.
func (k snapshot) Succeeded(op commands.Operation, jobID string, job csapi.Job) engine.Outcome {
	if job.Snapshot == nil || job.Snapshot.ID == "" {
		return succeededJob(k.JobCommand(), jobID, "CloudStack took the snapshot of volume "+op.VolumeID)
	}
	out := succeededJob(k.JobCommand(), jobID, fmt.Sprintf("CloudStack took snapshot %s (%s) of volume %s", job.Snapshot.Name, job.Snapshot.ID, op.VolumeID))
	out.Details["snapshot_id"] = job.Snapshot.ID
	return out
}

// Failed: a failed createSnapshot leaves its snapshot in state Error.
func (k snapshot) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	out := failedNothing(k.JobCommand(), jobID, why)
	out.Resolution += "; its snapshot, if listed, is in state Error"
	return out
}

// Gone lists the volume's snapshots for the operation's name.
func (k snapshot) Gone(ctx context.Context, op commands.Operation, jobID string, _ engine.JobLookup) (engine.Outcome, error) {
	var req commands.SnapshotRequest
	if err := engine.DecodeRequest(&op, &req); err != nil {
		return engine.Outcome{}, err
	}
	name := commands.SnapshotName(op.ID, req.Name)
	snaps, err := k.CloudStack.ListSnapshots(ctx, csapi.SnapshotFilter{VolumeID: op.VolumeID, Name: name})
	if err != nil && !errors.Is(err, csapi.ErrNotFound) {
		return engine.Outcome{}, engine.CloudStackError(err)
	}
	for _, s := range snaps {
		if s.State == csapi.SnapshotBackedUp {
			out := succeededJob(k.JobCommand(), jobID, fmt.Sprintf("CloudStack no longer knows the job, and lists snapshot %s (%s) backed up", s.Name, s.ID))
			out.Details["snapshot_id"] = s.ID
			return out, nil
		}
	}
	return unknown(k.JobCommand(), jobID, "no backed-up snapshot named "+name), nil
}

func (snapshot) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }

func (deleteSnapshot) JobCommand() string { return "deleteSnapshot" }

func (k deleteSnapshot) Succeeded(op commands.Operation, jobID string, _ csapi.Job) engine.Outcome {
	return succeededJob(k.JobCommand(), jobID, "CloudStack deleted the snapshot")
}

func (k deleteSnapshot) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	return failedNothing(k.JobCommand(), jobID, why)
}

// Gone: a snapshot CloudStack no longer lists is deleted (a snapshot id
// is never reused).
func (k deleteSnapshot) Gone(ctx context.Context, op commands.Operation, jobID string, _ engine.JobLookup) (engine.Outcome, error) {
	var req commands.SnapshotIDRequest
	if err := engine.DecodeRequest(&op, &req); err != nil {
		return engine.Outcome{}, err
	}
	_, err := k.CloudStack.GetSnapshot(ctx, req.SnapshotID)
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		return succeededJob(k.JobCommand(), jobID, "CloudStack no longer knows the job nor snapshot "+req.SnapshotID), nil
	case err != nil:
		return engine.Outcome{}, engine.CloudStackError(err)
	}
	return unknown(k.JobCommand(), jobID, "snapshot "+req.SnapshotID+" still listed"), nil
}

func (deleteSnapshot) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }

func (revert) JobCommand() string { return "revertSnapshot" }

func (k revert) Succeeded(op commands.Operation, jobID string, _ csapi.Job) engine.Outcome {
	return succeededJob(k.JobCommand(), jobID, "CloudStack reverted volume "+op.VolumeID)
}

func (k revert) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	return failedNothing(k.JobCommand(), jobID, why)
}

// Gone: a volume's state does not show whether a revert ran.
func (k revert) Gone(_ context.Context, _ commands.Operation, jobID string, _ engine.JobLookup) (engine.Outcome, error) {
	return unknown(k.JobCommand(), jobID, "a revert leaves no mark CloudStack lists"), nil
}

func (revert) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }

func (resize) JobCommand() string { return "resizeVolume" }

func (k resize) Succeeded(op commands.Operation, jobID string, job csapi.Job) engine.Outcome {
	what := "CloudStack resized volume " + op.VolumeID
	if job.Volume != nil {
		what += fmt.Sprintf(" to %d bytes", job.Volume.Size)
	}
	return succeededJob(k.JobCommand(), jobID, what)
}

func (k resize) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	return failedNothing(k.JobCommand(), jobID, why)
}

// Gone takes the job as succeeded when the volume has the target size.
func (k resize) Gone(ctx context.Context, op commands.Operation, jobID string, look engine.JobLookup) (engine.Outcome, error) {
	var req commands.ResizeRequest
	if err := engine.DecodeRequest(&op, &req); err != nil {
		return engine.Outcome{}, err
	}
	return goneShown(ctx, k.JobCommand(), jobID, look, func(vol csapi.Volume, missing bool) (string, error) {
		if !missing && vol.Size == req.SizeGiB()*commands.MinVolumeSize {
			return fmt.Sprintf("volume %s is %d bytes", vol.ID, vol.Size), nil
		}
		return "", nil
	})
}

func (resize) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }

func (tags) JobCommand() string { return "createTags/deleteTags" }

func (k tags) Succeeded(op commands.Operation, jobID string, _ csapi.Job) engine.Outcome {
	return succeededJob(k.JobCommand(), jobID, "CloudStack changed the tags of volume "+op.VolumeID)
}

func (k tags) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	return failedNothing(k.JobCommand(), jobID, why)
}

// Gone takes the job as succeeded when the volume has exactly the tags
// asked for.
func (k tags) Gone(ctx context.Context, op commands.Operation, jobID string, look engine.JobLookup) (engine.Outcome, error) {
	var req commands.TagsRequest
	if err := engine.DecodeRequest(&op, &req); err != nil {
		return engine.Outcome{}, err
	}
	return goneShown(ctx, k.JobCommand(), jobID, look, func(vol csapi.Volume, missing bool) (string, error) {
		if !missing && len(vol.Tags) == len(req.Tags) && (len(req.Tags) == 0 || maps.Equal(vol.Tags, req.Tags)) {
			return fmt.Sprintf("volume %s has exactly the tags asked for", vol.ID), nil
		}
		return "", nil
	})
}

func (tags) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }

// A start or stop of a VM that timed out is resolved too; the VM's state
// does not tell what a job CloudStack no longer knows did (another start
// or stop may have made it).
var (
	_ engine.Resolver = startVM{}
	_ engine.Resolver = stopVM{}
)

func (startVM) JobCommand() string { return "startVirtualMachine" }

func (k startVM) Succeeded(op commands.Operation, jobID string, _ csapi.Job) engine.Outcome {
	return succeededJob(k.JobCommand(), jobID, "CloudStack started VM "+op.VM())
}

func (k startVM) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	return failedNothing(k.JobCommand(), jobID, why)
}

func (k startVM) Gone(_ context.Context, _ commands.Operation, jobID string, _ engine.JobLookup) (engine.Outcome, error) {
	return unknown(k.JobCommand(), jobID, "a VM's state does not tell which start made it"), nil
}

func (startVM) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }

func (stopVM) JobCommand() string { return "stopVirtualMachine" }

func (k stopVM) Succeeded(op commands.Operation, jobID string, _ csapi.Job) engine.Outcome {
	return succeededJob(k.JobCommand(), jobID, "CloudStack stopped VM "+op.VM())
}

func (k stopVM) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	return failedNothing(k.JobCommand(), jobID, why)
}

func (k stopVM) Gone(_ context.Context, _ commands.Operation, jobID string, _ engine.JobLookup) (engine.Outcome, error) {
	return unknown(k.JobCommand(), jobID, "a VM's state does not tell which stop made it"), nil
}

func (stopVM) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }
