package handlers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/handlers/csapi"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/state"
)

// resolvePage is how many failed operations one store read of
// resolveJobs lists.
const resolvePage = 200

// resolveBudget bounds resolveJobs inside a reconcile, so that a slow
// CloudStack leaves the rest of the reconcile its time.
const resolveBudget = commands.ForceSyncTimeout / 4

// jobCommands names the CloudStack command of the job each operation type
// waits for.
var jobCommands = map[commands.OpType]string{
	commands.OpCreate:         "createVolume",
	commands.OpAttach:         "attachVolume",
	commands.OpDetach:         "detachVolume",
	commands.OpSnapshot:       "createSnapshot",
	commands.OpDeleteSnapshot: "deleteSnapshot",
	commands.OpRevert:         "revertSnapshot",
	commands.OpResize:         "resizeVolume",
	commands.OpTags:           "createTags/deleteTags",
}

// reconciler repairs what drifted from CloudStack: the timed-out jobs'
// operations, and the mappings (the Service's reconcile runs it under its
// lease).
type reconciler struct {
	cfg      Config
	log      *slog.Logger
	mappings *engine.MappingWriter
	release  *engine.Releaser
	pub      engine.Publisher
}

// jobOutcome is what became of the CloudStack job of a failed operation.
type jobOutcome struct {
	// status is commands.JobSucceeded, JobFailed or JobUnknown.
	status string
	// resolution says it in words.
	resolution string
	// details are added to the operation's details besides the status.
	details map[string]any
}

// resolveJobs finishes the story of the failed operations whose CloudStack
// job may still run (details job_may_run true, left by waitJob on
// TIMEOUT): it lists the failed operations page by page and asks
// CloudStack, once and without waiting, about the job of each that says
// so. A job still running is looked at again by the next reconcile. A job
// that ended, or that CloudStack no longer knows, is resolved (see
// resolveJob). It returns a sentence per resolved operation, and one per
// operation or page it could not check. It stops at the first CloudStack
// or store that does not answer, and within resolveBudget: what is left
// waits for the next reconcile.
func (r *reconciler) resolveJobs(ctx context.Context) (changes, errs []string) {
	ctx, cancel := context.WithTimeout(ctx, resolveBudget)
	defer cancel()
	f := state.Filter{Status: commands.StatusFailed, Limit: resolvePage}
	for {
		ops, next, err := r.cfg.Store.ListOperations(ctx, f)
		if err != nil {
			return changes, append(errs, fmt.Sprintf("failed operations: %v", state.APIError(err)))
		}
		for _, op := range ops {
			if op.Details[commands.DetailJobMayRun] != true {
				continue
			}
			change, err := r.resolveJob(ctx, op)
			if change != "" {
				changes = append(changes, change)
			}
			if err != nil {
				errs = append(errs, fmt.Sprintf("job of operation %s: %v", op.ID, err))
				if commands.AsError(err).Status == http.StatusServiceUnavailable || ctx.Err() != nil {
					return changes, append(errs, "timed-out jobs: the others wait for the next reconcile")
				}
			}
		}
		if next == "" {
			return changes, errs
		}
		f.Cursor = next
	}
}

// resolveJob asks CloudStack about the job of one failed operation. A job
// that ended is adopted as CloudStack's truth: a create that succeeded
// names its volume; an attach that succeeded gets its mapping (resolved
// before the mappings are reconciled, which also find its device); a
// detach that succeeded loses its mapping and export when the mappings
// are reconciled next, in the same sync; a job that failed did nothing. A
// job CloudStack no longer knows is decided from the volume's state where
// it shows the operation's effect, and is unknown otherwise. Nothing is
// ever sent to CloudStack again. The outcome is recorded on the operation
// (job_may_run false, job_status, resolved_at, resolution) by
// compare-and-swap and published; "" and no error when the job still runs
// or the operation changed since it was listed (the next reconcile reads
// it again).
func (r *reconciler) resolveJob(ctx context.Context, op commands.Operation) (string, error) {
	jobID, _ := op.Details[commands.DetailJobID].(string)
	if jobID == "" {
		jobID = op.JobID
	}
	var out jobOutcome
	if jobID == "" {
		out = jobOutcome{status: commands.JobUnknown, resolution: "the operation recorded no CloudStack job: what it did is unknown"}
		return r.annotate(ctx, op, jobID, out, "")
	}
	job, err := r.cfg.CloudStack.QueryJob(ctx, jobID)
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		if out, err = r.outcomeFromVolume(ctx, op, jobID); err != nil {
			return "", err
		}
	case err != nil:
		return "", engine.CloudStackError(err)
	case job.Status == csapi.JobPending:
		return "", nil
	case job.Status == csapi.JobSuccess:
		out = succeeded(op, jobID, job.Volume)
	default:
		out = failedJob(op, jobID, job.Err)
	}
	var adopted string
	if out.status == commands.JobSucceeded && op.Type == commands.OpAttach {
		if adopted, err = r.adoptAttach(ctx, op); err != nil {
			return "", err
		}
	}
	return r.annotate(ctx, op, jobID, out, adopted)
}

