package engine

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/state"
)

// Outcome is what became of the CloudStack job a failed operation timed
// out on.
type Outcome struct {
	// Status is commands.JobSucceeded, JobFailed or JobUnknown.
	Status string
	// Resolution says it in words.
	Resolution string
	// Details are added to the operation's details besides the status.
	Details map[string]any
}

// JobLookup is what a Resolver may ask about a failed operation's volume.
type JobLookup interface {
	// Volume asks CloudStack for the operation's volume; missing when
	// CloudStack no longer has it.
	Volume(ctx context.Context) (vol csapi.Volume, missing bool, err error)
	// Later returns the id of an operation on the volume accepted after
	// this one, in any status ("" for none): its work could be what the
	// volume shows now.
	Later(ctx context.Context) (string, error)
}

// Resolver is implemented by a kind whose operation can fail on TIMEOUT
// while its CloudStack job runs on (details job_may_run true): the
// reconcile asks CloudStack once about the job, and the kind says what
// the job's end means. Nothing is ever sent to CloudStack again.
type Resolver interface {
	// JobCommand names the CloudStack command of the kind's job.
	JobCommand() string
	// Succeeded is the outcome of a job that succeeded; job carries its
	// result, when it has one.
	Succeeded(op commands.Operation, jobID string, job csapi.Job) Outcome
	// Failed is the outcome of a job that failed; why says how.
	Failed(op commands.Operation, jobID, why string) Outcome
	// Gone is the outcome of a job CloudStack no longer knows, decided
	// from what look shows of the volume where that can tell.
	Gone(ctx context.Context, op commands.Operation, jobID string, look JobLookup) (Outcome, error)
	// Adopt records what the operation would have recorded, now that its
	// job is known to have succeeded, and returns it in words ("" for
	// nothing).
	Adopt(ctx context.Context, op commands.Operation) (string, error)
}

// Jobs is what the engine asks CloudStack to settle the job of a
// workflow's step that timed out on it.
type Jobs interface {
	// WaitJob follows a job until it ends or ctx is done.
	WaitJob(ctx context.Context, jobID string) (csapi.Job, error)
	// GetVolume returns a volume or an error wrapping csapi.ErrNotFound.
	GetVolume(ctx context.Context, volumeID string) (csapi.Volume, error)
}

var _ Jobs = csapi.API(nil)

// Resolution is what became of the CloudStack job a failed operation
// timed out on.
type Resolution struct {
	Outcome
	// JobID is the job's id ("" when the operation recorded none).
	JobID string
	// Pending: the job still runs; nothing is decided.
	Pending bool
	// Adopted says what was recorded besides ("" for nothing).
	Adopted string
}

// ResolveJob decides what became of the job the failed operation op
// timed out on (details job_may_run true): ask asks CloudStack about the
// job (once, or until it ends), and k, the kind of op (nil when it has
// none), says what the job's end means; a job CloudStack no longer knows
// is decided by k.Gone from what look shows. A job that succeeded is
// adopted (k.Adopt). Nothing is ever sent to CloudStack again.
func ResolveJob(ctx context.Context, k Resolver, op commands.Operation, look JobLookup,
	ask func(ctx context.Context, jobID string) (csapi.Job, error)) (Resolution, error) {
	jobID, _ := op.Details[commands.DetailJobID].(string)
	if jobID == "" {
		jobID = op.JobID
	}
	r := Resolution{JobID: jobID}
	switch {
	case jobID == "":
		r.Outcome = Outcome{Status: commands.JobUnknown,
			Resolution: "the operation recorded no CloudStack job: what it did is unknown"}
		return r, nil
	case k == nil:
		r.Outcome = Outcome{Status: commands.JobUnknown,
			Resolution: fmt.Sprintf("a %s operation has no CloudStack job to follow: what job %s did is unknown", op.Type, jobID)}
		return r, nil
	}
	job, err := ask(ctx, jobID)
	switch {
	case errors.Is(err, csapi.ErrNotFound) && op.VolumeID == "":
		r.Outcome = Outcome{Status: commands.JobUnknown, Details: map[string]any{},
			Resolution: fmt.Sprintf("CloudStack no longer knows %s job %s, and the volume's state (no volume recorded) does not tell whether it ran: what it did is unknown",
				k.JobCommand(), jobID)}
	case errors.Is(err, csapi.ErrNotFound):
		if r.Outcome, err = k.Gone(ctx, op, jobID, look); err != nil {
			return r, err
		}
	case err != nil:
		return r, CloudStackError(err)
	case job.Status == csapi.JobPending:
		r.Pending = true
		return r, nil
	case job.Status == csapi.JobSuccess:
		r.Outcome = k.Succeeded(op, jobID, job)
	default:
		why, details := "it failed", map[string]any{}
		var cs *csapi.Error
		if errors.As(job.Err, &cs) {
			details["cloudstack_error_code"], details["cloudstack_message"] = cs.Code, cs.Text
			why = fmt.Sprintf("error %d: %s", cs.Code, cs.Text)
		}
		r.Outcome = k.Failed(op, jobID, why)
		maps.Copy(details, r.Outcome.Details)
		r.Outcome.Details = details
	}
	if r.Status == commands.JobSucceeded {
		if r.Adopted, err = k.Adopt(ctx, op); err != nil {
			return r, err
		}
	}
	return r, nil
}

// Record returns op with the resolution in its details: job_may_run
// false, job_status, resolved_at, resolution and the outcome's details.
func (r Resolution) Record(op commands.Operation, now time.Time) commands.Operation {
	note := op
	note.Details = maps.Clone(op.Details)
	if note.Details == nil {
		note.Details = map[string]any{}
	}
	maps.Copy(note.Details, r.Details)
	note.Details[commands.DetailJobMayRun] = false
	note.Details[commands.DetailJobStatus] = r.Status
	note.Details[commands.DetailResolvedAt] = now.Format(time.RFC3339)
	note.Details[commands.DetailResolution] = r.Resolution
	note.UpdatedAt = now
	return note
}

// VolumeLook is the JobLookup of op's volume: CloudStack through cs, the
// later operations through ops.
func VolumeLook(cs Jobs, ops state.OperationReader, op commands.Operation) JobLookup {
	return volumeLook{cs: cs, ops: ops, op: op}
}

// volumeLook answers a Resolver's questions about op's volume.
type volumeLook struct {
	cs  Jobs
	ops state.OperationReader
	op  commands.Operation
}

func (l volumeLook) Volume(ctx context.Context) (csapi.Volume, bool, error) {
	vol, err := l.cs.GetVolume(ctx, l.op.VolumeID)
	if errors.Is(err, csapi.ErrNotFound) {
		return vol, true, nil
	}
	if err != nil {
		return vol, false, CloudStackError(err)
	}
	return vol, false, nil
}

// laterPage is how many operations one store read of Later lists.
const laterPage = 200

// Later returns the id of an operation on the volume accepted after op,
// in any status ("" for none).
func (l volumeLook) Later(ctx context.Context) (string, error) {
	f := state.Filter{VolumeID: l.op.VolumeID, Limit: laterPage}
	for {
		ops, next, err := l.ops.ListOperations(ctx, f)
		if err != nil {
			return "", state.APIError(err)
		}
		for _, o := range ops { // newest first
			if o.ID != l.op.ID && o.CreatedAt.After(l.op.CreatedAt) {
				return o.ID, nil
			}
			if !o.CreatedAt.After(l.op.CreatedAt) {
				return "", nil
			}
		}
		if next == "" {
			return "", nil
		}
		f.Cursor = next
	}
}
