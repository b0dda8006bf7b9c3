package kinds

import (
	"context"
	"errors"
	"fmt"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// The kinds whose operations wait for a CloudStack job resolve what the
// job did after they timed out.
var (
	_ engine.Resolver = create{}
	_ engine.Resolver = attach{}
	_ engine.Resolver = detach{}
)

// succeededAfter says that a job succeeded after its operation timed out.
func succeededAfter(command, jobID string) string {
	return command + " job " + jobID + " succeeded after the operation timed out"
}

// failedNothing is the outcome of a job that failed and did nothing.
func failedNothing(command, jobID, why string) engine.Outcome {
	return engine.Outcome{Status: commands.JobFailed, Details: map[string]any{},
		Resolution: fmt.Sprintf("%s job %s failed after the operation timed out (%s): CloudStack did nothing", command, jobID, why)}
}

// unknown is the outcome of a job CloudStack no longer knows, whose
// volume's state (seen) does not tell.
func unknown(command, jobID, seen string) engine.Outcome {
	return engine.Outcome{Status: commands.JobUnknown, Details: map[string]any{},
		Resolution: fmt.Sprintf("CloudStack no longer knows %s job %s, and the volume's state (%s) does not tell whether it ran: what it did is unknown",
			command, jobID, seen)}
}

// goneShown decides a job CloudStack no longer knows from the volume:
// succeeded when shows finds the operation's effect on it and no later
// operation on the volume could have made it; unknown otherwise.
func goneShown(ctx context.Context, command, jobID string, look engine.JobLookup,
	shows func(vol csapi.Volume, missing bool) (string, error)) (engine.Outcome, error) {
	later, err := look.Later(ctx)
	if err != nil {
		return engine.Outcome{}, err
	}
	if later != "" {
		return unknown(command, jobID, "operation "+later+" on the volume came after"), nil
	}
	vol, missing, err := look.Volume(ctx)
	if err != nil {
		return engine.Outcome{}, err
	}
	shown, err := shows(vol, missing)
	if err != nil {
		return engine.Outcome{}, err
	}
	switch {
	case shown != "":
		return engine.Outcome{Status: commands.JobSucceeded,
			Resolution: fmt.Sprintf("CloudStack no longer knows %s job %s, and it shows the operation's effect (%s), which no later operation made: taken as succeeded",
				command, jobID, shown)}, nil
	case missing:
		return unknown(command, jobID, "volume not found"), nil
	case vol.VMID != "":
		return unknown(command, jobID, "attached to VM "+vol.VMID), nil
	}
	return unknown(command, jobID, "detached"), nil
}

func (create) JobCommand() string { return "createVolume" }

// Succeeded names the volume CloudStack made, this operation's, so no
// other create adopts it.
func (k create) Succeeded(op commands.Operation, jobID string, job csapi.Job) engine.Outcome {
	id := op.VolumeID
	if job.Volume != nil && job.Volume.ID != "" {
		id = job.Volume.ID
	}
	return engine.Outcome{Status: commands.JobSucceeded, Details: map[string]any{"volume_id": id},
		Resolution: fmt.Sprintf("%s: CloudStack made volume %s, this operation's", succeededAfter(k.JobCommand(), jobID), id)}
}

// Failed names the volume CloudStack made before the job ran, which it
// leaves, for whoever cleans up.
func (k create) Failed(op commands.Operation, jobID, why string) engine.Outcome {
	if op.VolumeID == "" {
		return failedNothing(k.JobCommand(), jobID, why)
	}
	return engine.Outcome{Status: commands.JobFailed, Details: map[string]any{"volume_id": op.VolumeID},
		Resolution: fmt.Sprintf("%s job %s failed after the operation timed out (%s): volume %s, made before the job ran, is left in CloudStack",
			k.JobCommand(), jobID, why, op.VolumeID)}
}

// Gone is always unknown: a create's volume exists whatever its job did
// (CloudStack makes it before the job runs); it is named if it exists.
func (k create) Gone(ctx context.Context, _ commands.Operation, jobID string, look engine.JobLookup) (engine.Outcome, error) {
	vol, missing, err := look.Volume(ctx)
	switch {
	case err != nil:
		return engine.Outcome{}, err
	case missing:
		return unknown(k.JobCommand(), jobID, "volume not found"), nil
	}
	out := unknown(k.JobCommand(), jobID, "volume "+vol.ID+" exists, but CloudStack makes it before the job runs")
	out.Details["volume_id"] = vol.ID
	return out, nil
}

// Adopt records nothing: the volume's id is on the operation already.
func (create) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }

func (attach) JobCommand() string { return "attachVolume" }