// annotate records out on the failed operation op by compare-and-swap and
// publishes it; adopted says what was recorded besides. It returns the
// change in words, "" when the operation changed since it was listed.
func (r *reconciler) annotate(ctx context.Context, op commands.Operation, jobID string, out jobOutcome, adopted string) (string, error) {
	note := op
	note.Details = maps.Clone(op.Details)
	maps.Copy(note.Details, out.details)
	now := time.Now().UTC()
	note.Details[commands.DetailJobMayRun] = false
	note.Details[commands.DetailJobStatus] = out.status
	note.Details[commands.DetailResolvedAt] = now.Format(time.RFC3339)
	note.Details[commands.DetailResolution] = out.resolution
	note.UpdatedAt = now
	saved, err := r.cfg.Store.UpdateOperation(ctx, note)
	if errors.Is(err, state.ErrStale) {
		return adopted, nil // changed since listed: the next reconcile reads it again
	}
	if err != nil {
		return adopted, state.APIError(err)
	}
	r.pub.PublishOperation(ctx, saved)
	r.log.Info("timed-out job resolved", "operation_id", op.ID, "type", op.Type, "volume_id", op.VolumeID,
		"cloudstack_job_id", jobID, "job_status", out.status)
	change := fmt.Sprintf("operation %s (%s of volume %s) timed out on CloudStack job %s: %s", op.ID, op.Type, op.VolumeID, jobID, out.resolution)
	if adopted != "" {
		change += "; " + adopted
	}
	return change, nil
}

// succeeded is the outcome of a job that succeeded; vol is its result.
func succeeded(op commands.Operation, jobID string, vol *csapi.Volume) jobOutcome {
	out := jobOutcome{status: commands.JobSucceeded, details: map[string]any{}}
	what := jobCommands[op.Type] + " job " + jobID + " succeeded after the operation timed out"
	switch op.Type {
	case commands.OpCreate:
		id := op.VolumeID
		if vol != nil && vol.ID != "" {
			id = vol.ID
		}
		out.details["volume_id"] = id
		out.resolution = fmt.Sprintf("%s: CloudStack made volume %s, this operation's", what, id)
	case commands.OpAttach:
		out.resolution = fmt.Sprintf("%s: CloudStack attached volume %s to VM %s", what, op.VolumeID, op.VM())
	case commands.OpDetach:
		out.resolution = fmt.Sprintf("%s: CloudStack detached volume %s", what, op.VolumeID)
	default:
		out.resolution = what
	}
	return out
}

// failedJob is the outcome of a job that failed with jobErr.
func failedJob(op commands.Operation, jobID string, jobErr error) jobOutcome {
	out := jobOutcome{status: commands.JobFailed, details: map[string]any{}}
	why := "it failed"
	var cs *csapi.Error
	if errors.As(jobErr, &cs) {
		out.details["cloudstack_error_code"], out.details["cloudstack_message"] = cs.Code, cs.Text
		why = fmt.Sprintf("error %d: %s", cs.Code, cs.Text)
	}
	out.resolution = fmt.Sprintf("%s job %s failed after the operation timed out (%s): CloudStack did nothing", jobCommands[op.Type], jobID, why)
	if op.Type == commands.OpCreate && op.VolumeID != "" {
		// CloudStack made the volume before its job ran, and leaves it.
		out.details["volume_id"] = op.VolumeID
		out.resolution = fmt.Sprintf("%s job %s failed after the operation timed out (%s): volume %s, made before the job ran, is left in CloudStack",
			jobCommands[op.Type], jobID, why, op.VolumeID)
	}
	return out
}

