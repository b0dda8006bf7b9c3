package engine

import (
	"context"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
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
	// Succeeded is the outcome of a job that succeeded; vol is its
	// result, when it has one.
	Succeeded(op commands.Operation, jobID string, vol *csapi.Volume) Outcome
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