func (k attach) Succeeded(op commands.Operation, jobID string, _ csapi.Job) engine.Outcome {
	return engine.Outcome{Status: commands.JobSucceeded, Details: map[string]any{},
		Resolution: fmt.Sprintf("%s: CloudStack attached volume %s to VM %s", succeededAfter(k.JobCommand(), jobID), op.VolumeID, op.VM())}
}

func (k attach) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	return failedNothing(k.JobCommand(), jobID, why)
}

// Gone takes the job as succeeded when the volume is attached as asked
// (as the root disk for attach-root).
func (k attach) Gone(ctx context.Context, op commands.Operation, jobID string, look engine.JobLookup) (engine.Outcome, error) {
	var req commands.AttachRequest
	if err := engine.DecodeRequest(&op, &req); err != nil {
		return engine.Outcome{}, err
	}
	return goneShown(ctx, k.JobCommand(), jobID, look, func(vol csapi.Volume, missing bool) (string, error) {
		if !missing && AttachedAsWanted(vol, req) {
			return fmt.Sprintf("volume %s is attached to VM %s", vol.ID, vol.VMID), nil
		}
		return "", nil
	})
}

// Adopt records the mapping of the volume a timed-out attach attached
// after all, as the attach would have: when CloudStack shows it attached
// as asked, it has no mapping, and no unfinished operation on it will
// decide. On a VM with a device agent the mapping starts missing (its
// device unknown), and the devices' reconcile in the same sync points it
// at the volume's device when that carries its identity; elsewhere it is
// not_applicable.
func (k attach) Adopt(ctx context.Context, op commands.Operation) (string, error) {
	switch _, err := k.Mappings.Get(ctx, op.VolumeID); {
	case err == nil:
		return "", nil // mapped already
	case !errors.Is(err, state.ErrNotFound):
		return "", state.APIError(err)
	}
	for _, st := range []commands.OpStatus{commands.StatusPending, commands.StatusExecuting} {
		_, busy, err := state.FirstOperation(ctx, k.Operations, state.Filter{VolumeID: op.VolumeID, Status: st})
		if err != nil {
			return "", state.APIError(err)
		}
		if busy {
			return "", nil // its mapping is that operation's to record
		}
	}
	var req commands.AttachRequest
	if err := engine.DecodeRequest(&op, &req); err != nil {
		return "", err
	}
	vol, err := k.CloudStack.GetVolume(ctx, op.VolumeID)
	if errors.Is(err, csapi.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", engine.CloudStackError(err)
	}
	if !AttachedAsWanted(vol, req) {
		return "", nil // not so any more: the mappings' reconcile follows CloudStack
	}
	m := AttachedMapping(vol, req.VMID)
	if k.Devices != nil && k.Devices.HasAgent(ctx, req.VMID) {
		m.LinuxState = commands.LinuxMissing
	}
	if _, err := k.Mappings.Put(ctx, nil, m); err != nil {
		if errors.Is(err, state.ErrStale) {
			return "", nil // mapped meanwhile
		}
		return "", state.APIError(err)
	}
	return fmt.Sprintf("recorded the mapping of volume %s on VM %s (device id %s, linux_state %s)",
		m.VolumeID, m.VMID, DeviceString(m.DeviceID), m.LinuxState), nil
}

func (detach) JobCommand() string { return "detachVolume" }

// Succeeded: the detach's mapping and NBD export are removed by the
// mappings' reconcile in the same sync.
func (k detach) Succeeded(op commands.Operation, jobID string, _ csapi.Job) engine.Outcome {
	return engine.Outcome{Status: commands.JobSucceeded, Details: map[string]any{},
		Resolution: fmt.Sprintf("%s: CloudStack detached volume %s", succeededAfter(k.JobCommand(), jobID), op.VolumeID)}
}

func (k detach) Failed(_ commands.Operation, jobID, why string) engine.Outcome {
	return failedNothing(k.JobCommand(), jobID, why)
}

// Gone takes the job as succeeded when the volume is detached or gone.
func (k detach) Gone(ctx context.Context, op commands.Operation, jobID string, look engine.JobLookup) (engine.Outcome, error) {
	return goneShown(ctx, k.JobCommand(), jobID, look, func(vol csapi.Volume, missing bool) (string, error) {
		switch {
		case missing:
			return "volume " + op.VolumeID + " is gone", nil
		case vol.VMID == "":
			return "volume " + vol.ID + " is detached", nil
		}
		return "", nil
	})
}

// Adopt records nothing: the mappings' reconcile removes the mapping.
func (detach) Adopt(context.Context, commands.Operation) (string, error) { return "", nil }