// outcomeFromVolume decides the outcome of a job CloudStack no longer
// knows (expunged) from the volume's state, where that can tell: an
// attach's volume attached as asked, or a detach's volume detached or
// gone, counts as its job having succeeded, unless a later operation on
// the volume could have done it. Anything else is unknown: a create's
// volume exists whatever its job did (CloudStack makes it before the job
// runs), so the create names it for whoever cleans up.
func (r *reconciler) outcomeFromVolume(ctx context.Context, op commands.Operation, jobID string) (jobOutcome, error) {
	gone := "CloudStack no longer knows " + jobCommands[op.Type] + " job " + jobID
	unknown := func(seen string) jobOutcome {
		return jobOutcome{status: commands.JobUnknown, details: map[string]any{},
			resolution: fmt.Sprintf("%s, and the volume's state (%s) does not tell whether it ran: what it did is unknown", gone, seen)}
	}
	if op.VolumeID == "" {
		return unknown("no volume recorded"), nil
	}
	later := ""
	if op.Type != commands.OpCreate {
		var err error
		if later, err = r.laterOperation(ctx, op); err != nil {
			return jobOutcome{}, err
		}
	}
	if later != "" {
		return unknown("operation " + later + " on the volume came after"), nil
	}
	vol, err := r.cfg.CloudStack.GetVolume(ctx, op.VolumeID)
	missing := errors.Is(err, csapi.ErrNotFound)
	if err != nil && !missing {
		return jobOutcome{}, engine.CloudStackError(err)
	}
	if op.Type == commands.OpCreate {
		if missing {
			return unknown("volume not found"), nil
		}
		out := unknown("volume " + vol.ID + " exists, but CloudStack makes it before the job runs")
		out.details["volume_id"] = vol.ID
		return out, nil
	}
	shown := ""
	switch op.Type {
	case commands.OpAttach:
		var req commands.AttachRequest
		if err := engine.DecodeRequest(&op, &req); err != nil {
			return jobOutcome{}, err
		}
		if !missing && kinds.AttachedAsWanted(vol, req) {
			shown = fmt.Sprintf("volume %s is attached to VM %s", vol.ID, vol.VMID)
		}
	case commands.OpDetach:
		switch {
		case missing:
			shown = "volume " + op.VolumeID + " is gone"
		case vol.VMID == "":
			shown = "volume " + vol.ID + " is detached"
		}
	}
	if shown == "" {
		switch {
		case missing:
			return unknown("volume not found"), nil
		case vol.VMID != "":
			return unknown("attached to VM " + vol.VMID), nil
		}
		return unknown("detached"), nil
	}
	return jobOutcome{status: commands.JobSucceeded,
		resolution: fmt.Sprintf("%s, and it shows the operation's effect (%s), which no later operation made: taken as succeeded", gone, shown)}, nil
}

// laterOperation returns the id of an operation on op's volume accepted
// after op, in any status ("" for none): its work could be what the
// volume shows now.
func (r *reconciler) laterOperation(ctx context.Context, op commands.Operation) (string, error) {
	f := state.Filter{VolumeID: op.VolumeID, Limit: resolvePage}
	for {
		ops, next, err := r.cfg.Store.ListOperations(ctx, f)
		if err != nil {
			return "", state.APIError(err)
		}
		for _, o := range ops { // newest first
			if o.ID != op.ID && o.CreatedAt.After(op.CreatedAt) {
				return o.ID, nil
			}
			if !o.CreatedAt.After(op.CreatedAt) {
				return "", nil
			}
		}
		if next == "" {
			return "", nil
		}
		f.Cursor = next
	}
}

// adoptAttach records the mapping of the volume a timed-out attach
// attached after all, as the attach would have: when CloudStack shows it
// attached as asked, it has no mapping, and no unfinished operation on it
// will decide. On a VM with a device agent the mapping starts missing
// (its device unknown), and the devices' reconcile in the same sync points
// it at the volume's device when that carries its identity; elsewhere it
// is not_applicable. It returns what it recorded in words ("" for
// nothing).
func (r *reconciler) adoptAttach(ctx context.Context, op commands.Operation) (string, error) {
	switch _, err := r.cfg.Store.GetMapping(ctx, op.VolumeID); {
	case err == nil:
		return "", nil // mapped already
	case !errors.Is(err, state.ErrNotFound):
		return "", state.APIError(err)
	}
	for _, st := range []commands.OpStatus{commands.StatusPending, commands.StatusExecuting} {
		busy, _, err := r.cfg.Store.ListOperations(ctx, state.Filter{VolumeID: op.VolumeID, Status: st, Limit: 1})
		if err != nil {
			return "", state.APIError(err)
		}
		if len(busy) > 0 {
			return "", nil // its mapping is that operation's to record
		}
	}
	var req commands.AttachRequest
	if err := engine.DecodeRequest(&op, &req); err != nil {
		return "", err
	}
	vol, err := r.cfg.CloudStack.GetVolume(ctx, op.VolumeID)
	if errors.Is(err, csapi.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", engine.CloudStackError(err)
	}
	if !kinds.AttachedAsWanted(vol, req) {
		return "", nil // not so any more: the mappings' reconcile follows CloudStack
	}
	m := kinds.AttachedMapping(vol, req.VMID)
	if r.cfg.Devices != nil && r.cfg.Devices.HasAgent(ctx, req.VMID) {
		m.LinuxState = commands.LinuxMissing
	}
	if _, err := r.mappings.Put(ctx, nil, m); err != nil {
		if errors.Is(err, state.ErrStale) {
			return "", nil // mapped meanwhile
		}
		return "", state.APIError(err)
	}
	return fmt.Sprintf("recorded the mapping of volume %s on VM %s (device id %s, linux_state %s)",
		m.VolumeID, m.VMID, kinds.DeviceString(m.DeviceID), m.LinuxState), nil
}
